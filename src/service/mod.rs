//! The daemon: wires the stages with bounded channels, talks to systemd (notify,
//! watchdog, status) and reports health.

mod daemon;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod notify;

pub use daemon::serve;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// `[service]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// `[service.stall_secs]`: allowed time without progress per stage before the
    /// systemd watchdog pings stop (see [`health`]).
    pub stall_secs: health::StallSecs,
    /// Append the structured event stream (JSON lines: docs/events.schema.json) to this
    /// file. Unset (the default): no file.
    pub events_path: Option<std::path::PathBuf>,
}

impl ServiceConfig {
    pub fn validate(&self) -> Result<()> {
        self.stall_secs.validate()?;
        Ok(())
    }
}
