//! What a store request is and how it can fail: [`InstanceHeader`] (what the SCP knows
//! about an instance before its data set arrives) and [`StoreError`] (why an instance was
//! not stored, one C-STORE status each). Shared by [`super::store`], [`super::incoming`]
//! and [`super::instance`], which therefore need not import each other for them.

use time::OffsetDateTime;

/// Why an instance was not stored; each maps to one C-STORE status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data set cannot be parsed (C000).
    #[error("cannot understand the data set: {0}")]
    CannotUnderstand(String),
    /// The data set does not match the command (A900).
    #[error("data set does not match the request: {0}")]
    Mismatch(String),
    /// Larger than `dicom.max_instance_mb` (A700).
    #[error("out of resources: the instance is larger than dicom.max_instance_mb = {limit_mb} MB")]
    TooLarge { limit_mb: u64 },
    /// Storing it would leave the spool below `dicom.min_free_space_mb` (A700).
    #[error(
        "out of resources: the spool has {free_mb} MB free, storing this instance would take \
         it below dicom.min_free_space_mb = {floor_mb} MB"
    )]
    ShortOfSpace { free_mb: u64, floor_mb: u64 },
    /// Disk full, I/O error (A700).
    #[error("out of resources: {0:#}")]
    OutOfResources(anyhow::Error),
}

/// What the SCP knows about an instance before its data set arrives.
#[derive(Debug, Clone)]
pub struct InstanceHeader {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub calling_ae: String,
    pub received_at: OffsetDateTime,
}
