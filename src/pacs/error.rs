//! [`PacsError`]: why result objects could not be queued for delivery, or why the queue
//! could not be opened. Delivery failures themselves are not errors to the caller: they
//! are retried (or quarantined) by the senders.

use std::path::PathBuf;

/// What is wrong with a [`crate::report::ResultObject`] handed to `enqueue`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectProblem {
    /// A UID field is empty, longer than 64 characters or not digits and dots.
    #[error("{field} {value:?} is not a valid UID")]
    BadUid { field: &'static str, value: String },
    /// `part10` does not start with the 128-byte preamble and `DICM`.
    #[error("part10 is not a DICOM Part 10 file (no preamble and DICM prefix)")]
    NotPart10,
    /// `part10` does not parse as DICOM.
    #[error("part10 cannot be read as DICOM: {0}")]
    Unreadable(String),
    /// The file meta group names another SOP class or instance than the struct does.
    #[error("{field} is {in_struct} but the file meta group says {in_file}")]
    UidMismatch {
        field: &'static str,
        in_struct: String,
        in_file: String,
    },
}

/// Why [`super::Delivery::open`] or [`super::Delivery::enqueue`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PacsError {
    /// Nothing of the call was queued: the object is refused as it is.
    #[error("result object {sop_instance_uid} cannot be queued for PACS delivery: {problem}")]
    InvalidObject {
        sop_instance_uid: String,
        problem: ObjectProblem,
    },
    /// Writing or fsyncing an entry failed (disk full, read-only file system). Entries
    /// written before the failure stay queued; calling `enqueue` again is safe.
    #[error("cannot queue {sop_instance_uid} for PACS destination {destination}: {source:#}")]
    Write {
        destination: String,
        sop_instance_uid: String,
        source: anyhow::Error,
    },
    /// The queue directory cannot be created, locked or read.
    #[error("cannot open the PACS delivery queue {dir}: {source:#}")]
    Open { dir: PathBuf, source: anyhow::Error },
}
