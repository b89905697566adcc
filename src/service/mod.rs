//! The daemon: wires the stages with bounded channels, talks to systemd (notify,
//! watchdog, status) and reports health.

pub mod health;
pub mod notify;

use anyhow::{Context, Result};
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
///
/// TEMPORARY (ingest branch): only the DICOM SCP runs; stored instances are logged.
/// The lead replaces this with the full pipeline wiring.
pub fn serve(config: crate::config::Config) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let recovered = crate::dicom::spool::reindex(&config.dicom.spool_dir)?;
        for i in &recovered {
            log::info!(
                "recovered from spool: {} (series {}, from {})",
                i.path.display(),
                i.series_instance_uid,
                i.calling_ae
            );
        }
        let scp = crate::dicom::Scp::bind(config.dicom.clone()).await?;
        log::info!(
            "DICOM SCP {} listening on {} (spool {})",
            config.dicom.ae_title,
            scp.local_addr()?,
            config.dicom.spool_dir.display()
        );
        let (tx, mut rx) = tokio::sync::mpsc::channel(256);
        let scp_task = tokio::spawn(scp.run(tx));
        let log_task = tokio::spawn(async move {
            while let Some(i) = rx.recv().await {
                log::info!(
                    "stored {} (series {}, from {})",
                    i.path.display(),
                    i.series_instance_uid,
                    i.calling_ae
                );
            }
        });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = scp_task => r.context("SCP task failed")??,
            _ = term.recv() => log::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => log::info!("interrupted: stopping"),
        }
        log_task.abort();
        Ok(())
    })
}
