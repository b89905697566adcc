//! Alerts: the versioned result schema, the durable outbox and MQTT delivery.

pub mod result;
pub mod watch;

use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};

pub use result::TriageResult;

/// `[alert]` section: where results go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertConfig {
    /// Broker URL (`mqtt://host:port`, `mqtts://host:port`). Unset: an embedded broker is started.
    pub mqtt_url: Option<String>,
    /// Site and device names, used in topics and results.
    pub site: String,
    pub device: String,
    /// Durable outbox directory (results are fsynced here before publishing).
    pub outbox_dir: PathBuf,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            mqtt_url: None,
            site: "site".into(),
            device: "cspine-1".into(),
            outbox_dir: PathBuf::from("/var/lib/cspine-triage/outbox"),
        }
    }
}

impl AlertConfig {
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}
