//! What the assembler hands on and hears back: a [`SeriesJob`] (a series chosen for
//! volume building, with its fallbacks), why it was considered complete ([`Completion`]),
//! what happened to it downstream ([`Feedback`], [`DropReason`]), and the spool files it no
//! longer needs ([`Release`]).

use crate::events::{EarlyWithholdReason, Event, SeriesCompletion};
use crate::series::header::InstanceHeader;
use crate::series::{SeriesKey, SeriesMeta};

/// Why a series was considered complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    QuietPeriod,
    ExpectedCount,
    MaxWait,
    /// Restored after a restart from the spool's analysed mark.
    Restored,
    /// Not complete: an early analysis of the contiguous slab received so far (the
    /// anatomy-coverage trigger).
    AnatomyCoverage,
}

impl Completion {
    /// How the event stream names a completion as instances arrive; `None` for the ones
    /// that are not (restored, early).
    pub fn as_event(self) -> Option<SeriesCompletion> {
        match self {
            Completion::QuietPeriod => Some(SeriesCompletion::QuietPeriod),
            Completion::ExpectedCount => Some(SeriesCompletion::ExpectedCount),
            Completion::MaxWait => Some(SeriesCompletion::MaxWait),
            Completion::Restored | Completion::AnatomyCoverage => None,
        }
    }
}

/// A series chosen for volume building: its instances (headers, with their spool paths)
/// and identifying metadata.
#[derive(Debug, Clone)]
pub struct SeriesJob {
    pub meta: SeriesMeta,
    pub instances: Vec<InstanceHeader>,
    pub completion: Completion,
    /// Other candidate series of the study, best first: built only if this one cannot be
    /// (a gap, a corrupt slice), so that the study still gets a result.
    pub fallbacks: Vec<SeriesJob>,
}

impl SeriesJob {
    /// What the event stream records when this job goes to volume building.
    pub fn started_event(&self) -> Event {
        Event::AnalysisStarted {
            study_instance_uid: self.meta.study_instance_uid.clone(),
            series_instance_uid: self.meta.series_instance_uid.clone(),
            instances: self.instances.len(),
            fallback: false,
            early: self.completion == Completion::AnatomyCoverage,
        }
    }
}

/// Instance files the spool no longer needs to keep (see the module docs).
pub use crate::dicom::spool::Release;

/// What happened downstream to a job the assembler sent ([`Assembler::feedback`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Feedback {
    /// A result analysing these instances of the series is durably in the outbox (and the
    /// spool holds the series' analysed mark).
    Committed {
        series: SeriesKey,
        sop_instance_uids: Vec<String>,
    },
    /// A job of this series ended without a result.
    Dropped {
        series: SeriesKey,
        reason: DropReason,
    },
}

/// Why a job ended without a result ([`Feedback::Dropped`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DropReason {
    /// Volume building panicked (a bug): the panic's message.
    #[error("volume building panicked: {0}")]
    BuildPanicked(String),
    /// An early analysis (the anatomy-coverage trigger) that must not be published; the
    /// series is analysed again when it completes.
    #[error("early analysis not published: {0}")]
    EarlyWithheld(EarlyWithholdReason),
}

impl Feedback {
    /// The series it is about.
    pub fn series(&self) -> &SeriesKey {
        match self {
            Feedback::Committed { series, .. } | Feedback::Dropped { series, .. } => series,
        }
    }
}
