//! Alerts: the versioned result schema, the durable outbox and MQTT delivery.
//!
//! Inference sends a [`ResultMessage`] per series. [`Alerts::run`] fills in what only this
//! stage knows (`patient_ref`, `site`, `device`, `timings.published`), commits the result to
//! the [`Outbox`] (fsynced), reports it on the `committed` channel (from then on the DICOM
//! spool of that series may be deleted) and publishes it; it leaves the outbox only after
//! the broker acknowledged it. See `docs/ALERTS.md` for topics and payloads.
//!
//! Start-up order for the daemon:
//! ```no_run
//! # async fn demo(config: cspine_triage::alert::AlertConfig,
//! #   rx: tokio::sync::mpsc::Receiver<cspine_triage::alert::ResultMessage>) -> anyhow::Result<()> {
//! use cspine_triage::alert::{Alerts, StatusInfo};
//! let alerts = Alerts::open(&config)?;          // outbox open, key loaded, broker up
//! // ... now READY=1 ...
//! let (committed_tx, _committed_rx) = tokio::sync::mpsc::channel(16);
//! alerts.run(StatusInfo::new(None), rx, Some(committed_tx)).await?; // until rx closes
//! # Ok(()) }
//! ```

pub mod broker;
pub mod mqtt;
pub mod outbox;
pub mod patient_ref;
pub mod result;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;

pub use broker::EmbeddedBroker;
pub use mqtt::{BrokerUrl, StatusInfo, Topics};
pub use outbox::{Outbox, OutboxLimits};
pub use patient_ref::{PatientRefMode, PatientRefs};
pub use result::TriageResult;

/// Message from inference: one finished (or failed) series.
#[derive(Debug, Clone)]
pub struct ResultMessage {
    /// `patient_ref`, `site`, `device` and `timings.published` are overwritten here.
    pub result: TriageResult,
    /// DICOM Patient ID (0010,0020) as received; turned into `patient_ref`.
    pub patient_id: String,
    /// Key image (PNG), published on `keyimage/<id>`.
    pub key_image_png: Option<Vec<u8>>,
}

/// Sent on the `committed` channel of [`Alerts::run`] once a result is durably in the
/// outbox: the DICOM spool of `series_instance_uid` is no longer needed for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub id: String,
    pub series_instance_uid: String,
    /// Outbox sequence number.
    pub seq: u64,
    /// An undelivered entry with the same id was already in the outbox and was kept.
    pub already_queued: bool,
}

/// `[alert]` section: where results go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertConfig {
    /// Broker URL (`mqtt://host:port`, `mqtts://host:port`). Unset: an embedded broker is
    /// started on 127.0.0.1:`embedded_broker_port`.
    pub mqtt_url: Option<String>,
    /// Site and device names, used in topics and results.
    pub site: String,
    pub device: String,
    /// Topic prefix; default `cspine/<site>/<device>/`.
    pub topic_prefix: Option<String>,
    /// MQTT client id; default `cspine-triage-<site>-<device>`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// Password inline; prefer `password_file` (not shown by `check-config`).
    pub password: Option<String>,
    /// File whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) to verify an `mqtts://` broker; default: the system bundle.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for brokers that require them.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub keep_alive_secs: u64,
    /// Reconnect backoff: starts at min, doubles per failed attempt, capped at max.
    pub reconnect_min_secs: f64,
    pub reconnect_max_secs: f64,
    /// Durable outbox directory (results are fsynced here before publishing).
    pub outbox_dir: PathBuf,
    /// When the outbox holds this many entries or bytes, new results wait (and with them the
    /// upstream channel) until the broker acknowledges older ones. Nothing is dropped.
    pub outbox_max_entries: usize,
    pub outbox_max_bytes: u64,
    /// `pseudonymised` (default: keyed hash of the Patient ID) or `raw`.
    pub patient_ref: PatientRefMode,
    /// HMAC key for `patient_ref`; default `patient-ref.key` next to the outbox directory,
    /// generated on first start.
    pub patient_ref_key_file: Option<PathBuf>,
    /// Port of the embedded broker (127.0.0.1 only) used when `mqtt_url` is unset.
    pub embedded_broker_port: u16,
    /// On shutdown, how long to wait for the broker to acknowledge what is left.
    pub shutdown_drain_secs: f64,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            mqtt_url: None,
            site: "site".into(),
            device: "cspine-1".into(),
            topic_prefix: None,
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            keep_alive_secs: 30,
            reconnect_min_secs: 0.5,
            reconnect_max_secs: 30.0,
            outbox_dir: PathBuf::from("/var/lib/cspine-triage/outbox"),
            outbox_max_entries: OutboxLimits::default().max_entries,
            outbox_max_bytes: OutboxLimits::default().max_bytes,
            patient_ref: PatientRefMode::Pseudonymised,
            patient_ref_key_file: None,
            embedded_broker_port: 1883,
            shutdown_drain_secs: 5.0,
        }
    }
}

impl AlertConfig {
    pub fn validate(&self) -> Result<()> {
        for (key, value) in [("alert.site", &self.site), ("alert.device", &self.device)] {
            ensure!(
                !value.is_empty() && !value.contains(['/', '+', '#', '\0']),
                "{key} must be non-empty and free of '/', '+', '#' (it is part of MQTT topics), \
                 got {value:?}"
            );
        }
        if let Some(prefix) = &self.topic_prefix {
            ensure!(
                !prefix.contains(['+', '#', '\0']),
                "alert.topic_prefix must not contain MQTT wildcards, got {prefix:?}"
            );
        }
        if let Some(url) = &self.mqtt_url {
            BrokerUrl::parse(url)?;
        }
        ensure!(
            !(self.password.is_some() && self.password_file.is_some()),
            "set only one of alert.password and alert.password_file"
        );
        ensure!(
            self.client_cert_file.is_some() == self.client_key_file.is_some(),
            "alert.client_cert_file and alert.client_key_file go together"
        );
        ensure!(
            self.reconnect_min_secs > 0.0 && self.reconnect_min_secs <= self.reconnect_max_secs,
            "alert.reconnect_min_secs must be > 0 and <= alert.reconnect_max_secs"
        );
        ensure!(
            self.keep_alive_secs == 0 || self.keep_alive_secs >= 5,
            "alert.keep_alive_secs must be 0 (off) or at least 5"
        );
        ensure!(
            self.outbox_max_entries > 0 && self.outbox_max_bytes > 0,
            "alert.outbox_max_entries and alert.outbox_max_bytes must be > 0"
        );
        ensure!(
            self.shutdown_drain_secs >= 0.0 && self.shutdown_drain_secs.is_finite(),
            "alert.shutdown_drain_secs must be >= 0"
        );
        Ok(())
    }

    /// The topic prefix in use, always ending with `/`.
    pub fn effective_topic_prefix(&self) -> String {
        let mut prefix = self
            .topic_prefix
            .clone()
            .unwrap_or_else(|| format!("cspine/{}/{}/", self.site, self.device));
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        prefix
    }

    pub fn effective_client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("cspine-triage-{}-{}", self.site, self.device))
    }

    /// The password from `password` or the first line of `password_file`.
    pub fn password(&self) -> Result<Option<String>> {
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read alert.password_file {}", path.display()))?;
            return Ok(Some(text.lines().next().unwrap_or("").to_owned()));
        }
        Ok(self.password.clone())
    }

    /// Where the generated `patient_ref` key lives when `patient_ref_key_file` is unset.
    pub fn default_patient_ref_key_file(&self) -> PathBuf {
        let state_dir = self
            .outbox_dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), PathBuf::from);
        state_dir.join("patient-ref.key")
    }

    pub fn outbox_limits(&self) -> OutboxLimits {
        OutboxLimits {
            max_entries: self.outbox_max_entries,
            max_bytes: self.outbox_max_bytes,
        }
    }
}

/// The alert stage, opened: outbox indexed, patient_ref key loaded, embedded broker (if
/// any) listening. Everything that can fail at start-up fails in [`Alerts::open`].
#[derive(Debug)]
pub struct Alerts {
    config: AlertConfig,
    outbox: Outbox,
    refs: PatientRefs,
    url: BrokerUrl,
    broker: Option<EmbeddedBroker>,
}

impl Alerts {
    pub fn open(config: &AlertConfig) -> Result<Alerts> {
        config.validate()?;
        let outbox = Outbox::open(&config.outbox_dir, config.outbox_limits())?;
        let refs = PatientRefs::load(
            config.patient_ref,
            config.patient_ref_key_file.as_deref(),
            &config.default_patient_ref_key_file(),
        )?;
        // Read credentials and certificates now so a typo fails the start, not the first
        // connection attempt.
        config.password()?;
        let (url, broker) = match &config.mqtt_url {
            Some(url) => (BrokerUrl::parse(url)?, None),
            None => {
                let broker = EmbeddedBroker::start(config.embedded_broker_port)?;
                (BrokerUrl::parse(&broker.url())?, Some(broker))
            }
        };
        mqtt::mqtt_options(config, &url, &StatusInfo::new(None))?;
        Ok(Alerts {
            config: config.clone(),
            outbox,
            refs,
            url,
            broker,
        })
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The broker in use (the embedded one when `mqtt_url` is unset).
    pub fn broker_url(&self) -> &BrokerUrl {
        &self.url
    }

    pub fn embedded_broker(&self) -> Option<&EmbeddedBroker> {
        self.broker.as_ref()
    }

    /// Commits every message from `rx` and publishes the outbox until `rx` is closed (all
    /// senders dropped); then drains for up to `shutdown_drain_secs` and says offline.
    /// When the outbox is full, `rx` is not read: upstream waits (backpressure).
    pub async fn run(
        self,
        status: StatusInfo,
        mut rx: mpsc::Receiver<ResultMessage>,
        committed: Option<mpsc::Sender<Committed>>,
    ) -> Result<()> {
        let wake = Arc::new(tokio::sync::Notify::new());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let delivery = tokio::spawn(mqtt::deliver(
            self.config.clone(),
            self.url.clone(),
            status,
            self.outbox.clone(),
            wake.clone(),
            stop_rx,
        ));

        while let Some(message) = rx.recv().await {
            let ResultMessage {
                mut result,
                patient_id,
                key_image_png,
            } = message;
            result.schema = result::SCHEMA_V1.to_owned();
            result.patient_ref = self.refs.reference(&patient_id);
            result.site = self.config.site.clone();
            result.device = self.config.device.clone();
            result.timings.published = Some(OffsetDateTime::now_utc());
            let payload = serde_json::to_vec(&result).context("cannot serialise a result")?;
            let positive = result.status == result::Status::Positive;
            let outcome = self
                .outbox
                .commit_waiting(&result.id, positive, payload, key_image_png)
                .await;
            let already_queued = matches!(outcome, outbox::Committed::AlreadyQueued(_));
            if already_queued {
                log::info!(
                    "result {} (series {}) is already waiting in the outbox; kept the queued one",
                    result.id,
                    result.series_instance_uid
                );
            } else {
                log::info!(
                    "result {} ({:?}, series {}) committed to the outbox as entry {}",
                    result.id,
                    result.status,
                    result.series_instance_uid,
                    outcome.seq()
                );
            }
            wake.notify_one();
            if let Some(tx) = &committed {
                // The receiver going away is the caller's business, not a reason to stop.
                let _ = tx
                    .send(Committed {
                        id: result.id,
                        series_instance_uid: result.series_instance_uid,
                        seq: outcome.seq(),
                        already_queued,
                    })
                    .await;
            }
        }

        let _ = stop_tx.send(true);
        delivery.await.context("MQTT delivery task panicked")?
    }
}

/// [`Alerts::open`] + [`Alerts::run`] in one call.
pub async fn run_alerts(
    config: AlertConfig,
    status: StatusInfo,
    rx: mpsc::Receiver<ResultMessage>,
    committed: Option<mpsc::Sender<Committed>>,
) -> Result<()> {
    Alerts::open(&config)?.run(status, rx, committed).await
}
