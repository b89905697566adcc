//! Rules 2-5 of the module docs ([`super`]), one function each, applied to one study (or,
//! for forgetting, to all) by [`super::Assembler::poll`] in this order: complete series,
//! decide a pending study, compare late series with the chosen one, forget quiet studies.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::job::{Completion, Release, SeriesJob};
use super::state::{make_job, release_rejected, secs, SeriesState, StudyState};
use crate::events::{Event, ReleaseReason};
use crate::series::header::InstanceHeader;
use crate::series::selection::{
    filter_series, rank_key, selection, CandidateSummary, Skip, SkipReason, StudySelection,
};
use crate::series::{AssemblyConfig, SeriesKey};

/// The durations of the rules, from the configuration.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timings {
    pub(super) quiet: Duration,
    pub(super) max_wait: Duration,
    pub(super) study_quiet: Duration,
    pub(super) retention: Duration,
}

impl Timings {
    pub(super) fn of(config: &AssemblyConfig) -> Timings {
        Timings {
            quiet: secs(config.quiet_period_secs),
            max_wait: secs(config.max_wait_secs),
            study_quiet: secs(config.study_quiet_period()),
            retention: secs(config.completed_retention_secs),
        }
    }
}

/// What a poll produces: the series to build, the skips, and the spool files to release
/// (the assembler's own list).
pub(super) struct PollOutput<'a> {
    pub(super) jobs: Vec<SeriesJob>,
    pub(super) skips: Vec<Skip>,
    pub(super) releases: &'a mut Vec<Release>,
}

/// Rule 2: the series of `study` not complete yet that are complete at `now` (expected
/// count reached, quiet period over, or max wait over), each recorded in `events`.
pub(super) fn complete_series(
    study_uid: &str,
    study: &mut StudyState,
    now: Instant,
    t: &Timings,
    events: &mut Vec<Event>,
) {
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
        } else if now >= series.last_at + t.quiet {
            Some(Completion::QuietPeriod)
        } else if now >= series.first_at + t.max_wait {
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
            if let Some(completion) = c.as_event() {
                events.push(Event::SeriesAssembled {
                    study_instance_uid: study_uid.to_owned(),
                    series_instance_uid: series_uid.clone(),
                    instances: series.sop_uids.len(),
                    completion,
                });
            }
        }
    }
}

/// Rule 3: decides `study` (not decided yet) if it is settled (all series complete, no
/// early analysis in flight, quiet for the study quiet period) or its max wait is over:
/// the best series is built, the others skipped, the unanalysable instances released.
pub(super) fn decide_pending_study(
    study_uid: &str,
    study: &mut StudyState,
    now: Instant,
    t: &Timings,
    extra_bone: &[String],
    out: &mut PollOutput,
) {
    let all_complete = study.series.values().all(|s| s.completion.is_some());
    // An early analysis in flight is waited for: if it is published, and no
    // instance arrived since, its series need not be analysed again.
    let early_in_flight = study.series.values().any(|s| s.early_in_flight);
    let settled = all_complete && !early_in_flight && now >= study.last_at + t.study_quiet;
    let forced = now >= study.first_at + t.max_wait;
    if settled || forced {
        study.decided = true;
        let (job, study_skips) = decide_study(study_uid, study, extra_bone);
        out.skips.extend(study_skips);
        out.jobs.extend(job);
        for (series_uid, series) in study.series.iter_mut() {
            if series.evaluated {
                release_rejected(study_uid, series_uid, series, out.releases);
            }
        }
    }
}

/// Rule 4: in a decided study, each series completed since (late, or re-opened by late
/// instances) is built if it is the chosen series or a better one, else skipped.
pub(super) fn compare_late_series(
    study_uid: &str,
    study: &mut StudyState,
    extra_bone: &[String],
    out: &mut PollOutput,
) {
    for (series_uid, series) in study.series.iter_mut() {
        if series.completion.is_none() || series.evaluated || series.early_in_flight {
            continue;
        }
        series.evaluated = true;
        release_rejected(study_uid, series_uid, series, out.releases);
        let (accepted, series_skips) = filter_series(series.instances.clone());
        out.skips.extend(series_skips);
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
        let summary = CandidateSummary::from_headers(series_uid, &refs, extra_bone);
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
            out.jobs
                .push(make_job(study_uid, series_uid, series, accepted));
            study.chosen = Some(summary);
        } else {
            let chosen = study.chosen.as_ref().expect("checked above");
            out.skips.push(Skip {
                key: SeriesKey::new(study_uid, series_uid),
                instances: accepted.len(),
                reason: SkipReason::LateNotBetter {
                    chosen: chosen.clone(),
                    this: summary,
                },
            });
        }
    }
}

/// Rule 5: forgets decided studies long quiet, once everything in them was evaluated and
/// every result of them is committed; their spool files go with them.
pub(super) fn forget_quiet_studies(
    studies: &mut BTreeMap<String, StudyState>,
    now: Instant,
    t: &Timings,
    releases: &mut Vec<Release>,
) {
    studies.retain(|uid, study| {
        let keep = !(study.finished() && now >= study.forget_at(t.retention));
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
                    reason: ReleaseReason::StudyForgotten,
                });
            }
        }
        keep
    });
}

/// Selection ([`selection`]) over the complete series of a study being decided.
fn decide_study(
    study_uid: &str,
    study: &mut StudyState,
    extra_bone: &[String],
) -> (Option<SeriesJob>, Vec<Skip>) {
    let mut complete = Vec::new();
    for (series_uid, series) in study.series.iter_mut() {
        // Series still incomplete at a forced decision are handled when they complete.
        if series.completion.is_none() {
            continue;
        }
        series.evaluated = true;
        complete.push((series_uid.clone(), series.instances.clone()));
    }
    let StudySelection { ranked, skips } = selection(study_uid, complete, extra_bone);
    let Some(best) = ranked.first() else {
        log::info!("study {study_uid}: no axial CT series of ORIGINAL images to analyse");
        return (None, skips);
    };
    study.chosen = Some(best.summary.clone());
    let best_uid = &best.summary.series_instance_uid;
    if study.series[best_uid].already_analysed(&best.instances) {
        log::info!(
            "study {study_uid}: series {best_uid} ({}) is the best, and its instances are the \
             ones already analysed; not analysed again",
            best.summary.describe()
        );
        return (None, skips);
    }
    log::info!(
        "study {study_uid}: analysing series {} ({})",
        best.summary.series_instance_uid,
        best.summary.describe()
    );
    let mut ranked = ranked.into_iter().map(|c| {
        let series_uid = c.summary.series_instance_uid;
        make_job(
            study_uid,
            &series_uid,
            &study.series[&series_uid],
            c.instances,
        )
    });
    let mut job = ranked.next().expect("at least one candidate");
    job.fallbacks = ranked.collect();
    (Some(job), skips)
}
