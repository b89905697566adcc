//! Building the volume of a [`SeriesJob`] (or of its first fallback that can be built),
//! with each attempt counted durably in the spool so that a series that keeps killing the
//! process is failed instead of built again.

use std::path::PathBuf;

use time::OffsetDateTime;

use super::job::SeriesJob;
use crate::series::load::build_best;
use crate::series::{FailReason, SeriesKey, SeriesOutcome, VolumeLimits, VolumeWindow};

/// Builds the volume of a job, or of its first fallback that can be built (blocking:
/// decodes every file); `window` and `limits` as in [`super::build_volume_within`].
pub fn build_job(
    job: SeriesJob,
    window: Option<&VolumeWindow>,
    limits: &VolumeLimits,
) -> SeriesOutcome {
    let completed = OffsetDateTime::now_utc();
    let SeriesJob {
        meta,
        instances,
        fallbacks,
        ..
    } = job;
    let ranked = std::iter::once((meta, instances))
        .chain(fallbacks.into_iter().map(|f| (f.meta, f.instances)))
        .map(|(mut meta, instances)| {
            meta.completed = Some(completed);
            (meta, instances)
        })
        .collect();
    build_best(ranked, window, limits)
}

/// Where and how the builder counts its attempts ([`crate::dicom::spool::begin_attempt`]).
#[derive(Debug, Clone)]
pub(super) struct BuildAttempts {
    pub(super) spool_dir: PathBuf,
    pub(super) max: u32,
}

/// [`build_job`], with its attempt recorded durably in the spool: a series whose earlier
/// builds killed the process `max` times is failed without building it again.
pub(super) fn build_recorded(
    job: SeriesJob,
    window: Option<&VolumeWindow>,
    limits: &VolumeLimits,
    attempts: Option<&BuildAttempts>,
) -> SeriesOutcome {
    use crate::dicom::spool::{begin_attempt, end_attempt};
    let Some(a) = attempts else {
        return build_job(job, window, limits);
    };
    let key = SeriesKey::new(&job.meta.study_instance_uid, &job.meta.series_instance_uid);
    let (study, series) = (&key.study, &key.series);
    match begin_attempt(&a.spool_dir, study, series) {
        Ok(earlier) if earlier >= a.max => {
            let mut meta = job.meta;
            meta.completed = Some(OffsetDateTime::now_utc());
            meta.set_instances(&job.instances);
            let reason = FailReason::NotBuiltAgain {
                stops: earlier,
                max_attempts: a.max,
            };
            log::error!(
                "series {} of study {study}: {reason}",
                series.escape_debug()
            );
            return SeriesOutcome::Failed { meta, reason };
        }
        Ok(_) => {}
        // Not fatal: the build runs uncounted.
        Err(e) => log::warn!(
            "cannot record the build of series {}: {e:#}",
            series.escape_debug()
        ),
    }
    let outcome = build_job(job, window, limits);
    if let Err(e) = end_attempt(&a.spool_dir, study, series) {
        log::warn!(
            "cannot record the end of the build of series {}: {e:#}",
            series.escape_debug()
        );
    }
    outcome
}
