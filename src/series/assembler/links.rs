//! What connects the series stage to the spool and to inference in the daemon
//! ([`SpoolLinks`]): the slice window, build counting, the series restored at start-up,
//! releases out, feedback in, and the spool's free-space signal ([`ShortOfSpace`]).

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;

use super::job::{Feedback, Release};
use crate::dicom::spool::AnalysedSeries;
use crate::series::VolumeWindow;

/// What connects the series stage to the spool and to inference (the daemon's);
/// [`Default`]: nothing (instances are never released, jobs count as done once sent,
/// volumes are whole).
#[derive(Debug, Default)]
pub struct SpoolLinks {
    /// What inference needs of each slice ([`VolumeWindow`]): volumes keep only that.
    pub window: Option<VolumeWindow>,
    /// The spool, where each volume build is counted before it begins
    /// ([`AssemblyConfig::max_build_attempts`]); `None`: builds are not counted.
    pub spool_dir: Option<PathBuf>,
    /// Series the spool holds as analysed at start-up ([`crate::dicom::spool::recover`]):
    /// restored before any instance is read.
    pub analysed: Vec<AnalysedSeries>,
    /// Where spool files no longer needed go.
    pub releases: Option<mpsc::Sender<Release>>,
    /// What happened to the jobs sent (results committed). With it, a study is forgotten,
    /// and its spool files released, only once its results are committed.
    pub feedback: Option<mpsc::UnboundedReceiver<Feedback>>,
    /// Whether the spool is short of space now. While it is, finished studies are
    /// forgotten (their files released) oldest first, one per [`SPACE_CHECK`], before
    /// their retention is over: the SCP refuses instances below its free-space floor, and
    /// a new study matters more than keeping an analysed one for late instances.
    pub spool_short_of_space: Option<ShortOfSpace>,
    /// Where the stage records what happens to a series: assembled, re-opened, remembered
    /// ([`super::Assembler::take_events`]), its analysis started
    /// ([`super::SeriesJob::started_event`]), each outcome sent to inference
    /// ([`crate::series::SeriesOutcome::event`]), a study released early for space.
    pub events: crate::events::Events,
}

/// Answers whether the spool is short of space now ([`SpoolLinks::spool_short_of_space`]).
#[derive(Clone)]
pub struct ShortOfSpace(pub std::sync::Arc<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for ShortOfSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShortOfSpace(..)")
    }
}

/// How often the series stage asks [`SpoolLinks::spool_short_of_space`], and so how many
/// studies a second it releases early at most (the janitor deletes their files meanwhile).
pub const SPACE_CHECK: Duration = Duration::from_secs(1);
