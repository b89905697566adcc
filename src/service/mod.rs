//! The daemon: wires the stages with bounded channels, talks to systemd (notify,
//! watchdog, status) and reports health.

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// `[service]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {}

impl ServiceConfig {
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// Runs the daemon until SIGTERM.
pub fn serve(_config: crate::config::Config) -> Result<()> {
    anyhow::bail!("serve is not implemented yet")
}
