//! DICOM ingest: association handling (C-ECHO / C-STORE SCP) and the durable spool.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// `[dicom]` section: the Storage SCP and its spool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScpConfig {
    /// Our AE title; associations calling another title are rejected.
    pub ae_title: String,
    /// Address and port to listen on.
    pub bind: String,
    pub port: u16,
    /// Directory of the durable spool (instances are fsynced here before Success).
    pub spool_dir: PathBuf,
}

impl Default for ScpConfig {
    fn default() -> Self {
        ScpConfig {
            ae_title: "CSPINE".into(),
            bind: "0.0.0.0".into(),
            port: 11112,
            spool_dir: PathBuf::from("/var/lib/cspine-triage/spool"),
        }
    }
}

impl ScpConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.ae_title.is_empty() && self.ae_title.len() <= 16,
            "dicom.ae_title must be 1 to 16 characters, got {:?}",
            self.ae_title
        );
        Ok(())
    }
}

/// Message from the SCP (or the spool re-index at start-up) to the series assembler:
/// one instance that is durably on disk.
#[derive(Debug, Clone)]
pub struct StoredInstance {
    /// Path of the instance file in the spool (a DICOM Part 10 file).
    pub path: PathBuf,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    /// Calling AE title of the association that sent it.
    pub calling_ae: String,
    pub received_at: OffsetDateTime,
}
pub mod scu;
