//! The daemon's configuration: one TOML file, one section per stage.
//!
//! Each stage owns the struct of its own section (next to the code that reads it);
//! this module only composes them, loads the file and validates the whole.

use std::fmt;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{alert, dicom, inference, pacs, report, series, service};

/// Effective configuration of `cspine-triage serve`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub dicom: dicom::ScpConfig,
    pub series: series::AssemblyConfig,
    pub inference: inference::InferenceConfig,
    pub alert: alert::AlertConfig,
    pub service: service::ServiceConfig,
    pub pacs: pacs::PacsConfig,
    /// `[report]`: DICOM result objects for PACS ([`report::ReportConfig`]).
    pub report: report::ReportConfig,
    pub metrics: service::metrics::MetricsConfig,
}

impl Config {
    /// Reads and validates a TOML file. Unknown keys are errors: a typo must not
    /// silently fall back to a default on a hospital box.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        config
            .validate()
            .with_context(|| format!("invalid config file {}", path.display()))?;
        Ok(config)
    }

    /// Checks every section; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        self.dicom.validate()?;
        self.series.validate()?;
        self.inference.validate()?;
        self.alert.validate()?;
        self.service.validate()?;
        self.pacs.validate()?;
        self.report.validate()?;
        self.metrics.validate()?;
        Ok(())
    }

    /// Settings that work but expose something; `serve` and `check-config` log each one.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        let mut warnings = Vec::new();
        if let Some(url) = self.alert.cleartext_credentials() {
            warnings.push(ConfigWarning::CleartextMqttCredentials {
                url: url.to_string(),
            });
        }
        let bind = self.dicom.bind.as_str();
        let loopback = bind.eq_ignore_ascii_case("localhost")
            || bind
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if self.dicom.allowed_calling_aes.is_empty() && !loopback {
            warnings.push(ConfigWarning::OpenDicomPort {
                bind: bind.to_owned(),
            });
        }
        if self.metrics.is_remote() {
            warnings.push(ConfigWarning::RemoteMetrics {
                listen: self.metrics.listen.clone(),
            });
        }
        warnings
    }

    /// The effective configuration as TOML, as `check-config` prints it.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

/// A configuration that is valid but exposes something (see [`Config::warnings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigWarning {
    /// `alert.username` is set and `alert.mqtt_url` is plain `mqtt://` to a host other
    /// than loopback: the username and password cross the network in clear text.
    CleartextMqttCredentials { url: String },
    /// `dicom.allowed_calling_aes` is empty and `dicom.bind` is not loopback: any host
    /// that reaches the port may store instances, under any calling AE title.
    OpenDicomPort { bind: String },
    /// `metrics.listen` is not loopback (`metrics.allow_remote = true`): anyone who
    /// reaches it reads the metrics, without authentication.
    RemoteMetrics { listen: String },
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigWarning::CleartextMqttCredentials { url } => write!(
                f,
                "alert.username is set and alert.mqtt_url is {url}: the MQTT username and \
                 password travel unencrypted; use mqtts:// (or a loopback broker)"
            ),
            ConfigWarning::OpenDicomPort { bind } => write!(
                f,
                "dicom.allowed_calling_aes is empty and dicom.bind is {bind}: any host that \
                 reaches the port may send instances; list the scanners' AE titles (and \
                 addresses)"
            ),
            ConfigWarning::RemoteMetrics { listen } => write!(
                f,
                "metrics.listen is {listen}: the metrics endpoint has no authentication; \
                 keep it on a management network"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_for_cleartext_credentials_and_an_open_dicom_port() {
        let mut config = Config::default();
        // Defaults: embedded broker, DICOM on every interface without an allow-list.
        assert_eq!(
            config.warnings(),
            [ConfigWarning::OpenDicomPort {
                bind: "0.0.0.0".into()
            }]
        );
        config.dicom.allowed_calling_aes = vec!["CT1@10.0.0.5".into()];
        config.alert.username = Some("cspine".into());
        config.alert.mqtt_url = Some("mqtt://broker.example:1883".into());
        assert_eq!(
            config.warnings(),
            [ConfigWarning::CleartextMqttCredentials {
                url: "mqtt://broker.example:1883".into()
            }]
        );
        for quiet in [
            "mqtts://broker.example",
            "mqtt://127.0.0.1",
            "mqtt://[::1]:1883",
        ] {
            config.alert.mqtt_url = Some(quiet.into());
            assert!(config.warnings().is_empty(), "{quiet}");
        }
        config.alert.mqtt_url = Some("mqtt://broker.example".into());
        config.alert.username = None;
        config.dicom.allowed_calling_aes.clear();
        config.dicom.bind = "127.0.0.1".into();
        assert!(config.warnings().is_empty());
        config.metrics.enabled = true;
        config.metrics.listen = "0.0.0.0:9464".into();
        config.metrics.allow_remote = true;
        assert_eq!(
            config.warnings(),
            [ConfigWarning::RemoteMetrics {
                listen: "0.0.0.0:9464".into()
            }]
        );
    }

    #[test]
    fn pacs_destinations_parse_validate_and_print_back() {
        let text = r#"
[dicom]
ae_title = "CSPINE"

[pacs]
queue_dir = "/var/lib/cspine-triage/pacs"

[[pacs.destinations]]
name = "main-pacs"
ae_title = "PACS"
host = "pacs.example"
port = 104
"#;
        let config: Config = toml::from_str(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.pacs.destinations[0].calling_ae("CSPINE"), "CSPINE");
        let again: Config = toml::from_str(&config.to_toml().unwrap()).unwrap();
        assert_eq!(again.pacs, config.pacs);

        let bad: Config = toml::from_str(&text.replace("port = 104", "port = 0")).unwrap();
        let err = format!("{:#}", bad.validate().unwrap_err());
        assert!(err.contains("pacs.destinations[0]"), "{err}");
        assert!(Config::default().pacs.destinations.is_empty());
    }
}
