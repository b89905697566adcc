//! The kinds of [`Event`], one variant per thing that happened, with their fields.

use serde::Serialize;

use super::early::EarlyWithholdKind;
use super::reasons::{
    AnalysisStatus, AssociationRefusal, CommitFailure, InstanceRefusal, MarkCause, ReleaseReason,
    SeriesCompletion, StageDurations,
};

/// One thing that happened. Serialised with its kind in `event` (snake_case).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The daemon is up: outbox and spool recovered, every stage started, the DICOM port
    /// open (emitted with `READY=1`).
    Ready,
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
    /// Every instance of a series seems to be in (`completion` says why): it waits for
    /// its study to be decided, or is compared with the series already chosen.
    SeriesAssembled {
        study_instance_uid: String,
        series_instance_uid: String,
        instances: usize,
        completion: SeriesCompletion,
    },
    /// An instance arrived for a series already assembled (late or corrected): the series
    /// waits for a quiet period again, and is analysed again with it.
    SeriesReopened {
        study_instance_uid: String,
        series_instance_uid: String,
        sop_instance_uid: String,
    },
    /// At start-up, a series the spool holds as analysed (its mark names `result_id`):
    /// remembered, not analysed again unless instances arrive.
    SeriesRemembered {
        study_instance_uid: String,
        series_instance_uid: String,
        instances: usize,
        result_id: String,
    },
    /// A series goes to volume building, the first step of its analysis (`fallback`: the
    /// better series of its study could not be built, this one was built instead; emitted
    /// once its volume is built, before its `series_complete`).
    AnalysisStarted {
        study_instance_uid: String,
        series_instance_uid: String,
        instances: usize,
        fallback: bool,
        /// An early analysis of the contiguous slab received so far (the anatomy-coverage
        /// trigger), not of a complete series.
        early: bool,
    },
    /// An early analysis (`early` above) was not published; the series is analysed again
    /// when it completes. `detail` is the reason's sentence.
    EarlyAnalysisWithheld {
        study_instance_uid: String,
        series_instance_uid: String,
        instances: usize,
        reason: EarlyWithholdKind,
        detail: String,
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
    /// Inference takes a built volume.
    InferenceStarted {
        study_instance_uid: String,
        series_instance_uid: String,
        instances: usize,
    },
    /// The model ran on a series' `model_slices` (the verdict, key image and DICOM
    /// objects follow, then the outbox commit).
    InferenceDone {
        study_instance_uid: String,
        series_instance_uid: String,
        model_slices: usize,
        preprocess_secs: f64,
        model_secs: f64,
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
    /// A result could not be written to the outbox (`reason`); the commit is tried again
    /// in `retry_in_secs`, and everything upstream waits meanwhile.
    OutboxCommitRetry {
        result_id: String,
        reason: CommitFailure,
        retry_in_secs: f64,
    },
    /// At start-up the outbox holds `pending` results of a previous run, not yet
    /// acknowledged by the broker: they are published first.
    OutboxReplay { pending: usize },
    /// The broker acknowledged the result: it left the outbox.
    ResultPublished { result_id: String },
    /// Connected to the MQTT broker, after `failed_attempts` failed ones.
    BrokerConnected { failed_attempts: u32 },
    /// The connection to the MQTT broker failed (`was_connected`: it was up and was lost);
    /// the next attempt is in `retry_in_secs`. Results wait in the outbox meanwhile.
    BrokerConnectionFailed {
        was_connected: bool,
        retry_in_secs: f64,
    },
    /// The spool wrote the analysed mark of a series (`instances`: the SOP Instance UIDs
    /// it marked; 0 when the series is no longer in the spool): the series is remembered
    /// as analysed by `result_id` after a restart.
    SeriesMarked {
        study_instance_uid: String,
        series_instance_uid: String,
        result_id: String,
        instances: usize,
        cause: MarkCause,
    },
    /// The analysed mark of a series could not be written (the result is committed all
    /// the same; after a restart the series is analysed again, under the same id).
    SeriesMarkFailed {
        study_instance_uid: String,
        series_instance_uid: String,
        result_id: String,
        cause: MarkCause,
    },
    /// `instances` files of a series were removed from the spool.
    SpoolReleased {
        study_instance_uid: String,
        series_instance_uid: String,
        instances: usize,
        reason: ReleaseReason,
    },
    /// The spool is short of space (below twice `dicom.min_free_space_mb`): this analysed
    /// study is forgotten, and its files released, before its retention is over.
    SpoolShortOfSpace { study_instance_uid: String },
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
