//! The assembly state machine, [`Assembler`]: instances in ([`Assembler::add`],
//! [`Assembler::restore`], [`Assembler::feedback`]), series to build, skips and spool
//! releases out ([`Assembler::poll`]), following the rules of the module docs
//! ([`super`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::early::early_job;
use super::job::{make_job, Completion, Feedback, Release, SeriesJob};
use super::state::{reopen, secs, SeriesState, StudyState};
use crate::dicom::spool::AnalysedSeries;
use crate::dicom::{Arrival, StoredInstance};
use crate::series::header::InstanceHeader;
use crate::series::selection::{
    choose_candidate, filter_series, instance_rejection, rank_key, CandidateSummary, Skip,
};
use crate::series::AssemblyConfig;

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
    pub(super) feedback: bool,
}

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
