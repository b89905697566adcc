//! The typed reasons and values that [`super::Event`]s carry: why something was refused,
//! a result's status, the durations between a result's milestones.

use serde::Serialize;
use time::OffsetDateTime;

/// Why a connection or association was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AssociationRefusal {
    /// `dicom.max_associations` associations were open.
    AllSlots,
    /// The peer's address had all the associations it may have.
    ThisAddress,
    /// Every `dicom.allowed_calling_aes` entry is pinned to another address: closed at
    /// accept.
    AddressNotAllowed,
    /// A-ASSOCIATE-RJ after negotiation (AE titles, allow-list, no usable context).
    Rejected,
    /// The request was invalid or did not come in time.
    InvalidRequest,
}

/// Why a C-STORE was refused (the DIMSE status class in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceRefusal {
    /// The data set cannot be parsed (C000).
    CannotUnderstand,
    /// The data set does not match the command (A900).
    Mismatch,
    /// Larger than `dicom.max_instance_mb` (A700).
    TooLarge,
    /// Storing it would take the spool below `dicom.min_free_space_mb` (A700).
    ShortOfSpace,
    /// Disk full, I/O error (A700).
    OutOfResources,
    /// Refused before its data set was stored: SOP class or context not served, bad
    /// command (the SCP drains it and answers with a failure status). A spool already
    /// below its floor when the command arrives is `short_of_space`, not this.
    NotAccepted,
}

/// A result's status (mirrors `result::Status`, which sits above this module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AnalysisStatus {
    Positive,
    Negative,
    Indeterminate,
    Failed,
}

impl AnalysisStatus {
    /// The status as the result's `status` field spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            AnalysisStatus::Positive => "positive",
            AnalysisStatus::Negative => "negative",
            AnalysisStatus::Indeterminate => "indeterminate",
            AnalysisStatus::Failed => "failed",
        }
    }
}

/// Why a series was taken as assembled ([`super::Event::SeriesAssembled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SeriesCompletion {
    /// `series.quiet_period_secs` without a new instance.
    QuietPeriod,
    /// Its expected instance count was reached (an `expected_count` rule, or Images in
    /// Acquisition).
    ExpectedCount,
    /// `series.max_wait_secs` after its first instance.
    MaxWait,
}

/// Why the spool wrote a series' analysed mark ([`super::Event::SeriesMarked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkCause {
    /// The series' result was committed to the outbox.
    ResultCommitted,
    /// The series could not be built; the committed result of its fallback series stands
    /// in for it.
    FallbackResult,
    /// At start-up: its result waits in the outbox, but the series was not marked (a
    /// crash between the commit and the mark).
    WaitingInOutbox,
}

/// Why files left the spool ([`super::Event::SpoolReleased`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// Instances that can never be analysed (not CT image storage, a localizer, ...).
    NotAnalysable,
    /// An instance sent again after it was released as not analysable.
    ReceivedAgain,
    /// The study was forgotten (`series.completed_retention_secs` after its last
    /// instance, its results committed): the series' analysed mark goes too.
    StudyForgotten,
}

impl ReleaseReason {
    /// Whether the series is forgotten with its files (its analysed mark removed too).
    pub fn forgets(self) -> bool {
        self == ReleaseReason::StudyForgotten
    }
}

impl std::fmt::Display for ReleaseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReleaseReason::NotAnalysable => "not analysable",
            ReleaseReason::ReceivedAgain => "received again after its release",
            ReleaseReason::StudyForgotten => "study forgotten",
        })
    }
}

/// Why a result could not be written to the outbox ([`super::Event::OutboxCommitRetry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitFailure {
    /// The outbox's file system is full (ENOSPC) or over quota.
    NoSpace,
    /// Another I/O error (a read-only file system, a failing disk, ...).
    Io,
}

impl CommitFailure {
    /// `NoSpace` when an [`std::io::Error`] in `error`'s chain says the disk is full.
    pub fn of(error: &anyhow::Error) -> CommitFailure {
        use std::io::ErrorKind;
        let full = error.chain().any(|e| {
            e.downcast_ref::<std::io::Error>().is_some_and(|e| {
                matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
            })
        });
        if full {
            CommitFailure::NoSpace
        } else {
            CommitFailure::Io
        }
    }
}

/// Seconds spent between the pipeline's milestones of one result (from its `timings`);
/// `None` where a milestone is missing (e.g. a failed series never reached inference).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StageDurations {
    /// First instance received → series complete.
    pub receive_to_complete_secs: Option<f64>,
    /// Series complete → inference done.
    pub complete_to_inference_done_secs: Option<f64>,
    /// Inference done → committed to the outbox and first sent (`timings.published`).
    pub inference_done_to_published_secs: Option<f64>,
}

impl StageDurations {
    /// Seconds from `from` to `to`, when both are known and in order.
    pub fn between(from: Option<OffsetDateTime>, to: Option<OffsetDateTime>) -> Option<f64> {
        let secs = (to? - from?).as_seconds_f64();
        (secs >= 0.0).then_some(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_anywhere_in_the_chain_is_no_space() {
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let err = anyhow::Error::from(full).context("cannot write outbox entry");
        assert_eq!(CommitFailure::of(&err), CommitFailure::NoSpace);
        let other =
            anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::ReadOnlyFilesystem));
        assert_eq!(CommitFailure::of(&other), CommitFailure::Io);
        assert_eq!(
            CommitFailure::of(&anyhow::anyhow!("task failed")),
            CommitFailure::Io
        );
    }

    #[test]
    fn durations_need_both_ends_in_order() {
        let t = OffsetDateTime::UNIX_EPOCH;
        let later = t + time::Duration::seconds(3);
        assert_eq!(StageDurations::between(Some(t), Some(later)), Some(3.0));
        assert_eq!(StageDurations::between(Some(later), Some(t)), None);
        assert_eq!(StageDurations::between(None, Some(t)), None);
    }
}
