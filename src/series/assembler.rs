//! Series assembly: which stored instances form a complete series, and which series of a
//! study goes on to volume building.
//!
//! [`Assembler`] is a pure state machine driven by explicit [`Instant`]s (tests move time
//! by hand); [`run_assembler`] is the tokio task around it.
//!
//! Rules, in order of time:
//! 1. Instances are grouped by Study and Series Instance UID (a re-sent SOP Instance UID
//!    counts once).
//! 2. A series is complete after `quiet_period_secs` without a new instance, when its
//!    expected count is reached (a matching `expected_count` rule, else
//!    Images in Acquisition), or `max_wait_secs` after its first instance.
//! 3. A study is decided once all its series are complete and it has been quiet for
//!    `study_quiet_period_secs` (or `max_wait_secs` after its first instance): every series
//!    is filtered by [`selection::filter_series`] and the best candidate
//!    ([`selection::rank_key`]) is built; the others are skipped with their reason.
//!    Waiting for the whole study is what lets a bone-kernel series sent after a
//!    soft-tissue one still be the one analysed.
//! 4. After the decision, a series that completes later (a late recon, or late instances
//!    re-opening a complete series) is compared with the series already chosen: it is built
//!    if it is the chosen series itself (now with more instances) or a better candidate,
//!    otherwise skipped ("study already analysed with a better series"). A series whose
//!    instances are exactly the ones a committed result already analysed is not built
//!    again.
//! 5. A decided study is forgotten `completed_retention_secs` after its last instance, once
//!    every result of it is committed downstream (see [`Feedback`]).
//!
//! The spool follows the assembler ([`Release`]): instances that can never be analysed
//! (a localizer, a reformat, ...) are released as soon as they are filtered out; every
//! other instance (the analysed series, its fallbacks, series skipped for a better one)
//! is kept while the study is remembered, so that late instances are analysed with the
//! earlier ones, and released when the study is forgotten. A restart restores what the
//! spool marks as analysed ([`Assembler::restore`]): remembered, not analysed again.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::heartbeat::Heartbeat;

use super::header::InstanceHeader;
use super::load::build_best;
use super::selection::{
    choose_candidate, contiguous_slab, filter_series, instance_rejection, rank_key,
    CandidateSummary, Skip,
};
use super::{AssemblyConfig, EarlyCheck, SeriesMeta, SeriesOutcome, VolumeLimits, VolumeWindow};
use crate::dicom::spool::AnalysedSeries;
use crate::dicom::{Arrival, StoredInstance};

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

/// Instance files the spool no longer needs to keep (see the module docs).
pub use crate::dicom::spool::Release;

/// What happened downstream to a job the assembler sent ([`Assembler::feedback`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Feedback {
    /// A result analysing these instances of the series is durably in the outbox (and the
    /// spool holds the series' analysed mark).
    Committed {
        study_instance_uid: String,
        series_instance_uid: String,
        sop_instance_uids: Vec<String>,
    },
    /// A job of this study ended without a result (its build panicked).
    Dropped {
        study_instance_uid: String,
        series_instance_uid: String,
        reason: String,
    },
}

impl Feedback {
    fn study(&self) -> &str {
        match self {
            Feedback::Committed {
                study_instance_uid, ..
            }
            | Feedback::Dropped {
                study_instance_uid, ..
            } => study_instance_uid,
        }
    }
}

#[derive(Debug)]
struct SeriesState {
    instances: Vec<InstanceHeader>,
    sop_uids: HashSet<String>,
    calling_ae: String,
    first_at: Instant,
    last_at: Instant,
    first_received: OffsetDateTime,
    last_received: OffsetDateTime,
    /// Expected instance count and where it came from.
    expected: Option<(usize, String)>,
    completion: Option<Completion>,
    /// Whether the current completion has been through selection.
    evaluated: bool,
    /// Instances whose spool files were released (filtered out: never analysed).
    released: HashSet<String>,
    /// The instances analysed by the committed results of this series (union).
    analysed: BTreeSet<String>,
    /// Anatomy-coverage trigger: when the series' slab was last checked, how many
    /// instances it had then, when the last early analysis was sent, the size of its slab,
    /// and whether it is still in flight (its feedback not in yet).
    early_checked_at: Option<Instant>,
    early_checked_n: usize,
    early_sent_at: Option<Instant>,
    early_slab: usize,
    early_in_flight: bool,
}

impl SeriesState {
    fn new(stored: &StoredInstance, now: Instant) -> SeriesState {
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

    /// Whether the anatomy-coverage trigger may check this series now: still arriving,
    /// no result yet, no early analysis in flight, grown since the last check, and the
    /// last check at least `interval` ago.
    fn early_due(&self, now: Instant, interval: Duration) -> bool {
        self.early_pending() && self.early_next(interval).is_none_or(|t| now >= t)
    }

    /// When the next check may run: [`SLAB_CHECK_SECS`] after the last check and
    /// `interval` after the last early analysis.
    fn early_next(&self, interval: Duration) -> Option<Instant> {
        let check = self.early_checked_at.map(|t| t + secs(SLAB_CHECK_SECS));
        let analysis = self.early_sent_at.map(|t| t + interval);
        check.max(analysis)
    }

    /// [`SeriesState::early_due`] but for the time.
    fn early_pending(&self) -> bool {
        self.completion.is_none()
            && self.analysed.is_empty()
            && !self.early_in_flight
            && self.instances.len() > self.early_checked_n
    }

    /// Whether a committed result already analysed exactly these instances.
    fn already_analysed(&self, accepted: &[InstanceHeader]) -> bool {
        !self.analysed.is_empty()
            && accepted.len() == self.analysed.len()
            && accepted
                .iter()
                .all(|h| self.analysed.contains(&h.sop_instance_uid))
    }
}

#[derive(Debug)]
struct StudyState {
    series: BTreeMap<String, SeriesState>,
    first_at: Instant,
    last_at: Instant,
    decided: bool,
    /// The series built for this study (after the decision), to compare late series with.
    chosen: Option<CandidateSummary>,
    /// Jobs sent whose result is not committed yet (only counted with feedback on).
    in_flight: usize,
    /// Restored after a restart: forgotten at this instant (the mark's age counted) unless
    /// an instance arrives first.
    remembered_until: Option<Instant>,
}

impl StudyState {
    fn new(now: Instant) -> StudyState {
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

    fn forget_at(&self, retention: Duration) -> Instant {
        self.remembered_until.unwrap_or(self.last_at + retention)
    }

    /// Everything in it was evaluated and every result of it is committed: all that
    /// forgetting it needs besides its time.
    fn finished(&self) -> bool {
        self.decided
            && self.in_flight == 0
            && self
                .series
                .values()
                .all(|s| s.completion.is_some() && s.evaluated)
    }
}

/// The assembly state machine. Feed it with [`Assembler::add`], call
/// [`Assembler::poll`] at [`Assembler::next_deadline`] (or any time) to get the series to
/// build; read the skips with [`Assembler::take_skips`] and the spool files to remove with
/// [`Assembler::take_releases`].
#[derive(Debug)]
pub struct Assembler {
    config: AssemblyConfig,
    studies: BTreeMap<String, StudyState>,
    skipped: Vec<Skip>,
    releases: Vec<Release>,
    /// Whether [`Assembler::feedback`] reports committed results: a study is then only
    /// forgotten once every job sent for it has its result committed (or was dropped).
    feedback: bool,
}

/// An instance arrived for `series` (new, late or corrected): a complete series is live
/// again, with a fresh quiet period and max wait from `now`.
fn reopen(series: &mut SeriesState, stored: &StoredInstance, now: Instant) {
    if series.completion.is_some() {
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
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// The anatomy-coverage trigger looks at a growing series' slab at most this often (the
/// slab is cheap to measure; the model runs at most every `coverage_check_secs`).
const SLAB_CHECK_SECS: f64 = 0.25;

/// Releases the spool files of the instances of `series` that can never be analysed
/// (filtered out by [`instance_rejection`]) and are not released yet.
fn release_rejected(
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
        releases.push(Release {
            study_instance_uid: study_uid.to_string(),
            series_instance_uid: series_uid.to_string(),
            paths,
            forgotten: false,
            why: format!("not analysable: {reason}"),
        });
    }
}

impl Assembler {
    pub fn new(config: AssemblyConfig) -> Self {
        Assembler {
            config,
            studies: BTreeMap::new(),
            skipped: Vec::new(),
            releases: Vec::new(),
            feedback: false,
        }
    }

    /// With feedback on, the caller reports every job's fate with [`Assembler::feedback`]
    /// (the daemon does); a study is forgotten (and its spool released) only once its
    /// results are committed. Off (the default), a job counts as done once sent.
    pub fn with_feedback(mut self, on: bool) -> Self {
        self.feedback = on;
        self
    }

    /// Records one stored instance (its header already read) received at `now`.
    /// Grouping uses the UIDs of `stored` (what the SCP indexed).
    pub fn add(&mut self, stored: &StoredInstance, mut header: InstanceHeader, now: Instant) {
        header.path = stored.path.clone();
        header.study_instance_uid = stored.study_instance_uid.clone();
        header.series_instance_uid = stored.series_instance_uid.clone();
        let expected = self.expected_count(stored, &header);
        let study = self
            .studies
            .entry(stored.study_instance_uid.clone())
            .or_insert_with(|| StudyState::new(now));
        study.last_at = study.last_at.max(now);
        let series = study
            .series
            .entry(stored.series_instance_uid.clone())
            .or_insert_with(|| SeriesState::new(stored, now));
        if !series.sop_uids.insert(stored.sop_instance_uid.clone()) {
            if stored.arrival == Arrival::Correction
                && !series.released.contains(&stored.sop_instance_uid)
            {
                // The spool replaced the file under the same path: read its header anew,
                // and analyse the series again as for a late instance.
                log::info!(
                    "instance {:?} corrected (re-sent with other content): series {:?} is analysed again",
                    stored.sop_instance_uid,
                    stored.series_instance_uid
                );
                series
                    .instances
                    .retain(|h| h.sop_instance_uid != stored.sop_instance_uid);
                series.analysed.remove(&stored.sop_instance_uid);
                study.remembered_until = None;
                reopen(series, stored, now);
                series.instances.push(header);
                return;
            }
            if series.released.contains(&stored.sop_instance_uid) {
                // Sent again after its file was released: the spool stored it again, and
                // it is no more analysable than the first time.
                log::info!(
                    "instance {} received again after its release: releasing it again",
                    stored.sop_instance_uid
                );
                self.releases.push(Release {
                    study_instance_uid: stored.study_instance_uid.clone(),
                    series_instance_uid: stored.series_instance_uid.clone(),
                    paths: vec![stored.path.clone()],
                    forgotten: false,
                    why: "received again after its release".into(),
                });
            } else {
                log::debug!(
                    "instance {} received again: ignored",
                    stored.sop_instance_uid
                );
            }
            return;
        }
        study.remembered_until = None;
        reopen(series, stored, now);
        if series.expected.is_none() {
            series.expected = expected;
        }
        series.instances.push(header);
    }

    /// Restores, after a restart, a series whose spool instances are all analysed (the
    /// spool's analysed mark covers them, [`crate::dicom::spool::recover`]): its study is
    /// remembered as decided, with this series analysed, for what is left of
    /// `completed_retention_secs` counted from the mark, so that late instances re-open it
    /// and it is analysed again whole; otherwise it is not analysed again. `headers` are
    /// the headers of `analysed.instances` (same order; unreadable ones left out).
    pub fn restore(
        &mut self,
        analysed: &AnalysedSeries,
        headers: Vec<(StoredInstance, InstanceHeader)>,
        now: Instant,
    ) {
        let Some((first, _)) = headers.first() else {
            return;
        };
        let first = first.clone();
        let age = (OffsetDateTime::now_utc() - analysed.mark.analysed_at)
            .try_into()
            .unwrap_or(Duration::ZERO);
        let keep = secs(self.config.completed_retention_secs).saturating_sub(age);
        let extra_bone = self.config.bone_kernels.clone();
        let study_uid = first.study_instance_uid.clone();
        let series_uid = first.series_instance_uid.clone();
        let study = self
            .studies
            .entry(study_uid.clone())
            .or_insert_with(|| StudyState::new(now));
        study.decided = true;
        study.remembered_until = Some(
            study
                .remembered_until
                .map_or(now + keep, |t| t.max(now + keep)),
        );
        let series = study
            .series
            .entry(series_uid.clone())
            .or_insert_with(|| SeriesState::new(&first, now));
        for (stored, mut header) in headers {
            if !series.sop_uids.insert(stored.sop_instance_uid.clone()) {
                continue;
            }
            header.path = stored.path.clone();
            header.study_instance_uid = stored.study_instance_uid.clone();
            header.series_instance_uid = stored.series_instance_uid.clone();
            series.first_received = series.first_received.min(stored.received_at);
            series.last_received = series.last_received.max(stored.received_at);
            series.instances.push(header);
        }
        series.completion = Some(Completion::Restored);
        series.evaluated = true;
        series
            .analysed
            .extend(analysed.mark.sop_instance_uids.iter().cloned());
        release_rejected(&study_uid, &series_uid, series, &mut self.releases);
        let (accepted, _) = filter_series(series.instances.clone());
        if !accepted.is_empty() {
            let refs: Vec<&InstanceHeader> = accepted.iter().collect();
            let summary = CandidateSummary::from_headers(&series_uid, &refs, &extra_bone);
            let better = study
                .chosen
                .as_ref()
                .is_none_or(|c| rank_key(&summary, c) == std::cmp::Ordering::Less);
            if better {
                study.chosen = Some(summary);
            }
        }
        log::info!(
            "series {series_uid} of study {study_uid}: {} instance(s) already analysed \
             (result {} committed at {}); remembered for {:.0} s more, not analysed again \
             unless instances arrive",
            series.instances.len(),
            analysed.mark.result_id,
            analysed.mark.analysed_at,
            keep.as_secs_f64()
        );
    }

    /// What happened to a job sent earlier (only with [`Assembler::with_feedback`]).
    pub fn feedback(&mut self, feedback: Feedback) {
        let Some(study) = self.studies.get_mut(feedback.study()) else {
            log::debug!("feedback for a study no longer held: {feedback:?}");
            return;
        };
        study.in_flight = study.in_flight.saturating_sub(1);
        let series_uid = match &feedback {
            Feedback::Committed {
                series_instance_uid,
                ..
            }
            | Feedback::Dropped {
                series_instance_uid,
                ..
            } => series_instance_uid,
        };
        if let Some(series) = study.series.get_mut(series_uid) {
            series.early_in_flight = false;
        }
        match feedback {
            Feedback::Committed {
                series_instance_uid,
                sop_instance_uids,
                ..
            } => {
                if let Some(series) = study.series.get_mut(&series_instance_uid) {
                    series.analysed.extend(sop_instance_uids);
                }
            }
            Feedback::Dropped {
                series_instance_uid,
                reason,
                ..
            } => log::info!("no result for series {series_instance_uid}: {reason}"),
        }
    }

    /// Config rule (calling AE / station name) first, then Images in Acquisition.
    fn expected_count(
        &self,
        stored: &StoredInstance,
        header: &InstanceHeader,
    ) -> Option<(usize, String)> {
        let rule = self.config.expected_count.iter().find(|r| {
            r.calling_ae
                .as_ref()
                .is_none_or(|ae| *ae == stored.calling_ae)
                && r.station_name
                    .as_ref()
                    .is_none_or(|s| *s == header.station_name)
        });
        if let Some(rule) = rule {
            return Some((rule.images as usize, "expected_count rule".into()));
        }
        if self.config.use_images_in_acquisition {
            return header
                .images_in_acquisition
                .map(|n| (n as usize, "Images in Acquisition".into()));
        }
        None
    }

    /// Advances the state machine to `now`: completes series, decides studies, and returns
    /// the series to build (in study order).
    pub fn poll(&mut self, now: Instant) -> Vec<SeriesJob> {
        let quiet = secs(self.config.quiet_period_secs);
        let max_wait = secs(self.config.max_wait_secs);
        let study_quiet = secs(self.config.study_quiet_period());
        let retention = secs(self.config.completed_retention_secs);
        let extra_bone = self.config.bone_kernels.clone();
        let mut jobs = Vec::new();
        let mut skips = Vec::new();
        let releases = &mut self.releases;

        for (study_uid, study) in self.studies.iter_mut() {
            let jobs_before = jobs.len();
            for (series_uid, series) in study.series.iter_mut() {
                if series.completion.is_some() {
                    continue;
                }
                let completion = if series
                    .expected
                    .as_ref()
                    .is_some_and(|(n, _)| series.sop_uids.len() >= *n)
                {
                    Some(Completion::ExpectedCount)
                } else if now >= series.last_at + quiet {
                    Some(Completion::QuietPeriod)
                } else if now >= series.first_at + max_wait {
                    Some(Completion::MaxWait)
                } else {
                    None
                };
                if let Some(c) = completion {
                    log::info!(
                        "series {series_uid} of study {study_uid} complete ({c:?}): {} instance(s)",
                        series.sop_uids.len()
                    );
                    series.completion = Some(c);
                }
            }
            // After the completions: a series complete now is analysed whole, not early.
            if self.config.anatomy_coverage_trigger {
                jobs.extend(early_job(
                    study_uid,
                    study,
                    now,
                    &self.config,
                    self.feedback,
                ));
            }

            if !study.decided {
                let all_complete = study.series.values().all(|s| s.completion.is_some());
                // An early analysis in flight is waited for: if it is published, and no
                // instance arrived since, its series need not be analysed again.
                let early_in_flight = study.series.values().any(|s| s.early_in_flight);
                let settled =
                    all_complete && !early_in_flight && now >= study.last_at + study_quiet;
                let forced = now >= study.first_at + max_wait;
                if settled || forced {
                    study.decided = true;
                    let (job, study_skips) = decide_study(study_uid, study, &extra_bone);
                    skips.extend(study_skips);
                    jobs.extend(job);
                    for (series_uid, series) in study.series.iter_mut() {
                        if series.evaluated {
                            release_rejected(study_uid, series_uid, series, releases);
                        }
                    }
                }
            } else {
                // Decided study: series completed since are compared with the chosen one.
                for (series_uid, series) in study.series.iter_mut() {
                    if series.completion.is_none() || series.evaluated || series.early_in_flight {
                        continue;
                    }
                    series.evaluated = true;
                    release_rejected(study_uid, series_uid, series, releases);
                    let (accepted, series_skips) = filter_series(series.instances.clone());
                    skips.extend(series_skips);
                    if accepted.is_empty() {
                        continue;
                    }
                    if series.already_analysed(&accepted) {
                        log::info!(
                            "series {series_uid} of study {study_uid}: its {} instance(s) are \
                             the ones already analysed; not analysed again",
                            accepted.len()
                        );
                        continue;
                    }
                    let refs: Vec<&InstanceHeader> = accepted.iter().collect();
                    let summary = CandidateSummary::from_headers(series_uid, &refs, &extra_bone);
                    let better = match &study.chosen {
                        None => true,
                        Some(chosen) => {
                            chosen.series_instance_uid == *series_uid
                                || rank_key(&summary, chosen) == std::cmp::Ordering::Less
                        }
                    };
                    if better {
                        log::info!(
                            "series {series_uid} of already decided study {study_uid} completed late ({}): building it",
                            summary.describe()
                        );
                        jobs.push(make_job(study_uid, series_uid, series, accepted));
                        study.chosen = Some(summary);
                    } else {
                        let chosen = study.chosen.as_ref().expect("checked above");
                        skips.push(Skip {
                            study_instance_uid: study_uid.clone(),
                            series_instance_uid: series_uid.clone(),
                            instances: accepted.len(),
                            reason: format!(
                                "study already analysed with series {} ({}), preferred over this late one ({})",
                                chosen.series_instance_uid,
                                chosen.describe(),
                                summary.describe()
                            ),
                        });
                    }
                }
            }
            if self.feedback {
                study.in_flight += jobs.len() - jobs_before;
            }
        }

        // Forget decided studies long quiet, once everything in them was evaluated and
        // every result of them is committed; their spool files go with them.
        self.studies.retain(|uid, study| {
            let keep = !(study.finished() && now >= study.forget_at(retention));
            if !keep {
                log::info!("forgetting study {uid}: releasing its instances");
                // Series without a committed result first: a crash half-way through leaves
                // the analysed ones, remembered by their marks after the restart.
                let mut series: Vec<(&String, &SeriesState)> = study.series.iter().collect();
                series.sort_by_key(|(_, s)| !s.analysed.is_empty());
                for (series_uid, s) in series {
                    let paths: Vec<PathBuf> = s
                        .instances
                        .iter()
                        .filter(|h| !s.released.contains(&h.sop_instance_uid))
                        .map(|h| h.path.clone())
                        .collect();
                    if paths.is_empty() {
                        // Released when filtered out; its directory went with its files.
                        continue;
                    }
                    releases.push(Release {
                        study_instance_uid: uid.clone(),
                        series_instance_uid: series_uid.clone(),
                        paths,
                        forgotten: true,
                        why: "study forgotten".into(),
                    });
                }
            }
            keep
        });

        for skip in &skips {
            log::info!(
                "not analysed: series {} of study {} ({} instance(s)): {}",
                skip.series_instance_uid,
                skip.study_instance_uid,
                skip.instances,
                skip.reason
            );
        }
        self.skipped.extend(skips);
        jobs
    }

    /// For a spool short of space: makes the finished study (see [`Assembler::poll`], rule
    /// 5) that would be forgotten first due now, so that the next poll releases its
    /// instances before its retention is over. Late instances of it will then start a new
    /// study (analysed again, with only the late ones if they do not form a series of
    /// their own). Returns its Study Instance UID; `None` when no study is finished.
    pub fn forget_oldest_finished(&mut self, now: Instant) -> Option<String> {
        let retention = secs(self.config.completed_retention_secs);
        let (uid, study) = self
            .studies
            .iter_mut()
            .filter(|(_, s)| s.finished() && s.forget_at(retention) > now)
            .min_by_key(|(_, s)| s.forget_at(retention))?;
        study.remembered_until = Some(now);
        Some(uid.clone())
    }

    /// The next instant at which [`Assembler::poll`] may have something to do (besides
    /// after [`Assembler::add`] and [`Assembler::feedback`]).
    pub fn next_deadline(&self) -> Option<Instant> {
        let quiet = secs(self.config.quiet_period_secs);
        let max_wait = secs(self.config.max_wait_secs);
        let study_quiet = secs(self.config.study_quiet_period());
        let retention = secs(self.config.completed_retention_secs);
        let check = secs(self.config.coverage_check_secs);
        let trigger = self.config.anatomy_coverage_trigger;
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for study in self.studies.values() {
            let mut all_complete = true;
            for series in study.series.values() {
                if series.completion.is_none() {
                    all_complete = false;
                    consider((series.last_at + quiet).min(series.first_at + max_wait));
                    // Instances arrived since the last check, which came too early for
                    // another one.
                    if trigger && series.early_pending() {
                        if let Some(t) = series.early_next(check) {
                            consider(t);
                        }
                    }
                }
            }
            if !study.decided {
                consider(study.first_at + max_wait);
                // An early analysis in flight is waited for: its feedback wakes us.
                if all_complete && !study.series.values().any(|s| s.early_in_flight) {
                    consider(study.last_at + study_quiet);
                }
            } else if all_complete && study.in_flight == 0 {
                consider(study.forget_at(retention));
            }
        }
        next
    }

    /// Skips recorded since the last call (they were logged when recorded).
    pub fn take_skips(&mut self) -> Vec<Skip> {
        std::mem::take(&mut self.skipped)
    }

    /// Spool files to remove, recorded since the last call.
    pub fn take_releases(&mut self) -> Vec<Release> {
        std::mem::take(&mut self.releases)
    }

    /// Number of studies still held (assembling, or remembered for late instances).
    pub fn studies_held(&self) -> usize {
        self.studies.len()
    }
}

/// The anatomy-coverage trigger ([`AssemblyConfig::anatomy_coverage_trigger`]) on one
/// study: an early job for its best candidate series so far, if that series is due for a
/// check and its contiguous slab is at least `min_coverage_mm` long and grew since the
/// last early analysis.
fn early_job(
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

/// Selection over the complete series of a study being decided.
fn decide_study(
    study_uid: &str,
    study: &mut StudyState,
    extra_bone: &[String],
) -> (Option<SeriesJob>, Vec<Skip>) {
    let mut skips = Vec::new();
    let mut candidates = Vec::new();
    for (series_uid, series) in study.series.iter_mut() {
        // Series still incomplete at a forced decision are handled when they complete.
        if series.completion.is_none() {
            continue;
        }
        series.evaluated = true;
        let (accepted, series_skips) = filter_series(series.instances.clone());
        skips.extend(series_skips);
        if !accepted.is_empty() {
            candidates.push((series_uid.clone(), accepted));
        }
    }
    if candidates.is_empty() {
        log::info!("study {study_uid}: no axial CT series of ORIGINAL images to analyse");
        return (None, skips);
    }
    let summaries: Vec<CandidateSummary> = candidates
        .iter()
        .map(|(uid, hs)| {
            let refs: Vec<&InstanceHeader> = hs.iter().collect();
            CandidateSummary::from_headers(uid, &refs, extra_bone)
        })
        .collect();
    let (order, choice_skips) = choose_candidate(&summaries, study_uid);
    skips.extend(choice_skips);
    let best = order[0];
    study.chosen = Some(summaries[best].clone());
    let (best_uid, best_accepted) = &candidates[best];
    if study.series[best_uid].already_analysed(best_accepted) {
        log::info!(
            "study {study_uid}: series {best_uid} ({}) is the best, and its instances are the \
             ones already analysed; not analysed again",
            summaries[best].describe()
        );
        return (None, skips);
    }
    log::info!(
        "study {study_uid}: analysing series {} ({})",
        summaries[best].series_instance_uid,
        summaries[best].describe()
    );
    let mut slots: Vec<Option<(String, Vec<InstanceHeader>)>> =
        candidates.into_iter().map(Some).collect();
    let mut ranked = order.into_iter().map(|i| {
        let (series_uid, accepted) = slots[i].take().expect("each candidate once");
        make_job(study_uid, &series_uid, &study.series[&series_uid], accepted)
    });
    let mut job = ranked.next().expect("at least one candidate");
    job.fallbacks = ranked.collect();
    (Some(job), skips)
}

fn make_job(
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
        },
        instances,
        completion: series.completion.unwrap_or(Completion::MaxWait),
        fallbacks: Vec::new(),
    }
}

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
struct BuildAttempts {
    spool_dir: PathBuf,
    max: u32,
}

/// [`build_job`], with its attempt recorded durably in the spool: a series whose earlier
/// builds killed the process `max` times is failed without building it again.
fn build_recorded(
    job: SeriesJob,
    window: Option<&VolumeWindow>,
    limits: &VolumeLimits,
    attempts: Option<&BuildAttempts>,
) -> SeriesOutcome {
    use crate::dicom::spool::{begin_attempt, end_attempt};
    let Some(a) = attempts else {
        return build_job(job, window, limits);
    };
    let (study, series) = (
        job.meta.study_instance_uid.clone(),
        job.meta.series_instance_uid.clone(),
    );
    match begin_attempt(&a.spool_dir, &study, &series) {
        Ok(earlier) if earlier >= a.max => {
            let mut meta = job.meta;
            meta.completed = Some(OffsetDateTime::now_utc());
            meta.sop_instance_uids = super::sorted_unique_uids(
                job.instances.iter().map(|h| h.sop_instance_uid.as_str()),
            );
            let reason = format!(
                "the daemon stopped {earlier} times while building this series (out of memory?): \
                 not built again (series.max_build_attempts = {})",
                a.max
            );
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
    if let Err(e) = end_attempt(&a.spool_dir, &study, &series) {
        log::warn!(
            "cannot record the end of the build of series {}: {e:#}",
            series.escape_debug()
        );
    }
    outcome
}

/// Capacity of the queue between assembly and the volume builder (jobs are small: paths
/// and headers). When full, assembly waits, which in turn slows the SCP down.
const BUILD_QUEUE: usize = 16;

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
    /// Where each outcome sent to inference is recorded ([`SeriesOutcome::event`]).
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

/// The series stage: reads [`StoredInstance`]s from `rx`, sends a [`SeriesOutcome`] per
/// analysed series to `tx`. Volumes are built one at a time on a blocking thread (memory
/// bound: one volume in construction). Returns when `rx` is closed (after building what
/// was already decided) or `tx` is closed. Series still assembling at shutdown are in the
/// spool and are re-sent by its re-index at the next start.
pub async fn run_assembler(
    config: AssemblyConfig,
    heartbeat: Heartbeat,
    mut rx: mpsc::Receiver<StoredInstance>,
    tx: mpsc::Sender<SeriesOutcome>,
    links: SpoolLinks,
) -> Result<()> {
    config.validate()?;
    let limits = config.volume_limits();
    let SpoolLinks {
        window,
        analysed,
        releases,
        mut feedback,
        spool_short_of_space,
        spool_dir,
        events,
    } = links;
    let build_attempts = spool_dir.map(|spool_dir| BuildAttempts {
        spool_dir,
        max: config.max_build_attempts,
    });
    let mut next_space_check = Instant::now();
    // Jobs that end without an outcome (a panic) are reported like the others.
    let (dropped_tx, mut dropped_rx) = mpsc::unbounded_channel::<Feedback>();
    let (job_tx, mut job_rx) = mpsc::channel::<SeriesJob>(BUILD_QUEUE);
    let outcome_events = events.clone();
    let builder = tokio::spawn(async move {
        while let Some(job) = job_rx.recv().await {
            let (study, series) = (
                job.meta.study_instance_uid.clone(),
                job.meta.series_instance_uid.clone(),
            );
            let window = window.clone();
            let attempts = build_attempts.clone();
            let outcome = match tokio::task::spawn_blocking(move || {
                build_recorded(job, window.as_ref(), &limits, attempts.as_ref())
            })
            .await
            {
                Ok(outcome) => outcome,
                Err(e) => {
                    log::error!("volume building of series {series} panicked: {e}");
                    let _ = dropped_tx.send(Feedback::Dropped {
                        study_instance_uid: study,
                        series_instance_uid: series,
                        reason: format!("volume building panicked: {e}"),
                    });
                    continue;
                }
            };
            outcome_events.emit(outcome.event());
            if tx.send(outcome).await.is_err() {
                log::warn!("series outcome receiver closed: stopping the volume builder");
                break;
            }
        }
    });

    let mut assembler = Assembler::new(config).with_feedback(feedback.is_some());
    for series in analysed {
        heartbeat.beat();
        let headers = tokio::task::spawn_blocking(move || {
            let mut headers = Vec::with_capacity(series.instances.len());
            for stored in &series.instances {
                match InstanceHeader::read(&stored.path) {
                    Ok(h) => headers.push((stored.clone(), h)),
                    Err(e) => log::error!(
                        "instance {} of series {} not restored: {e:#}",
                        stored.sop_instance_uid,
                        stored.series_instance_uid
                    ),
                }
            }
            (series, headers)
        })
        .await?;
        let (series, headers) = headers;
        assembler.restore(&series, headers, Instant::now());
    }
    loop {
        heartbeat.beat();
        let deadline = assembler.next_deadline();
        let mut idle = Instant::now() + heartbeat.idle_beat_period();
        if spool_short_of_space.is_some() {
            idle = idle.min(next_space_check);
        }
        let deadline = Some(deadline.map_or(idle, |d| d.min(idle)));
        let received = tokio::select! {
            msg = rx.recv() => Some(msg),
            Some(f) = recv_feedback(&mut feedback) => {
                assembler.feedback(f);
                None
            }
            Some(f) = dropped_rx.recv() => {
                if assembler.feedback {
                    assembler.feedback(f);
                }
                None
            }
            _ = sleep_until(deadline) => None,
        };
        match received {
            Some(None) => break,
            Some(Some(stored)) => {
                let path = stored.path.clone();
                match tokio::task::spawn_blocking(move || InstanceHeader::read(&path)).await? {
                    Ok(header) => assembler.add(&stored, header, Instant::now()),
                    Err(e) => log::error!(
                        "instance {} of series {} not assembled: {e:#}",
                        stored.sop_instance_uid,
                        stored.series_instance_uid
                    ),
                }
            }
            None => {}
        }
        if let Some(short) = &spool_short_of_space {
            let now = Instant::now();
            if now >= next_space_check {
                next_space_check = now + SPACE_CHECK;
                if (short.0)() {
                    if let Some(study) = assembler.forget_oldest_finished(now) {
                        log::warn!(
                            "spool short of space (below twice dicom.min_free_space_mb): \
                             releasing analysed study {study} before \
                             series.completed_retention_secs is over"
                        );
                    }
                }
            }
        }
        for job in assembler.poll(Instant::now()) {
            if heartbeat.send(&job_tx, job).await.is_err() {
                log::warn!("volume builder stopped: stopping the assembler");
                return Ok(());
            }
        }
        // Skips were logged when recorded.
        for skip in assembler.take_skips() {
            events.emit(skip.event());
        }
        for release in assembler.take_releases() {
            if let Some(releases) = &releases {
                let _ = releases.send(release).await;
            }
        }
    }
    drop(job_tx);
    builder.await?;
    Ok(())
}

async fn recv_feedback(rx: &mut Option<mpsc::UnboundedReceiver<Feedback>>) -> Option<Feedback> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::selection::CT_IMAGE_STORAGE;
    use crate::series::ExpectedCountRule;

    const STUDY: &str = "1.2.3";

    fn config() -> AssemblyConfig {
        AssemblyConfig {
            quiet_period_secs: 3.0,
            max_wait_secs: 10.0,
            study_quiet_period_secs: Some(3.0),
            ..Default::default()
        }
    }

    /// One axial instance of `series` at slice `k`.
    fn instance(
        series: &str,
        k: usize,
        kernel: &str,
        thickness: f64,
    ) -> (StoredInstance, InstanceHeader) {
        let sop = format!("{series}.{k}");
        let stored = StoredInstance {
            path: format!("/spool/{sop}.dcm").into(),
            study_instance_uid: STUDY.into(),
            series_instance_uid: series.into(),
            sop_instance_uid: sop.clone(),
            sop_class_uid: CT_IMAGE_STORAGE.into(),
            calling_ae: "SCANNER".into(),
            received_at: OffsetDateTime::UNIX_EPOCH,
            arrival: Arrival::First,
        };
        let header = InstanceHeader {
            sop_class_uid: CT_IMAGE_STORAGE.into(),
            sop_instance_uid: sop,
            modality: "CT".into(),
            image_type: vec!["ORIGINAL".into(), "PRIMARY".into(), "AXIAL".into()],
            convolution_kernel: kernel.into(),
            slice_thickness: Some(thickness),
            station_name: "CT1".into(),
            image_position_patient: Some([0.0, 0.0, k as f64 * thickness]),
            image_orientation_patient: Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
            pixel_spacing: Some([0.5, 0.5]),
            rows: Some(512),
            columns: Some(512),
            ..Default::default()
        };
        (stored, header)
    }

    fn add_series(
        a: &mut Assembler,
        series: &str,
        n: usize,
        kernel: &str,
        thickness: f64,
        t0: Instant,
        step: Duration,
    ) {
        for k in 0..n {
            let (s, h) = instance(series, k, kernel, thickness);
            a.add(&s, h, t0 + step * k as u32);
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn series_completes_after_the_quiet_period() {
        let mut a = Assembler::new(config());
        let t0 = Instant::now();
        add_series(&mut a, "1.2.3.1", 3, "BONE", 1.0, t0, ms(1000)); // last at t0+2s
        assert!(a.poll(t0 + ms(4999)).is_empty());
        assert_eq!(a.next_deadline(), Some(t0 + ms(5000)));
        let jobs = a.poll(t0 + ms(5000));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].completion, Completion::QuietPeriod);
        assert_eq!(jobs[0].instances.len(), 3);
        assert_eq!(jobs[0].meta.calling_ae, "SCANNER");
        assert!(a.poll(t0 + ms(60_000)).is_empty(), "a series is built once");
    }

    #[test]
    fn expected_count_rule_completes_without_waiting() {
        let mut a = Assembler::new(AssemblyConfig {
            study_quiet_period_secs: Some(0.0),
            expected_count: vec![ExpectedCountRule {
                calling_ae: Some("SCANNER".into()),
                station_name: None,
                images: 3,
            }],
            ..config()
        });
        let t0 = Instant::now();
        add_series(&mut a, "1.2.3.1", 2, "BONE", 1.0, t0, ms(10));
        assert!(a.poll(t0 + ms(20)).is_empty());
        add_series(&mut a, "1.2.3.1", 3, "BONE", 1.0, t0, ms(10)); // 2 re-sent, 1 new
        let jobs = a.poll(t0 + ms(30));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].completion, Completion::ExpectedCount);
        assert_eq!(jobs[0].instances.len(), 3, "re-sent instances count once");
    }

    #[test]
    fn images_in_acquisition_is_an_expected_count() {
        let mut a = Assembler::new(AssemblyConfig {
            study_quiet_period_secs: Some(0.0),
            ..config()
        });
        let t0 = Instant::now();
        for k in 0..4 {
            let (s, mut h) = instance("1.2.3.1", k, "BONE", 1.0);
            h.images_in_acquisition = Some(4);
            a.add(&s, h, t0);
            let jobs = a.poll(t0);
            assert_eq!(jobs.len(), usize::from(k == 3));
        }
    }

    #[test]
    fn max_wait_forces_completion_of_a_trickling_series() {
        let mut a = Assembler::new(config());
        let t0 = Instant::now();
        for k in 0..12 {
            let now = t0 + ms(1000) * k;
            let (s, h) = instance("1.2.3.1", k as usize, "BONE", 1.0);
            a.add(&s, h, now);
            let jobs = a.poll(now);
            if k < 10 {
                assert!(jobs.is_empty(), "completed too early at {k} s");
            } else {
                assert_eq!(jobs.len(), 1, "not forced at {k} s");
                assert_eq!(jobs[0].completion, Completion::MaxWait);
                break;
            }
        }
    }

    #[test]
    fn study_waits_for_a_later_bone_series_and_prefers_it() {
        let mut a = Assembler::new(config());
        let t0 = Instant::now();
        add_series(&mut a, "1.2.3.1", 5, "STANDARD", 0.625, t0, ms(100)); // soft, thin
        a.add(&instance("1.2.3.9", 0, "", 1.0).0, scout(), t0 + ms(500));
        add_series(&mut a, "1.2.3.2", 5, "B70f", 1.0, t0 + ms(2000), ms(100)); // bone, last at 2.4 s
                                                                               // The soft series is complete at 3.4 s, but the bone one is still arriving.
        assert!(a.poll(t0 + ms(3450)).is_empty());
        assert!(a.poll(t0 + ms(5399)).is_empty());
        let jobs = a.poll(t0 + ms(5400));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].meta.series_instance_uid, "1.2.3.2");
        let fallbacks: Vec<_> = jobs[0]
            .fallbacks
            .iter()
            .map(|f| f.meta.series_instance_uid.as_str())
            .collect();
        assert_eq!(fallbacks, ["1.2.3.1"], "the soft series stays a fallback");
        let skips = a.take_skips();
        let reason = |uid: &str| {
            skips
                .iter()
                .find(|s| s.series_instance_uid == uid)
                .unwrap()
                .reason
                .clone()
        };
        assert!(reason("1.2.3.1").contains("preferred"), "{skips:?}");
        assert!(reason("1.2.3.9").contains("localizer"), "{skips:?}");
    }

    fn scout() -> InstanceHeader {
        let (_, mut h) = instance("1.2.3.9", 0, "", 1.0);
        h.image_type = vec!["ORIGINAL".into(), "PRIMARY".into(), "LOCALIZER".into()];
        h.image_orientation_patient = Some([1.0, 0.0, 0.0, 0.0, 0.0, -1.0]);
        h
    }

    #[test]
    fn late_series_after_the_decision_is_built_only_if_better() {
        let mut a = Assembler::new(AssemblyConfig {
            study_quiet_period_secs: Some(0.0),
            ..config()
        });
        let t0 = Instant::now();
        add_series(&mut a, "1.2.3.1", 5, "STANDARD", 1.0, t0, ms(100));
        let jobs = a.poll(t0 + ms(3400));
        assert_eq!(
            jobs[0].meta.series_instance_uid, "1.2.3.1",
            "only candidate so far"
        );
        // A bone series arrives after the decision: better, built too.
        add_series(&mut a, "1.2.3.2", 5, "BONE", 1.0, t0 + ms(20_000), ms(100));
        let jobs = a.poll(t0 + ms(23_400));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].meta.series_instance_uid, "1.2.3.2");
        // A thicker soft-tissue series after that: skipped with the reason.
        add_series(&mut a, "1.2.3.3", 5, "SOFT", 5.0, t0 + ms(30_000), ms(100));
        assert!(a.poll(t0 + ms(33_400)).is_empty());
        let skips = a.take_skips();
        assert!(
            skips.iter().any(
                |s| s.series_instance_uid == "1.2.3.3" && s.reason.contains("already analysed")
            ),
            "{skips:?}"
        );
    }

    #[test]
    fn late_instances_reopen_and_rebuild_the_chosen_series() {
        let mut a = Assembler::new(config());
        let t0 = Instant::now();
        add_series(&mut a, "1.2.3.1", 5, "BONE", 1.0, t0, ms(100));
        assert_eq!(a.poll(t0 + ms(10_000)).len(), 1);
        let (s, h) = instance("1.2.3.1", 5, "BONE", 1.0);
        a.add(&s, h, t0 + ms(11_000));
        assert!(a.poll(t0 + ms(13_000)).is_empty());
        let jobs = a.poll(t0 + ms(14_000));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].instances.len(), 6, "rebuilt with every instance");
    }

    /// An assembler that keeps decided studies 60 s and waits for results to be committed.
    fn retaining_with_feedback() -> Assembler {
        Assembler::new(AssemblyConfig {
            completed_retention_secs: 60.0,
            ..config()
        })
        .with_feedback(true)
    }

    #[test]
    fn decided_studies_are_forgotten_after_retention() {
        let mut a = Assembler::new(AssemblyConfig {
            completed_retention_secs: 60.0,
            ..config()
        });
        let t0 = Instant::now();
        add_series(&mut a, "1.2.3.1", 2, "BONE", 1.0, t0, ms(100));
        a.poll(t0 + ms(5000));
        assert_eq!(a.studies_held(), 1);
        assert_eq!(a.next_deadline(), Some(t0 + ms(60_100)));
        a.poll(t0 + ms(60_100));
        assert_eq!(a.studies_held(), 0);
        assert_eq!(a.next_deadline(), None);
    }

    fn committed(series: &str, sops: &[String]) -> Feedback {
        Feedback::Committed {
            study_instance_uid: STUDY.into(),
            series_instance_uid: series.into(),
            sop_instance_uids: sops.to_vec(),
        }
    }

    fn uids(job: &SeriesJob) -> Vec<String> {
        job.instances
            .iter()
            .map(|h| h.sop_instance_uid.clone())
            .collect()
    }

    fn paths_of(releases: &[Release]) -> BTreeSet<String> {
        releases
            .iter()
            .flat_map(|r| r.paths.iter().map(|p| p.display().to_string()))
            .collect()
    }

    #[test]
    fn an_analysed_series_is_kept_until_its_study_is_forgotten_and_its_result_committed() {
        let mut a = retaining_with_feedback();
        let t0 = Instant::now();
        add_series(&mut a, "1.2.3.1", 3, "BONE", 1.0, t0, ms(100));
        let jobs = a.poll(t0 + ms(5000));
        assert_eq!(jobs.len(), 1);
        assert!(
            a.take_releases().is_empty(),
            "nothing released at the decision"
        );
        // Retention is over but the result is not committed yet: the study stays, and no
        // deadline is due until the feedback comes.
        assert!(a.poll(t0 + ms(120_000)).is_empty());
        assert_eq!(a.studies_held(), 1);
        assert!(a.take_releases().is_empty());
        assert_eq!(a.next_deadline(), None);
        a.feedback(committed("1.2.3.1", &uids(&jobs[0])));
        assert_eq!(a.next_deadline(), Some(t0 + ms(60_200)));
        a.poll(t0 + ms(120_000));
        assert_eq!(a.studies_held(), 0);
        let releases = a.take_releases();
        assert_eq!(releases.len(), 1);
        assert!(releases[0].forgotten);
        assert_eq!(
            paths_of(&releases),
            (0..3).map(|k| format!("/spool/1.2.3.1.{k}.dcm")).collect()
        );
    }

    #[test]
    fn short_of_space_the_oldest_finished_study_is_forgotten_before_its_retention() {
        let mut a = retaining_with_feedback();
        let t0 = Instant::now();
        // Two studies, the second one later; both analysed.
        add_series(&mut a, "1.2.3.1", 3, "BONE", 1.0, t0, ms(100));
        for k in 0..3 {
            let (mut s, h) = instance("1.2.4.1", k, "BONE", 1.0);
            s.study_instance_uid = "1.2.4".into();
            a.add(&s, h, t0 + ms(1000 + 100 * k as u64));
        }
        let jobs = a.poll(t0 + ms(10_000));
        assert_eq!(jobs.len(), 2);
        // Nothing is finished while results are not committed: nothing to release.
        assert_eq!(a.forget_oldest_finished(t0 + ms(10_000)), None);
        a.feedback(committed("1.2.3.1", &uids(&jobs[0])));
        a.feedback(Feedback::Committed {
            study_instance_uid: "1.2.4".into(),
            series_instance_uid: "1.2.4.1".into(),
            sop_instance_uids: uids(&jobs[1]),
        });
        // Oldest first, each only once, well before the 60 s retention.
        let now = t0 + ms(11_000);
        assert_eq!(a.forget_oldest_finished(now).as_deref(), Some(STUDY));
        a.poll(now);
        assert_eq!(a.studies_held(), 1);
        let releases = a.take_releases();
        assert_eq!(
            paths_of(&releases),
            (0..3).map(|k| format!("/spool/1.2.3.1.{k}.dcm")).collect()
        );
        assert!(releases.iter().all(|r| r.forgotten));
        assert_eq!(a.forget_oldest_finished(now).as_deref(), Some("1.2.4"));
        a.poll(now);
        assert_eq!(a.studies_held(), 0);
        assert_eq!(a.forget_oldest_finished(now), None);
    }

    #[test]
    fn late_instances_within_retention_rebuild_with_the_kept_ones() {
        let mut a = Assembler::new(config()).with_feedback(true);
        let t0 = Instant::now();
        add_series(&mut a, "1.2.3.1", 4, "BONE", 1.0, t0, ms(100));
        let jobs = a.poll(t0 + ms(5000));
        a.feedback(committed("1.2.3.1", &uids(&jobs[0])));
        let (s, h) = instance("1.2.3.1", 4, "BONE", 1.0);
        a.add(&s, h, t0 + ms(30_000));
        let jobs = a.poll(t0 + ms(33_000));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].instances.len(), 5);
        assert!(a.take_releases().is_empty(), "nothing released yet");
    }

    #[test]
    fn unanalysable_instances_are_released_at_once_the_others_at_forgetting() {
        let mut a = retaining_with_feedback();
        let t0 = Instant::now();
        add_series(&mut a, "1.2.3.1", 3, "BONE", 1.0, t0, ms(100));
        // A scout inside the axial series, a soft-tissue series (a fallback) and a
        // localizer series.
        let (mut s, _) = instance("1.2.3.1", 9, "", 1.0);
        s.path = "/spool/1.2.3.1.scout.dcm".into();
        s.sop_instance_uid = "1.2.3.1.scout".into();
        let mut h = scout();
        h.sop_instance_uid = s.sop_instance_uid.clone();
        a.add(&s, h, t0 + ms(300));
        add_series(&mut a, "1.2.3.2", 3, "SOFT", 1.0, t0, ms(100));
        a.add(&instance("1.2.3.9", 0, "", 1.0).0, scout(), t0 + ms(400));
        let jobs = a.poll(t0 + ms(5000));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].fallbacks.len(), 1, "the soft series is a fallback");
        let releases = a.take_releases();
        assert!(releases.iter().all(|r| !r.forgotten));
        assert_eq!(
            paths_of(&releases),
            BTreeSet::from([
                "/spool/1.2.3.1.scout.dcm".to_string(),
                "/spool/1.2.3.9.0.dcm".to_string()
            ]),
            "only what can never be analysed; the fallback stays"
        );
        // A released instance sent again is stored again: released again.
        a.add(&instance("1.2.3.9", 0, "", 1.0).0, scout(), t0 + ms(6000));
        let again = a.take_releases();
        assert_eq!(
            paths_of(&again),
            BTreeSet::from(["/spool/1.2.3.9.0.dcm".to_string()])
        );
        // The analysed series sent again while remembered: its files are still in the
        // spool (the SCP answers from them), nothing to release.
        add_series(&mut a, "1.2.3.1", 3, "BONE", 1.0, t0 + ms(7000), ms(10));
        assert!(a.take_releases().is_empty());
        a.feedback(committed("1.2.3.1", &uids(&jobs[0])));
        a.poll(t0 + ms(70_000));
        assert_eq!(a.studies_held(), 0);
        let forgotten = a.take_releases();
        assert!(forgotten.iter().all(|r| r.forgotten));
        let expected: BTreeSet<String> = ["1.2.3.1.0", "1.2.3.1.1", "1.2.3.1.2"]
            .iter()
            .chain(&["1.2.3.2.0", "1.2.3.2.1", "1.2.3.2.2"])
            .map(|s| format!("/spool/{s}.dcm"))
            .collect();
        assert_eq!(paths_of(&forgotten), expected);
        // Not analysed (the fallback) before the analysed one.
        assert_eq!(forgotten[0].series_instance_uid, "1.2.3.2");
        assert_eq!(forgotten.last().unwrap().series_instance_uid, "1.2.3.1");
    }

    fn analysed(series: &str, n: usize, age_secs: i64) -> AnalysedSeries {
        use crate::dicom::spool::AnalysedMark;
        let instances: Vec<StoredInstance> =
            (0..n).map(|k| instance(series, k, "BONE", 1.0).0).collect();
        AnalysedSeries {
            mark: AnalysedMark {
                study_instance_uid: STUDY.into(),
                series_instance_uid: series.into(),
                analysed_at: OffsetDateTime::now_utc() - time::Duration::seconds(age_secs),
                result_id: "ab".into(),
                sop_instance_uids: crate::series::sorted_unique_uids(
                    instances.iter().map(|i| i.sop_instance_uid.as_str()),
                ),
            },
            instances,
        }
    }

    fn restore(a: &mut Assembler, series: &AnalysedSeries, now: Instant) {
        let headers = series
            .instances
            .iter()
            .enumerate()
            .map(|(k, s)| {
                (
                    s.clone(),
                    instance(&s.series_instance_uid, k, "BONE", 1.0).1,
                )
            })
            .collect();
        a.restore(series, headers, now);
    }

    #[test]
    fn a_restored_series_is_not_analysed_again_but_late_instances_reopen_it() {
        let mut a = Assembler::new(AssemblyConfig {
            completed_retention_secs: 600.0,
            ..config()
        })
        .with_feedback(true);
        let t0 = Instant::now();
        restore(&mut a, &analysed("1.2.3.1", 4, 100), t0);
        assert!(a.poll(t0 + ms(60_000)).is_empty(), "not analysed again");
        assert_eq!(a.studies_held(), 1);
        // Forgotten by the mark's age: 600 s retention, 100 s already spent.
        let due = a.next_deadline().unwrap();
        assert!(
            due > t0 + ms(499_000) && due <= t0 + ms(500_000),
            "{:?}",
            due - t0
        );
        // A late instance re-opens the series: analysed again, whole.
        let (s, h) = instance("1.2.3.1", 4, "BONE", 1.0);
        a.add(&s, h, t0 + ms(61_000));
        let jobs = a.poll(t0 + ms(64_000));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].instances.len(), 5);
        assert_eq!(jobs[0].meta.series_instance_uid, "1.2.3.1");
        // From now on retention counts from the late instance, once its result is in.
        a.feedback(committed("1.2.3.1", &uids(&jobs[0])));
        assert_eq!(a.next_deadline(), Some(t0 + ms(661_000)));
    }

    #[test]
    fn a_restored_series_past_its_retention_is_released() {
        let mut a = retaining_with_feedback();
        let t0 = Instant::now();
        restore(&mut a, &analysed("1.2.3.1", 3, 120), t0);
        assert!(a.poll(t0).is_empty());
        assert_eq!(a.studies_held(), 0);
        let releases = a.take_releases();
        assert_eq!(releases.len(), 1);
        assert!(releases[0].forgotten && releases[0].paths.len() == 3);
    }

    #[test]
    fn an_unchanged_instance_set_is_not_analysed_again() {
        // After a restart, an instance the mark does not name but that is not analysable
        // (a scout in the series) re-opens the series: the candidate instances are the
        // ones already analysed, so no second analysis.
        let mut a = Assembler::new(config()).with_feedback(true);
        let t0 = Instant::now();
        restore(&mut a, &analysed("1.2.3.1", 3, 0), t0);
        let (mut s, _) = instance("1.2.3.1", 9, "", 1.0);
        s.sop_instance_uid = "1.2.3.1.scout".into();
        s.path = "/spool/1.2.3.1.scout.dcm".into();
        let mut h = scout();
        h.sop_instance_uid = s.sop_instance_uid.clone();
        a.add(&s, h, t0);
        assert!(a.poll(t0 + ms(10_000)).is_empty());
        assert_eq!(
            paths_of(&a.take_releases()),
            BTreeSet::from(["/spool/1.2.3.1.scout.dcm".to_string()])
        );
    }

    fn trigger_config() -> AssemblyConfig {
        AssemblyConfig {
            anatomy_coverage_trigger: true,
            min_coverage_mm: 10.0,
            coverage_check_secs: 1.0,
            ..config()
        }
    }

    /// Adds slices `from..to` of `series` (1 mm apart), one every 100 ms from `t0 + from *
    /// 100 ms`, polling after each; returns the jobs.
    fn stream(
        a: &mut Assembler,
        series: &str,
        kernel: &str,
        range: std::ops::Range<usize>,
        t0: Instant,
    ) -> Vec<SeriesJob> {
        let mut jobs = Vec::new();
        for k in range {
            let now = t0 + ms(100) * k as u32;
            let (s, mut h) = instance(series, k, kernel, 1.0);
            h.instance_number = Some(k as i64 + 1);
            a.add(&s, h, now);
            jobs.extend(a.poll(now));
        }
        jobs
    }

    fn dropped(series: &str) -> Feedback {
        Feedback::Dropped {
            study_instance_uid: STUDY.into(),
            series_instance_uid: series.into(),
            reason: "coverage".into(),
        }
    }

    #[test]
    fn the_trigger_analyses_a_long_enough_contiguous_slab_early() {
        let mut a = Assembler::new(trigger_config()).with_feedback(true);
        let t0 = Instant::now();
        // 10 slices 1 mm apart are 10 mm; the slab is measured every 250 ms at most (here
        // at 0, 300, 600 and 900 ms).
        let jobs = stream(&mut a, "1.2.3.1", "BONE", 0..9, t0);
        assert!(jobs.is_empty(), "9 mm is not enough");
        let jobs = stream(&mut a, "1.2.3.1", "BONE", 9..10, t0);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].completion, Completion::AnatomyCoverage);
        assert_eq!(jobs[0].instances.len(), 10);
        assert_eq!(
            jobs[0].meta.early,
            Some(EarlyCheck {
                // Instance 1 is the lowest slice; the highest is not the last one known.
                inferior_end_final: true,
                superior_end_final: false,
            })
        );
        // In flight: no second early analysis, however much arrives.
        assert!(stream(&mut a, "1.2.3.1", "BONE", 10..30, t0).is_empty());
        // Not published (the model did not see C1-C7 with margins): the next check, with
        // a grown slab and coverage_check_secs after the last early analysis, tries again.
        a.feedback(dropped("1.2.3.1"));
        let jobs = stream(&mut a, "1.2.3.1", "BONE", 30..31, t0);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].instances.len(), 31);
        // No early analysis once the series has been quiet for half its quiet period.
        let mut b = Assembler::new(trigger_config()).with_feedback(true);
        stream(&mut b, "1.2.3.1", "BONE", 0..9, t0);
        let (s, mut h) = instance("1.2.3.1", 9, "BONE", 1.0);
        h.instance_number = Some(10);
        b.add(&s, h, t0 + ms(850));
        assert!(b.poll(t0 + ms(850) + ms(1500)).is_empty());
        // Published: no more early checks; the series completes with more instances than
        // the early result named, so it is analysed again whole.
        a.feedback(committed("1.2.3.1", &uids(&jobs[0])));
        assert!(stream(&mut a, "1.2.3.1", "BONE", 31..40, t0).is_empty());
        let last = t0 + ms(3900);
        assert!(a.poll(last + ms(2999)).is_empty());
        let jobs = a.poll(last + ms(3000));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].completion, Completion::QuietPeriod);
        assert_eq!(jobs[0].instances.len(), 40);
        assert_eq!(jobs[0].meta.early, None);
    }

    #[test]
    fn a_published_early_result_of_the_whole_series_is_not_repeated() {
        let mut a = Assembler::new(trigger_config()).with_feedback(true);
        let t0 = Instant::now();
        let jobs = stream(&mut a, "1.2.3.1", "BONE", 0..10, t0);
        assert_eq!(jobs.len(), 1);
        // The series completes while its early analysis is in flight: the decision waits
        // (for the feedback, or at most until the study's max wait).
        assert!(a.poll(t0 + ms(5000)).is_empty());
        assert_eq!(a.next_deadline(), Some(t0 + ms(10_000)));
        a.feedback(committed("1.2.3.1", &uids(&jobs[0])));
        assert!(
            a.poll(t0 + ms(5000)).is_empty(),
            "the early result named every instance: not analysed again"
        );
        assert!(a.take_skips().is_empty());
    }

    #[test]
    fn the_trigger_waits_for_a_contiguous_slab_and_the_best_series() {
        let mut a = Assembler::new(trigger_config()).with_feedback(true);
        let t0 = Instant::now();
        // Every other slice: 2 mm steps, contiguous (no step above 1.5x the median).
        // A soft-tissue series long enough, but a bone one is arriving: not the best.
        for k in 0..12 {
            let (s, h) = instance("1.2.3.2", k, "SOFT", 1.0);
            a.add(&s, h, t0 + ms(10) * k as u32);
        }
        let (s, h) = instance("1.2.3.1", 0, "BONE", 1.0);
        a.add(&s, h, t0 + ms(200));
        assert!(
            a.poll(t0 + ms(200)).is_empty(),
            "the soft series is not the best"
        );
        // The bone series with a gap: 0..=5 and 8..=11 (5 and 4 mm): no 10 mm slab.
        for k in (1..6).chain(8..12) {
            let (s, h) = instance("1.2.3.1", k, "BONE", 1.0);
            a.add(&s, h, t0 + ms(1500) + ms(10) * k as u32);
        }
        assert!(a.poll(t0 + ms(1700)).is_empty(), "no slab of 10 mm");
        // The gap filled: 12 mm, checked again after the rate limit.
        for k in 6..8 {
            let (s, h) = instance("1.2.3.1", k, "BONE", 1.0);
            a.add(&s, h, t0 + ms(1800));
        }
        assert!(
            a.poll(t0 + ms(1800)).is_empty(),
            "checked less than 250 ms ago"
        );
        assert_eq!(a.next_deadline(), Some(t0 + ms(1950)));
        let jobs = a.poll(t0 + ms(1950));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].meta.series_instance_uid, "1.2.3.1");
        assert_eq!(jobs[0].instances.len(), 12);
    }
}
