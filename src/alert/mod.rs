//! Alerts: the versioned result schema, the durable outbox and MQTT delivery.
//!
//! Inference sends a [`ResultMessage`](crate::result::ResultMessage) per series. [`Alerts::run`] fills in what only this
//! stage knows (`patient_ref`, `site`, `device`, `timings.published`), publishes each
//! identifier as `[alert.identifiers]` says ([`identifiers`]), commits the result to
//! the [`Outbox`] (fsynced), reports it on the `committed` channel (from then on the DICOM
//! spool of that series may be deleted) and publishes it; it leaves the outbox only after
//! the broker acknowledged it. See `docs/ALERTS.md` for topics and payloads.
//!
//! Start-up order for the daemon:
//! ```no_run
//! # async fn demo(config: cspine_triage::alert::AlertConfig,
//! #   rx: tokio::sync::mpsc::Receiver<cspine_triage::result::ResultMessage>) -> anyhow::Result<()> {
//! use cspine_triage::alert::{Alerts, StatusInfo};
//! let alerts = Alerts::open(&config)?;          // outbox open, key loaded, broker up
//! // ... now READY=1 ...
//! let (committed_tx, _committed_rx) = tokio::sync::mpsc::channel(16);
//! // The daemon registers the stage with `service::health::Health`; a bare heartbeat also does.
//! let heartbeat = cspine_triage::heartbeat::Heartbeat::new(
//!     "alert", std::time::Duration::from_secs(120), std::time::Instant::now());
//! alerts.run(heartbeat, StatusInfo::new(None), rx, Some(committed_tx)).await?; // until rx closes
//! # Ok(()) }
//! ```

pub mod broker;
pub mod broker_url;
pub mod identifiers;
pub mod mqtt;
pub mod outbox;
pub mod patient_ref;
pub mod secret;
pub mod watch;
pub mod wire;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::heartbeat::Heartbeat;
use crate::pacs::Delivery;
use crate::report::{self, ReportConfig, ResultObject};
use crate::result::{self, ResultMessage};
use crate::series::FailedSeries;

pub use broker::EmbeddedBroker;
pub use broker_url::BrokerUrl;
pub use identifiers::{IdentifierConfig, Identifiers, Publication};
pub use mqtt::{StatusInfo, Topics};
pub use outbox::{Outbox, OutboxLimits};
pub use patient_ref::{HmacKey, PatientRefMode, PatientRefs};
pub use secret::Secret;
pub use wire::MqttProtocol;

impl From<Committed> for crate::dicom::spool::MarkRequest {
    fn from(c: Committed) -> Self {
        crate::dicom::spool::MarkRequest {
            study_instance_uid: c.study_instance_uid,
            series_instance_uid: c.series_instance_uid,
            result_id: c.id,
            sop_instance_uids: c.sop_instance_uids,
            stood_in_for: c
                .failed_better
                .into_iter()
                .map(|f| crate::dicom::spool::StoodInFor {
                    series_instance_uid: f.series_instance_uid,
                    sop_instance_uids: f.sop_instance_uids,
                    reason: f.reason,
                })
                .collect(),
        }
    }
}

/// Sent on the `committed` channel of [`Alerts::run`] once a result is durably in the
/// outbox: the DICOM spool of `series_instance_uid` is no longer needed for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub id: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    /// Outbox sequence number.
    pub seq: u64,
    /// An undelivered entry with the same id was already in the outbox and was kept.
    pub already_queued: bool,
    /// The instances the result analysed ([`ResultMessage::sop_instance_uids`]).
    pub sop_instance_uids: Vec<String>,
    /// [`ResultMessage::failed_better`].
    pub failed_better: Vec<FailedSeries>,
}

/// `[alert]` section: where results go. `Debug` shows the password as `<redacted>`.
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
    /// Password inline; prefer `password_file`. Never serialised, so `check-config` does
    /// not print it.
    #[serde(skip_serializing)]
    pub password: Option<Secret>,
    /// File whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) to verify an `mqtts://` broker; default: the system bundle.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for brokers that require them.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub keep_alive_secs: u64,
    /// `"3.1.1"` (default) or `"5"`.
    pub protocol: MqttProtocol,
    /// MQTT 5 only: brokers drop a result or key image not delivered to a subscriber
    /// within this many seconds. Unset: never (the default; the status never expires).
    pub message_expiry_secs: Option<u32>,
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
    /// HMAC key for `patient_ref` and for the identifiers published as `hmac`; default
    /// `patient-ref.key` next to the outbox directory, generated on first start.
    pub patient_ref_key_file: Option<PathBuf>,
    /// `[alert.identifiers]`: accession number, study, series and key-slice SOP Instance
    /// UIDs each `clear` (default), `hmac` or `omit` in published results.
    pub identifiers: IdentifierConfig,
    /// Port of the embedded broker (127.0.0.1 only) used when `mqtt_url` is unset.
    pub embedded_broker_port: u16,
    /// On shutdown, how long to wait for the broker to acknowledge what is left.
    pub shutdown_drain_secs: f64,
    /// How often the retained `status` is checked for changed key figures (queue depths,
    /// stuck stages, last result) and re-published when they changed.
    pub status_interval_secs: f64,
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
            protocol: MqttProtocol::V311,
            message_expiry_secs: None,
            reconnect_min_secs: 0.5,
            reconnect_max_secs: 30.0,
            outbox_dir: PathBuf::from("/var/lib/cspine-triage/outbox"),
            outbox_max_entries: OutboxLimits::default().max_entries,
            outbox_max_bytes: OutboxLimits::default().max_bytes,
            patient_ref: PatientRefMode::Pseudonymised,
            patient_ref_key_file: None,
            identifiers: IdentifierConfig::default(),
            embedded_broker_port: 1883,
            shutdown_drain_secs: 5.0,
            status_interval_secs: 30.0,
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
            self.message_expiry_secs.is_none() || self.protocol == MqttProtocol::V5,
            "alert.message_expiry_secs needs alert.protocol = \"5\" (MQTT 3.1.1 has no expiry)"
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
        ensure!(
            self.status_interval_secs >= 0.5 && self.status_interval_secs.is_finite(),
            "alert.status_interval_secs must be at least 0.5"
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
        Ok(self.password.as_ref().map(|p| p.expose().to_owned()))
    }

    /// The configured broker when credentials would cross the network in clear text:
    /// `alert.username` set (so the password is sent) and a plain `mqtt://` URL to a
    /// host other than loopback.
    pub fn cleartext_credentials(&self) -> Option<BrokerUrl> {
        let url = BrokerUrl::parse(self.mqtt_url.as_deref()?).ok()?;
        (self.username.is_some() && !url.tls && !url.is_loopback()).then_some(url)
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
    identifiers: Identifiers,
    url: BrokerUrl,
    broker: Option<EmbeddedBroker>,
    /// Which results get DICOM result objects (`[report]`); the default unless
    /// [`Alerts::with_report`] says otherwise.
    report: ReportConfig,
    /// Where DICOM result objects go ([`Alerts::with_pacs`]); none are built without it.
    pacs: Option<Delivery>,
    events: crate::events::Events,
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
        let identifiers = Identifiers::load(
            config.identifiers,
            config.patient_ref_key_file.as_deref(),
            &config.default_patient_ref_key_file(),
        )?;
        // Read credentials and certificates now so a typo fails the start, not the first
        // connection attempt.
        config.password()?;
        let (url, broker) = match &config.mqtt_url {
            Some(url) => (BrokerUrl::parse(url)?, None),
            None => {
                let login = match &config.username {
                    Some(user) => config.password()?.map(|pass| (user.clone(), pass)),
                    None => None,
                };
                let broker = EmbeddedBroker::start_with_login(config.embedded_broker_port, login)?;
                (BrokerUrl::parse(&broker.url())?, Some(broker))
            }
        };
        mqtt::wire_options(config, &url, &StatusInfo::new(None))?;
        Ok(Alerts {
            config: config.clone(),
            outbox,
            refs,
            identifiers,
            url,
            broker,
            report: ReportConfig::default(),
            pacs: None,
            events: Default::default(),
        })
    }

    /// Uses `report` (`[report]`) to decide which results get DICOM result objects.
    pub fn with_report(mut self, report: ReportConfig) -> Alerts {
        self.report = report;
        self
    }

    /// Queues the DICOM result objects of every result `[report]` selects for `delivery`
    /// (the PACS destinations). Without it no objects are built.
    pub fn with_pacs(mut self, delivery: Option<Delivery>) -> Alerts {
        self.pacs = delivery;
        self
    }

    /// The DICOM result objects of `message` when a PACS is configured and
    /// `[report].objects` selects it; none when not, or when they cannot be built (logged:
    /// the result is published anyway).
    fn build_dicom_objects(&self, message: &ResultMessage) -> Vec<ResultObject> {
        if self.pacs.is_none() || !self.report.selects(message.result.status) {
            return Vec::new();
        }
        match report::build_result_objects(message, &self.report) {
            Ok(objects) => objects,
            Err(e) => {
                log::error!(
                    "result {} (series {}): no DICOM result objects: {e}",
                    message.result.id,
                    crate::dicom::peer_text::peer_str(&message.result.series_instance_uid)
                );
                Vec::new()
            }
        }
    }

    /// Records analyses, commits, deliveries and the outbox depth in `events`, and puts
    /// its key figures in the retained status.
    pub fn with_events(mut self, events: crate::events::Events) -> Alerts {
        self.events = events;
        self
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

    /// Durably queues `objects` for the PACS destinations (blocking file I/O, off the
    /// runtime's threads). A write that fails (a full disk) is retried every second, beating
    /// the heartbeat, so objects are never dropped; an object that fails its own checks is
    /// an error in its builder, logged and not retried.
    async fn queue_for_pacs(&self, heartbeat: &Heartbeat, id: &str, objects: Vec<ResultObject>) {
        let Some(delivery) = &self.pacs else { return };
        if objects.is_empty() {
            return;
        }
        let objects = Arc::new(objects);
        loop {
            let (d, o) = (delivery.clone(), objects.clone());
            let outcome = tokio::task::spawn_blocking(move || d.enqueue(&o)).await;
            match outcome {
                Ok(Ok(())) => return,
                Ok(Err(e @ crate::pacs::PacsError::InvalidObject { .. })) => {
                    log::error!("result {id}: DICOM result objects not queued for PACS: {e}");
                    return;
                }
                Ok(Err(e)) => log::error!(
                    "result {id}: cannot queue the DICOM result objects for PACS, retrying: {e}"
                ),
                Err(e) => log::error!("result {id}: PACS queueing task failed, retrying: {e}"),
            }
            heartbeat.beat();
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    /// Commits every message from `rx` and publishes the outbox until `rx` is closed (all
    /// senders dropped); then drains for up to `shutdown_drain_secs` and says offline.
    /// When the outbox is full, `rx` is not read: upstream waits (backpressure).
    /// `heartbeat` beats while waiting for results and while a commit is retried.
    pub async fn run(
        self,
        heartbeat: Heartbeat,
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
            self.events.clone(),
        ));

        while let Some(message) = heartbeat.recv(&mut rx).await {
            // Built before the commit, so that the committed result names them.
            let dicom_objects_for_pacs = self.build_dicom_objects(&message);
            let ResultMessage {
                mut result,
                patient_id,
                key_image_png,
                sop_instance_uids,
                failed_better,
                source: _,
            } = message;
            result.dicom_objects = dicom_objects_for_pacs
                .iter()
                .map(report::object_ref)
                .collect();
            if !id_is_topic_safe(&result.id) {
                // Still published (never dropped); the key image topic replaces the
                // offending characters. An inference bug, not something to lose a result over.
                log::error!(
                    "result id {:?} (series {}) is not in the schema's form [A-Za-z0-9._:-]+",
                    result.id,
                    result.series_instance_uid
                );
            }
            result.schema = result::SCHEMA_V1.to_owned();
            result.patient_ref = self.refs.reference(&patient_id);
            result.site = self.config.site.clone();
            result.device = self.config.device.clone();
            let positive = result.status == result::Status::Positive;
            let (id, study, series) = (
                result.id.clone(),
                result.study_instance_uid.clone(),
                result.series_instance_uid.clone(),
            );
            let status = result.status;
            let (analysed, inference_end) = (analysis_done(&result), result.timings.inference_end);
            let identifiers = self.identifiers.clone();
            // `published` is the moment of the (last) commit attempt: a full outbox may
            // make us wait, and the result must not claim an earlier time.
            let payload = move || {
                let mut result = result.clone();
                result.timings.published = Some(OffsetDateTime::now_utc());
                identifiers.to_json(&result)
            };
            let outcome = self
                .outbox
                .commit_waiting(&heartbeat, &id, positive, payload, key_image_png)
                .await;
            let already_queued = matches!(outcome, outbox::CommitOutcome::AlreadyQueued(_));
            self.events.emit(published_now(analysed, inference_end));
            self.events.emit(crate::events::Event::ResultCommitted {
                result_id: id.clone(),
                already_queued,
            });
            self.events.emit(outbox_depth(&self.outbox));
            // Journal fields (src/service/logging.rs), for `journalctl RESULT_ID=…`.
            let (f_id, f_study, f_series) = (id.as_str(), study.as_str(), series.as_str());
            if already_queued {
                log::info!(
                    result_id = f_id, study_instance_uid = f_study, series_instance_uid = f_series;
                    "result {id} (series {series}) is already waiting in the outbox; kept the \
                     queued one"
                );
            } else {
                log::info!(
                    result_id = f_id, study_instance_uid = f_study, series_instance_uid = f_series;
                    "result {id} ({status:?}, series {series}) committed to the outbox as \
                     entry {}",
                    outcome.seq()
                );
            }
            wake.notify_one();
            // After the commit and the MQTT wake-up, so publishing never waits for it; before
            // `Committed`, so the spool keeps the series (and a crash re-analyses it, giving
            // the same object UIDs) until the objects are durably queued.
            self.queue_for_pacs(&heartbeat, &id, dicom_objects_for_pacs)
                .await;
            if let Some(tx) = &committed {
                // The receiver going away is the caller's business, not a reason to stop.
                let _ = heartbeat
                    .send(
                        tx,
                        Committed {
                            id,
                            study_instance_uid: study,
                            series_instance_uid: series,
                            seq: outcome.seq(),
                            already_queued,
                            sop_instance_uids,
                            failed_better,
                        },
                    )
                    .await;
            }
        }
        // Input closed on purpose (shutdown): the drain below is bounded by its own timeout.
        heartbeat.finish();

        let _ = stop_tx.send(true);
        delivery.await.context("MQTT delivery task panicked")?
    }
}

/// `event` ([`analysis_done`]) with `inference_done_to_published_secs` counted up to now:
/// the commit, which `timings.published` records.
fn published_now(
    mut event: crate::events::Event,
    inference_end: Option<OffsetDateTime>,
) -> crate::events::Event {
    use crate::events::{Event, StageDurations};
    if let Event::AnalysisDone { durations, .. } = &mut event {
        durations.inference_done_to_published_secs =
            StageDurations::between(inference_end, Some(OffsetDateTime::now_utc()));
    }
    event
}

/// The event of a result received from inference (durations from its `timings`).
fn analysis_done(result: &result::TriageResult) -> crate::events::Event {
    use crate::events::StageDurations;
    let t = &result.timings;
    crate::events::Event::AnalysisDone {
        result_id: result.id.clone(),
        study_instance_uid: result.study_instance_uid.clone(),
        series_instance_uid: result.series_instance_uid.clone(),
        status: result.status.into(),
        instances: result.instances,
        durations: StageDurations {
            receive_to_complete_secs: StageDurations::between(
                t.first_instance_received,
                t.series_complete,
            ),
            complete_to_inference_done_secs: StageDurations::between(
                t.series_complete,
                t.inference_end,
            ),
            inference_done_to_published_secs: None,
        },
    }
}

/// The outbox's depth, as an event.
pub(crate) fn outbox_depth(outbox: &Outbox) -> crate::events::Event {
    crate::events::Event::OutboxDepth {
        entries: outbox.len(),
        bytes: outbox.bytes(),
    }
}

/// The schema's form for `id`, which is also an MQTT topic level (`keyimage/<id>`).
fn id_is_topic_safe(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// [`Alerts::open`] + [`Alerts::run`] in one call.
pub async fn run_alerts(
    config: AlertConfig,
    heartbeat: Heartbeat,
    status: StatusInfo,
    rx: mpsc::Receiver<ResultMessage>,
    committed: Option<mpsc::Sender<Committed>>,
) -> Result<()> {
    Alerts::open(&config)?
        .run(heartbeat, status, rx, committed)
        .await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::process::Command;

    use super::*;
    use crate::result::*;

    fn at(s: &str) -> Option<OffsetDateTime> {
        Some(OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap())
    }

    fn full_result() -> TriageResult {
        let vertebrae = (1..=7)
            .map(|i| {
                let v = VertebraResult {
                    probability: if i == 2 { 0.87 } else { 0.02 },
                    flagged: i == 2,
                    z_range_mm: (i != 7)
                        .then_some([-120.0 + 18.0 * i as f64, -103.5 + 18.0 * i as f64]),
                    key_slice: (i == 2).then(|| KeySlice {
                        sop_instance_uid: "1.2.826.0.1.3680043.8.498.10.2.77".into(),
                        z_mm: -84.5,
                    }),
                };
                (format!("C{i}"), v)
            })
            .collect::<BTreeMap<_, _>>();
        TriageResult {
            schema: SCHEMA_V1.into(),
            id: "4f1c2a9e0b7d3c5a".into(),
            status: Status::Positive,
            reason: None,
            study_instance_uid: "1.2.826.0.1.3680043.8.498.10".into(),
            series_instance_uid: "1.2.826.0.1.3680043.8.498.10.2".into(),
            instances: 212,
            interpolated_gaps: Some(InterpolatedGaps {
                count: 1,
                largest_mm: 1.0,
            }),
            accession_number: "A123".into(),
            patient_ref: PatientRefs::with_key(b"0123456789abcdef0123".to_vec()).reference("P1"),
            vertebrae,
            not_covered: Some(Vec::new()),
            patient: Some(PatientResult {
                probability: 0.91,
                threshold: 0.5,
                flagged: true,
            }),
            key_slice: Some(KeySlice {
                sop_instance_uid: "1.2.826.0.1.3680043.8.498.10.2.77".into(),
                z_mm: -84.5,
            }),
            model: ModelInfo {
                name: "cspine".into(),
                version: "1.0.0".into(),
                sha256: "0f".repeat(32),
            },
            runtime: "cuda".into(),
            device: "ct1".into(),
            site: "st-mary".into(),
            timings: Timings {
                first_instance_received: at("2026-11-27T13:00:00Z"),
                last_instance_received: at("2026-11-27T13:00:04.5Z"),
                series_complete: at("2026-11-27T13:00:06Z"),
                inference_start: at("2026-11-27T13:00:06.01Z"),
                inference_end: at("2026-11-27T13:00:15.2Z"),
                published: at("2026-11-27T13:00:15.203Z"),
            },
            dicom_objects: Vec::new(),
        }
    }

    /// Validates each document with python3 jsonschema (draft 2020-12, formats checked);
    /// returns the validator's complaints per document (empty = valid).
    fn validate(docs: &[serde_json::Value]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut outcomes = Vec::new();
        for (i, doc) in docs.iter().enumerate() {
            let file = dir.path().join(format!("{i}.json"));
            std::fs::write(&file, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
            let out = Command::new("python3")
                .arg(repo.join("tests/python/alert_validate.py"))
                .arg(repo.join("docs/alert.schema.json"))
                .arg(&file)
                .output()
                .expect("python3 is needed to validate against the schema");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !stderr.contains("Traceback"),
                "validator failed (is python3-jsonschema installed?): {stderr}"
            );
            outcomes.push(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        outcomes
    }

    #[test]
    fn triage_results_validate_against_the_published_schema() {
        let mut positive = full_result();
        positive.dicom_objects = vec![DicomObjectRef {
            kind: DicomObjectKind::StructuredReport,
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.33".into(),
            sop_instance_uid: "2.25.1234".into(),
            series_instance_uid: "2.25.5678".into(),
        }];
        let mut failed = full_result();
        failed.status = Status::Failed;
        failed.reason = Some("series has 3 slices, at least 64 are needed".into());
        failed.vertebrae.clear();
        failed.patient = None;
        failed.key_slice = None;
        failed.study_instance_uid = String::new();
        failed.timings.inference_start = None;
        failed.timings.inference_end = None;
        failed.dicom_objects.clear();
        failed.not_covered = None;
        // A series covering C1-C3 only: those analysed, nothing flagged, not a negative.
        let mut partial = full_result();
        partial.status = Status::Indeterminate;
        partial.reason = Some("partial coverage: C4, C5, C6, C7 not in view".into());
        partial
            .vertebrae
            .retain(|name, _| ["C1", "C2", "C3"].contains(&name.as_str()));
        partial.not_covered = Some(["C4", "C5", "C6", "C7"].map(String::from).to_vec());
        partial.key_slice = None;
        let docs: Vec<_> = [&positive, &failed, &partial]
            .iter()
            .map(|r| serde_json::to_value(r).unwrap())
            .collect();
        for (doc, complaints) in docs.iter().zip(validate(&docs)) {
            assert!(complaints.is_empty(), "{complaints}\n{doc:#}");
        }

        // The schema is not vacuous: contract violations are caught.
        let mut no_reason = serde_json::to_value(&failed).unwrap();
        no_reason.as_object_mut().unwrap().remove("reason");
        let mut bad_vertebra = docs[0].clone();
        bad_vertebra["vertebrae"]["T1"] = bad_vertebra["vertebrae"]["C1"].clone();
        let mut bad_time = docs[0].clone();
        bad_time["timings"]["published"] = "yesterday".into();
        let mut extra = docs[0].clone();
        extra["surprise"] = 1.into();
        let mut bad_vertebra_key = docs[0].clone();
        bad_vertebra_key["vertebrae"]["C2"]["key_slice"] =
            serde_json::json!({ "sop_instance_uid": "1.2.3" });
        let mut no_instances = docs[0].clone();
        no_instances.as_object_mut().unwrap().remove("instances");
        let mut negative_instances = docs[0].clone();
        negative_instances["instances"] = (-1).into();
        let mut no_gap = docs[0].clone();
        no_gap["interpolated_gaps"]["count"] = 0.into();
        let mut gap_extra = docs[0].clone();
        gap_extra["interpolated_gaps"]["where"] = "C4".into();
        let mut bad_object = docs[0].clone();
        bad_object["dicom_objects"][0]["kind"] = "photo".into();
        let mut not_covered_t1 = docs[2].clone();
        not_covered_t1["not_covered"] = serde_json::json!(["C4", "T1"]);
        let mut not_covered_twice = docs[2].clone();
        not_covered_twice["not_covered"] = serde_json::json!(["C4", "C4"]);
        let mut negative_partial = docs[2].clone();
        negative_partial["status"] = "negative".into();
        negative_partial.as_object_mut().unwrap().remove("reason");
        let bad = [
            no_reason,
            bad_vertebra,
            bad_time,
            extra,
            bad_vertebra_key,
            no_instances,
            negative_instances,
            no_gap,
            gap_extra,
            bad_object,
            not_covered_t1,
            not_covered_twice,
            negative_partial,
        ];
        for (doc, complaints) in bad.iter().zip(validate(&bad)) {
            assert!(!complaints.is_empty(), "must be rejected:\n{doc:#}");
        }
    }

    #[test]
    fn config_defaults_validate_and_password_is_not_printed() {
        let mut config = AlertConfig::default();
        config.validate().unwrap();
        assert_eq!(config.effective_topic_prefix(), "cspine/site/cspine-1/");
        config.password = Some("hunter2".into());
        config.topic_prefix = Some("hospital/ct".into());
        assert_eq!(config.effective_topic_prefix(), "hospital/ct/");
        let text = toml::to_string(&config).unwrap();
        assert!(!text.contains("hunter2"));
        // Nor by `{:?}` (a panic message, a debug log line).
        for debug in [format!("{config:?}"), format!("{config:#?}")] {
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(debug.contains("<redacted>"), "{debug}");
        }
        assert_eq!(config.password().unwrap().as_deref(), Some("hunter2"));
        let parsed: AlertConfig = toml::from_str("password = \"s3cret\"").unwrap();
        assert_eq!(parsed.password().unwrap().as_deref(), Some("s3cret"));
        assert!(!format!("{parsed:?}").contains("s3cret"));
        config.site = "a/b".into();
        assert!(config.validate().is_err());
        let config = AlertConfig {
            mqtt_url: Some("http://x".into()),
            ..AlertConfig::default()
        };
        assert!(format!("{:#}", config.validate().unwrap_err()).contains("mqtt://"));
    }
}
