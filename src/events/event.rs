//! The kinds of [`Event`], one variant per thing that happened, with their fields.

use serde::Serialize;

use super::reasons::{AnalysisStatus, AssociationRefusal, InstanceRefusal, StageDurations};

/// One thing that happened. Serialised with its kind in `event` (snake_case).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// An association was accepted (A-ASSOCIATE-AC sent).
    AssociationOpened { peer: String, calling_ae: String },
    /// A connection or association request was refused.
    AssociationRefused {
        peer: String,
        reason: AssociationRefusal,
    },
    /// An accepted association ended (released, aborted or closed).
    AssociationClosed {
        peer: String,
        calling_ae: String,
        stored: u64,
        duplicates: u64,
        failed: u64,
    },
    /// A C-STORE was answered with Success: the instance is durably in the spool
    /// (`duplicate`: it already was, nothing new was written).
    InstanceStored {
        calling_ae: String,
        sop_instance_uid: String,
        duplicate: bool,
    },
    /// A C-STORE was answered with a failure status.
    InstanceRefused {
        calling_ae: String,
        sop_instance_uid: String,
        reason: InstanceRefusal,
    },
    /// A series is complete and its volume built: it goes to inference.
    SeriesComplete {
        study_instance_uid: String,
        series_instance_uid: String,
        instances: usize,
    },
    /// A candidate series could not be built; it is published as a `failed` result.
    SeriesFailed {
        study_instance_uid: String,
        series_instance_uid: String,
        instances: usize,
        reason: String,
    },
    /// A series (or some of its instances) will not be analysed: not an axial CT volume,
    /// or the study was analysed with a better series.
    SeriesSkipped {
        study_instance_uid: String,
        series_instance_uid: String,
        instances: usize,
        reason: String,
    },
    /// Inference produced a result for a series (the alert stage received it).
    AnalysisDone {
        result_id: String,
        study_instance_uid: String,
        series_instance_uid: String,
        status: AnalysisStatus,
        instances: usize,
        durations: StageDurations,
    },
    /// The result is durably in the outbox (`already_queued`: an undelivered entry with
    /// the same id was there and was kept).
    ResultCommitted {
        result_id: String,
        already_queued: bool,
    },
    /// The broker acknowledged the result: it left the outbox.
    ResultPublished { result_id: String },
    /// The outbox changed (a commit or a delivery).
    OutboxDepth { entries: usize, bytes: u64 },
    /// A PACS destination stored a DICOM result object (Success or Warning): it left the
    /// destination's queue, `queued_to_delivered_secs` after it was queued.
    PacsObjectDelivered {
        destination: String,
        sop_instance_uid: String,
        queued_to_delivered_secs: Option<f64>,
    },
    /// A PACS destination refused a DICOM result object for good: moved to `rejected/`.
    PacsObjectRejected {
        destination: String,
        sop_instance_uid: String,
    },
}
