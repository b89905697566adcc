//! What the stage reports on its `committed` channel once a result is durably in the
//! outbox ([`Committed`]), and its conversion into the spool's [`MarkRequest`].
//!
//! [`MarkRequest`]: crate::dicom::spool::MarkRequest

use crate::series::FailedSeries;

impl From<Committed> for crate::dicom::spool::MarkRequest {
    fn from(c: Committed) -> Self {
        crate::dicom::spool::MarkRequest {
            study_instance_uid: c.study_instance_uid,
            series_instance_uid: c.series_instance_uid,
            result_id: c.id,
            sop_instance_uids: c.sop_instance_uids,
            stood_in_for: c
                .failed_better
                .into_iter()
                .map(|f| crate::dicom::spool::StoodInFor {
                    series_instance_uid: f.series_instance_uid,
                    sop_instance_uids: f.sop_instance_uids,
                    reason: f.reason,
                })
                .collect(),
        }
    }
}

/// Sent on the `committed` channel of [`Alerts::run`](super::Alerts::run) once a result is
/// durably in the outbox: the DICOM spool of `series_instance_uid` is no longer needed for
/// delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub id: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    /// Outbox sequence number.
    pub seq: u64,
    /// An undelivered entry with the same id was already in the outbox and was kept.
    pub already_queued: bool,
    /// The instances the result analysed
    /// ([`ResultMessage::sop_instance_uids`](crate::result::ResultMessage::sop_instance_uids)).
    pub sop_instance_uids: Vec<String>,
    /// [`ResultMessage::failed_better`](crate::result::ResultMessage::failed_better).
    pub failed_better: Vec<FailedSeries>,
}
