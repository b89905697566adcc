//! The anatomy-coverage trigger ([`crate::series::AssemblyConfig::anatomy_coverage_trigger`]):
//! while a series is still arriving, an early job for the contiguous slab received so far,
//! when it is long enough and its series is the study's best candidate so far.

use std::time::{Duration, Instant};

use super::job::{Completion, SeriesJob};
use super::state::{make_job, secs, SeriesState, StudyState};
use crate::series::header::InstanceHeader;
use crate::series::selection::{contiguous_slab, filter_series, rank_key, CandidateSummary};
use crate::series::{AssemblyConfig, EarlyCheck};

/// The anatomy-coverage trigger looks at a growing series' slab at most this often (the
/// slab is cheap to measure; the model runs at most every `coverage_check_secs`).
const SLAB_CHECK_SECS: f64 = 0.25;

impl SeriesState {
    /// Whether the anatomy-coverage trigger may check this series now: still arriving,
    /// no result yet, no early analysis in flight, grown since the last check, and the
    /// last check at least `interval` ago.
    pub(super) fn early_due(&self, now: Instant, interval: Duration) -> bool {
        self.early_pending() && self.early_next(interval).is_none_or(|t| now >= t)
    }

    /// When the next check may run: [`SLAB_CHECK_SECS`] after the last check and
    /// `interval` after the last early analysis.
    pub(super) fn early_next(&self, interval: Duration) -> Option<Instant> {
        let check = self.early_checked_at.map(|t| t + secs(SLAB_CHECK_SECS));
        let analysis = self.early_sent_at.map(|t| t + interval);
        check.max(analysis)
    }

    /// [`SeriesState::early_due`] but for the time.
    pub(super) fn early_pending(&self) -> bool {
        self.completion.is_none()
            && self.analysed.is_empty()
            && !self.early_in_flight
            && self.instances.len() > self.early_checked_n
    }
}

/// The anatomy-coverage trigger ([`AssemblyConfig::anatomy_coverage_trigger`]) on one
/// study: an early job for its best candidate series so far, if that series is due for a
/// check and its contiguous slab is at least `min_coverage_mm` long and grew since the
/// last early analysis.
pub(super) fn early_job(
    study_uid: &str,
    study: &mut StudyState,
    now: Instant,
    config: &AssemblyConfig,
    feedback: bool,
) -> Option<SeriesJob> {
    let interval = secs(config.coverage_check_secs);
    let mut any_due = false;
    for series in study.series.values_mut() {
        if series.early_due(now, interval) {
            series.early_checked_at = Some(now);
            series.early_checked_n = series.instances.len();
            any_due = true;
        }
    }
    if !any_due {
        return None;
    }
    // The study's best candidate so far (the chosen series of a decided study counts).
    let mut best: Option<(CandidateSummary, Vec<InstanceHeader>)> = None;
    for (uid, series) in &study.series {
        let (accepted, _) = filter_series(series.instances.clone());
        if accepted.is_empty() {
            continue;
        }
        let refs: Vec<&InstanceHeader> = accepted.iter().collect();
        let summary = CandidateSummary::from_headers(uid, &refs, &config.bone_kernels);
        if best
            .as_ref()
            .is_none_or(|(b, _)| rank_key(&summary, b) == std::cmp::Ordering::Less)
        {
            best = Some((summary, accepted));
        }
    }
    let (summary, accepted) = best?;
    if let Some(chosen) = &study.chosen {
        if chosen.series_instance_uid != summary.series_instance_uid
            && rank_key(chosen, &summary) != std::cmp::Ordering::Greater
        {
            return None;
        }
    }
    let series_uid = summary.series_instance_uid.clone();
    let series = study
        .series
        .get_mut(&series_uid)
        .expect("a series of the study");
    if series.completion.is_some()
        || !series.analysed.is_empty()
        || series.early_in_flight
        || series.early_checked_at != Some(now)
    {
        return None;
    }
    let (slab, length_mm) = contiguous_slab(&accepted);
    if length_mm < config.min_coverage_mm || slab.len() <= series.early_slab {
        return None;
    }
    // Quiet for half its quiet period already: it completes soon, and the whole series
    // is analysed then; an early analysis now would only delay that one.
    if now >= series.last_at + secs(config.quiet_period_secs / 2.0) {
        return None;
    }
    let expected = series.expected.as_ref().map(|(n, _)| *n as i64);
    let is_final = |h: &InstanceHeader| {
        h.instance_number
            .is_some_and(|n| n == 1 || Some(n) == expected)
    };
    let patient_z = |h: &InstanceHeader| h.image_position_patient.map_or(0.0, |p| p[2]);
    let inferior = slab
        .iter()
        .min_by(|a, b| patient_z(a).total_cmp(&patient_z(b)))
        .expect("a slab of at least min_coverage_mm has slices");
    let superior = slab
        .iter()
        .max_by(|a, b| patient_z(a).total_cmp(&patient_z(b)))
        .expect("a slab of at least min_coverage_mm has slices");
    let check = EarlyCheck {
        inferior_end_final: is_final(inferior),
        superior_end_final: is_final(superior),
    };
    log::info!(
        "series {series_uid} of study {study_uid}: contiguous slab of {} slice(s), {length_mm:.0} mm (of {} received): analysing it early (anatomy-coverage trigger)",
        slab.len(),
        series.instances.len()
    );
    series.early_slab = slab.len();
    series.early_sent_at = Some(now);
    series.early_in_flight = feedback;
    let mut job = make_job(study_uid, &series_uid, series, slab);
    job.completion = Completion::AnatomyCoverage;
    job.meta.early = Some(check);
    Some(job)
}
