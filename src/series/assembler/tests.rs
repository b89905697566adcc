//! Tests of the state machine and the anatomy-coverage trigger, with time moved by hand.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::*;
use crate::dicom::spool::AnalysedSeries;
use crate::dicom::{Arrival, StoredInstance};
use crate::series::header::InstanceHeader;
use crate::series::selection::{Rejection, SkipReason, CT_IMAGE_STORAGE};
use crate::series::{AssemblyConfig, EarlyCheck, ExpectedCountRule, SeriesKey};

const STUDY: &str = "1.2.3";

pub(super) fn config() -> AssemblyConfig {
    AssemblyConfig {
        quiet_period_secs: 3.0,
        max_wait_secs: 10.0,
        study_quiet_period_secs: Some(3.0),
        ..Default::default()
    }
}

/// One axial instance of `series` at slice `k`.
pub(super) fn instance(
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

pub(super) fn add_series(
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

pub(super) fn ms(n: u64) -> Duration {
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
            .find(|s| s.key.series == uid)
            .unwrap()
            .reason
            .clone()
    };
    assert!(
        matches!(reason("1.2.3.1"), SkipReason::NotTheBest { best, .. } if best.series_instance_uid == "1.2.3.2"),
        "{skips:?}"
    );
    assert_eq!(
        reason("1.2.3.9"),
        SkipReason::NotASlice(Rejection::Localizer),
        "{skips:?}"
    );
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
        skips
            .iter()
            .any(|s| s.key.series == "1.2.3.3"
                && matches!(&s.reason, SkipReason::LateNotBetter { chosen, .. } if chosen.series_instance_uid == "1.2.3.2")),
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
        series: SeriesKey::new(STUDY, series),
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
    assert!(releases[0].forgotten());
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
        series: SeriesKey::new("1.2.4", "1.2.4.1"),
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
    assert!(releases.iter().all(|r| r.forgotten()));
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
    assert!(releases.iter().all(|r| !r.forgotten()));
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
    assert!(forgotten.iter().all(|r| r.forgotten()));
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

pub(super) fn analysed(series: &str, n: usize, age_secs: i64) -> AnalysedSeries {
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

pub(super) fn restore(a: &mut Assembler, series: &AnalysedSeries, now: Instant) {
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
    assert!(releases[0].forgotten() && releases[0].paths.len() == 3);
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
        series: SeriesKey::new(STUDY, series),
        reason: super::DropReason::EarlyWithheld(
            crate::events::EarlyWithholdReason::VertebraMissing {
                found: vec!["C1".into()],
            },
        ),
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
