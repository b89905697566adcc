//! The daemon: wires the stages with bounded channels, talks to systemd (notify,
//! watchdog, status) and reports health.

pub mod health;
pub mod notify;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// `[service]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// `[service.stall_secs]`: allowed time without progress per stage before the
    /// systemd watchdog pings stop (see [`health`]).
    pub stall_secs: health::StallSecs,
}

impl ServiceConfig {
    pub fn validate(&self) -> Result<()> {
        self.stall_secs.validate()?;
        Ok(())
    }
}

/// Runs the daemon until SIGTERM.
pub fn serve(_config: crate::config::Config) -> Result<()> {
    anyhow::bail!("serve is not implemented yet")
}
