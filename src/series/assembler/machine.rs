//! The assembly state machine, [`Assembler`]: instances in ([`Assembler::add`],
//! [`Assembler::restore`], [`Assembler::feedback`]), series to build, skips, spool
//! releases and events out ([`Assembler::poll`]), following the rules of the module docs
//! ([`super`]). It stays free of I/O: the events it records (a series assembled,
//! re-opened, remembered) are emitted by its task ([`Assembler::take_events`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::early::early_job;
use super::job::{Completion, Feedback, Release, SeriesJob};
use super::rules::{
    compare_late_series, complete_series, decide_pending_study, forget_quiet_studies, PollOutput,
    Timings,
};
use super::state::{release_rejected, reopen, secs, SeriesState, StudyState};
use crate::dicom::spool::AnalysedSeries;
use crate::dicom::{Arrival, StoredInstance};
use crate::events::{Event, ReleaseReason};
use crate::series::header::InstanceHeader;
use crate::series::selection::{filter_series, rank_key, CandidateSummary, Skip};
use crate::series::AssemblyConfig;

/// The assembly state machine. Feed it with [`Assembler::add`], call
/// [`Assembler::poll`] at [`Assembler::next_deadline`] (or any time) to get the series to
/// build; read the skips with [`Assembler::take_skips`], the spool files to remove with
/// [`Assembler::take_releases`] and the events with [`Assembler::take_events`].
#[derive(Debug)]
pub struct Assembler {
    config: AssemblyConfig,
    studies: BTreeMap<String, StudyState>,
    skipped: Vec<Skip>,
    releases: Vec<Release>,
    events: Vec<Event>,
    /// Whether [`Assembler::feedback`] reports committed results: a study is then only
    /// forgotten once every job sent for it has its result committed (or was dropped).
    pub(super) feedback: bool,
}

impl Assembler {
    pub fn new(config: AssemblyConfig) -> Self {
        Assembler {
            config,
            studies: BTreeMap::new(),
            skipped: Vec::new(),
            releases: Vec::new(),
            events: Vec::new(),
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
                if reopen(series, stored, now) {
                    self.events.push(reopened(stored));
                }
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
                    reason: ReleaseReason::ReceivedAgain,
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
        if reopen(series, stored, now) {
            self.events.push(reopened(stored));
        }
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
        self.events.push(Event::SeriesRemembered {
            study_instance_uid: study_uid,
            series_instance_uid: series_uid,
            instances: series.instances.len(),
            result_id: analysed.mark.result_id.clone(),
        });
    }

    /// What happened to a job sent earlier (only with [`Assembler::with_feedback`]).
    pub fn feedback(&mut self, feedback: Feedback) {
        let Some(study) = self.studies.get_mut(&feedback.series().study) else {
            log::debug!("feedback for a study no longer held: {feedback:?}");
            return;
        };
        study.in_flight = study.in_flight.saturating_sub(1);
        if let Some(series) = study.series.get_mut(&feedback.series().series) {
            series.early_in_flight = false;
        }
        match feedback {
            Feedback::Committed {
                series: key,
                sop_instance_uids,
            } => {
                if let Some(series) = study.series.get_mut(&key.series) {
                    series.analysed.extend(sop_instance_uids);
                }
            }
            Feedback::Dropped { series, reason } => {
                log::info!("no result for {series}: {reason}")
            }
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

    /// Advances the state machine to `now`: applies rules 2-5 of the module docs to each
    /// study in turn ([`super::rules`]) and returns the series to build (in study order).
    pub fn poll(&mut self, now: Instant) -> Vec<SeriesJob> {
        let t = Timings::of(&self.config);
        let extra_bone = self.config.bone_kernels.clone();
        let mut out = PollOutput {
            jobs: Vec::new(),
            skips: Vec::new(),
            releases: &mut self.releases,
        };
        for (study_uid, study) in self.studies.iter_mut() {
            let jobs_before = out.jobs.len();
            complete_series(study_uid, study, now, &t, &mut self.events);
            // After the completions: a series complete now is analysed whole, not early.
            if self.config.anatomy_coverage_trigger {
                out.jobs.extend(early_job(
                    study_uid,
                    study,
                    now,
                    &self.config,
                    self.feedback,
                ));
            }
            if !study.decided {
                decide_pending_study(study_uid, study, now, &t, &extra_bone, &mut out);
            } else {
                compare_late_series(study_uid, study, &extra_bone, &mut out);
            }
            if self.feedback {
                study.in_flight += out.jobs.len() - jobs_before;
            }
        }
        forget_quiet_studies(&mut self.studies, now, &t, out.releases);

        for skip in &out.skips {
            log::info!(
                "not analysed: {} ({} instance(s)): {}",
                skip.key,
                skip.instances,
                skip.reason
            );
        }
        self.skipped.extend(out.skips);
        out.jobs
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

    /// Events recorded since the last call, in order (series assembled, re-opened,
    /// remembered).
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Number of studies still held (assembling, or remembered for late instances).
    pub fn studies_held(&self) -> usize {
        self.studies.len()
    }
}

/// The event of a complete series re-opened by `stored`.
fn reopened(stored: &StoredInstance) -> Event {
    Event::SeriesReopened {
        study_instance_uid: stored.study_instance_uid.clone(),
        series_instance_uid: stored.series_instance_uid.clone(),
        sop_instance_uid: stored.sop_instance_uid.clone(),
    }
}
