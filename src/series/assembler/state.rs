//! What the assembler holds between polls: per study ([`StudyState`]) and per series
//! ([`SeriesState`]); the one transition every arriving instance makes ([`reopen`]); the
//! release of a series' unanalysable instances ([`release_rejected`]); and the job a
//! series gives ([`make_job`]).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::job::{Completion, Release, SeriesJob};
use crate::dicom::StoredInstance;
use crate::events::ReleaseReason;
use crate::series::header::InstanceHeader;
use crate::series::selection::{instance_rejection, CandidateSummary};
use crate::series::SeriesMeta;

#[derive(Debug)]
pub(super) struct SeriesState {
    pub(super) instances: Vec<InstanceHeader>,
    pub(super) sop_uids: HashSet<String>,
    pub(super) calling_ae: String,
    pub(super) first_at: Instant,
    pub(super) last_at: Instant,
    pub(super) first_received: OffsetDateTime,
    pub(super) last_received: OffsetDateTime,
    /// Expected instance count and where it came from.
    pub(super) expected: Option<(usize, String)>,
    pub(super) completion: Option<Completion>,
    /// Whether the current completion has been through selection.
    pub(super) evaluated: bool,
    /// Instances whose spool files were released (filtered out: never analysed).
    pub(super) released: HashSet<String>,
    /// The instances analysed by the committed results of this series (union).
    pub(super) analysed: BTreeSet<String>,
    /// Anatomy-coverage trigger: when the series' slab was last checked, how many
    /// instances it had then, when the last early analysis was sent, the size of its slab,
    /// and whether it is still in flight (its feedback not in yet).
    pub(super) early_checked_at: Option<Instant>,
    pub(super) early_checked_n: usize,
    pub(super) early_sent_at: Option<Instant>,
    pub(super) early_slab: usize,
    pub(super) early_in_flight: bool,
}

impl SeriesState {
    pub(super) fn new(stored: &StoredInstance, now: Instant) -> SeriesState {
        SeriesState {
            instances: Vec::new(),
            sop_uids: HashSet::new(),
            calling_ae: stored.calling_ae.clone(),
            first_at: now,
            last_at: now,
            first_received: stored.received_at,
            last_received: stored.received_at,
            expected: None,
            completion: None,
            evaluated: false,
            released: HashSet::new(),
            analysed: BTreeSet::new(),
            early_checked_at: None,
            early_checked_n: 0,
            early_sent_at: None,
            early_slab: 0,
            early_in_flight: false,
        }
    }
    /// Whether a committed result already analysed exactly these instances.
    pub(super) fn already_analysed(&self, accepted: &[InstanceHeader]) -> bool {
        !self.analysed.is_empty()
            && accepted.len() == self.analysed.len()
            && accepted
                .iter()
                .all(|h| self.analysed.contains(&h.sop_instance_uid))
    }
}

#[derive(Debug)]
pub(super) struct StudyState {
    pub(super) series: BTreeMap<String, SeriesState>,
    pub(super) first_at: Instant,
    pub(super) last_at: Instant,
    pub(super) decided: bool,
    /// The series built for this study (after the decision), to compare late series with.
    pub(super) chosen: Option<CandidateSummary>,
    /// Jobs sent whose result is not committed yet (only counted with feedback on).
    pub(super) in_flight: usize,
    /// Restored after a restart: forgotten at this instant (the mark's age counted) unless
    /// an instance arrives first.
    pub(super) remembered_until: Option<Instant>,
}

impl StudyState {
    pub(super) fn new(now: Instant) -> StudyState {
        StudyState {
            series: BTreeMap::new(),
            first_at: now,
            last_at: now,
            decided: false,
            chosen: None,
            in_flight: 0,
            remembered_until: None,
        }
    }

    pub(super) fn forget_at(&self, retention: Duration) -> Instant {
        self.remembered_until.unwrap_or(self.last_at + retention)
    }

    /// Everything in it was evaluated and every result of it is committed: all that
    /// forgetting it needs besides its time.
    pub(super) fn finished(&self) -> bool {
        self.decided
            && self.in_flight == 0
            && self
                .series
                .values()
                .all(|s| s.completion.is_some() && s.evaluated)
    }
}

/// An instance arrived for `series` (new, late or corrected): a complete series is live
/// again, with a fresh quiet period and max wait from `now`. Returns whether it was
/// complete (re-opened).
pub(super) fn reopen(series: &mut SeriesState, stored: &StoredInstance, now: Instant) -> bool {
    let reopened = series.completion.is_some();
    if reopened {
        log::info!(
            "late instance {:?} for complete series {:?}: re-opening it",
            stored.sop_instance_uid,
            stored.series_instance_uid
        );
        series.completion = None;
        series.evaluated = false;
        series.first_at = now;
    }
    series.last_at = series.last_at.max(now);
    series.first_received = series.first_received.min(stored.received_at);
    series.last_received = series.last_received.max(stored.received_at);
    reopened
}

pub(super) fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Releases the spool files of the instances of `series` that can never be analysed
/// (filtered out by [`instance_rejection`]) and are not released yet.
pub(super) fn release_rejected(
    study_uid: &str,
    series_uid: &str,
    series: &mut SeriesState,
    releases: &mut Vec<Release>,
) {
    let mut paths = Vec::new();
    let mut reason = None;
    for h in &series.instances {
        if series.released.contains(&h.sop_instance_uid) {
            continue;
        }
        if let Some(why) = instance_rejection(h) {
            series.released.insert(h.sop_instance_uid.clone());
            paths.push(h.path.clone());
            reason.get_or_insert(why);
        }
    }
    if let Some(reason) = reason {
        log::info!(
            "series {series_uid} of study {study_uid}: {} instance(s) not analysable \
             ({reason}): released",
            paths.len()
        );
        releases.push(Release {
            study_instance_uid: study_uid.to_string(),
            series_instance_uid: series_uid.to_string(),
            paths,
            reason: ReleaseReason::NotAnalysable,
        });
    }
}

/// The job for `instances` of `series` (no fallbacks).
pub(super) fn make_job(
    study_uid: &str,
    series_uid: &str,
    series: &SeriesState,
    instances: Vec<InstanceHeader>,
) -> SeriesJob {
    let first = &instances[0];
    SeriesJob {
        meta: SeriesMeta {
            study_instance_uid: study_uid.to_string(),
            series_instance_uid: series_uid.to_string(),
            accession_number: first.accession_number.clone(),
            patient_id: first.patient_id.clone(),
            station_name: first.station_name.clone(),
            series_description: first.series_description.clone(),
            calling_ae: series.calling_ae.clone(),
            first_received: Some(series.first_received),
            last_received: Some(series.last_received),
            completed: None,
            sop_instance_uids: Vec::new(),
            early: None,
            failed_better: Vec::new(),
            interpolated_gaps: None,
            slice_thickness_mm: first.slice_thickness,
            convolution_kernel: first.convolution_kernel.clone(),
            source: Default::default(),
        },
        instances,
        completion: series.completion.unwrap_or(Completion::MaxWait),
        fallbacks: Vec::new(),
    }
}
