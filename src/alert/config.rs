//! The `[alert]` section ([`AlertConfig`]): its defaults, its checks, and what is derived
//! from it (topic prefix, client id, password, outbox limits, key file).

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::broker_url::BrokerUrl;
use super::identifiers::IdentifierConfig;
use super::outbox::OutboxLimits;
use super::patient_ref::PatientRefMode;
use super::secret::Secret;
use super::wire::MqttProtocol;

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
