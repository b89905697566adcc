//! Tests of postprocessing: vertebra extents, coverage, tilt, the early check, thresholds
//! and the verdicts built from synthetic model outputs.

use std::collections::BTreeMap;

use super::*;
use crate::events::{EarlyWithholdReason, SlabEnd};
use crate::inference::contract::ModelContract;
use crate::inference::engine::ModelOutputs;
use crate::inference::envelope::{self, EnvelopePolicy, Violation};
use crate::inference::preprocess::tests::linear_volume;
use crate::inference::preprocess::ModelGrid;
use crate::result::{result_id, Status};
use crate::series::{EarlyCheck, SeriesMeta};

fn contract() -> ModelContract {
    serde_json::from_str(&crate::inference::contract::tests::example_json("ab")).unwrap()
}

/// Outputs where vertebra v occupies model slices [4v + 1, 4v + 4] with 10 cells each
/// (slice 0 is background: C1 lies whole in a series of more than 5 slices).
fn outputs(slices: usize, vertebra_logits: [f32; 7], patient_logit: f32) -> ModelOutputs {
    outputs_from(1, slices, vertebra_logits, patient_logit)
}

/// [`outputs`] with vertebra v on model slices [4v + first, 4v + first + 3].
fn outputs_from(
    first: usize,
    slices: usize,
    vertebra_logits: [f32; 7],
    patient_logit: f32,
) -> ModelOutputs {
    let (h, w, classes) = (32, 32, 8);
    let mut seg = vec![0f32; slices * classes * h * w];
    for k in 0..slices {
        let v = if k < first { 7 } else { (k - first) / 4 };
        for cell in 0..h * w {
            let class = if v < 7 && cell < 10 { v + 1 } else { 0 };
            seg[(k * classes + class) * h * w + cell] = 5.0;
        }
    }
    let mut attention = vec![1.0 / slices as f32; 7 * slices];
    for v in 0..7 {
        let peak = (4 * v + first + 2).min(slices - 1);
        attention[v * slices + peak] = 0.5;
    }
    ModelOutputs {
        slices,
        seg_logits: seg,
        seg_classes: classes,
        seg_h: h,
        seg_w: w,
        vertebra_logits,
        patient_logit,
        attention,
    }
}

fn grid(slices: usize) -> ModelGrid {
    ModelGrid {
        centre: [0.0; 3],
        z_mm: (0..slices).map(|k| 10.0 + 2.0 * k as f64).collect(),
    }
}

/// Sets `cells` cells of model slice `k` to class `class` (the rest stays as it was).
fn paint(out: &mut ModelOutputs, k: usize, class: usize, cells: usize) {
    let plane = out.seg_h * out.seg_w;
    for cell in 100..100 + cells {
        for c in 0..out.seg_classes {
            out.seg_logits[(k * out.seg_classes + c) * plane + cell] =
                if c == class { 5.0 } else { 0.0 };
        }
    }
}

/// Model slice `k` of [`outputs`] with no vertebra: its 10 vertebra cells background.
fn erase(out: &mut ModelOutputs, k: usize) {
    let plane = out.seg_h * out.seg_w;
    for cell in 0..10 {
        for c in 0..out.seg_classes {
            out.seg_logits[(k * out.seg_classes + c) * plane + cell] =
                if c == 0 { 5.0 } else { 0.0 };
        }
    }
}

#[test]
fn vertebra_extent_is_its_main_run_not_first_to_last_cell() {
    let c = contract();
    let mut out = outputs(60, [0.0; 7], 0.0);
    // C1 is at slices 1..=4 (10 cells each); a stray C1 blob far below at slice 50,
    // and C3 (slices 9..=12) loses its label on slice 10 (a 2 mm slice through a crack).
    paint(&mut out, 50, 1, 5);
    paint(&mut out, 10, 0, 10);
    for cell in 0..10 {
        let plane = out.seg_h * out.seg_w;
        out.seg_logits[(10 * out.seg_classes + 3) * plane + cell] = 0.0;
    }
    let extent = vertebra_extent(&out, &c.coverage);
    assert_eq!(extent[0], Some((1, 4)), "stray cells do not stretch C1");
    assert_eq!(extent[2], Some((9, 12)), "a one-slice gap is bridged");
}

#[test]
fn positive_flags_the_vertebra_and_points_at_its_peak() {
    let c = contract();
    let t = Thresholds::resolve(&c, None, &BTreeMap::new());
    let vol = linear_volume(40, 8, 8, false);
    let out = outputs(30, [-3.0, -3.0, -3.0, -3.0, 2.0, -3.0, -3.0], 3.0);
    let run = RunInfo::new(&c, "cpu");
    let v = interpret(&vol, &grid(30), &out, &c, &t, &run, EnvelopePolicy::Enforce);
    let r = &v.result;
    assert_eq!(r.status, Status::Positive);
    assert!(r.vertebrae["C5"].flagged);
    assert!(!r.vertebrae["C4"].flagged);
    assert_eq!(
        r.vertebrae["C5"].z_range_mm,
        Some([10.0 + 34.0, 10.0 + 40.0])
    );
    assert_eq!(v.key_model_slice, Some(19));
    assert_eq!(v.key_vertebra, Some(4));
    // Model slice 19 is at z = 48 mm; source slices are 2.5 mm apart from z = 10.
    let key = r.key_slice.as_ref().unwrap();
    assert!((key.z_mm - 48.0).abs() <= 1.25, "{key:?}");
    // The flagged vertebra has the same key slice; the others have none.
    assert_eq!(r.vertebrae["C5"].key_slice.as_ref(), Some(key));
    for (name, v) in &r.vertebrae {
        assert_eq!(v.key_slice.is_some(), name == "C5", "{name}: {v:?}");
    }
    // The id names the series, the model and the 40 instances analysed.
    let sops: Vec<String> = (0..40).map(|k| format!("1.2.3.{k}")).collect();
    assert_eq!(r.id, result_id("1.2.3", "ab", Status::Positive, &sops));
    assert_eq!(r.instances, 40);
}

#[test]
fn each_flagged_vertebra_has_its_own_key_slice() {
    let c = contract();
    let t = Thresholds::resolve(&c, None, &BTreeMap::new());
    let vol = linear_volume(40, 8, 8, false);
    // C2 and C5 flagged, C5 the more probable.
    let out = outputs(30, [-3.0, 1.0, -3.0, -3.0, 2.0, -3.0, -3.0], 3.0);
    let v = interpret(
        &vol,
        &grid(30),
        &out,
        &c,
        &t,
        &RunInfo::new(&c, "cpu"),
        EnvelopePolicy::Enforce,
    );
    let r = &v.result;
    // Attention peaks (see `outputs`): C2 at model slice 7 (z = 24 mm), C5 at 19 (48 mm),
    // each reported as the nearest source slice (2.5 mm apart from z = 10 mm).
    let c2 = r.vertebrae["C2"].key_slice.as_ref().expect("C2 is flagged");
    let c5 = r.vertebrae["C5"].key_slice.as_ref().expect("C5 is flagged");
    assert_eq!((c2.z_mm, c2.sop_instance_uid.as_str()), (25.0, "1.2.3.6"));
    assert_eq!((c5.z_mm, c5.sop_instance_uid.as_str()), (47.5, "1.2.3.15"));
    // Each within its vertebra's z range.
    for (key, name) in [(c2, "C2"), (c5, "C5")] {
        let [a, b] = r.vertebrae[name].z_range_mm.unwrap();
        assert!((a - 1.25..=b + 1.25).contains(&key.z_mm), "{name}: {key:?}");
    }
    // The overall key slice is the most probable flagged vertebra's.
    assert_eq!(r.key_slice.as_ref(), Some(c5));
    assert_eq!(v.key_vertebra, Some(4));
    for name in ["C1", "C3", "C4", "C6", "C7"] {
        assert_eq!(r.vertebrae[name].key_slice, None, "{name}");
    }
}

#[test]
fn a_flagged_vertebra_not_found_in_the_series_has_no_key_slice() {
    let c = contract();
    let t = Thresholds::resolve(&c, None, &BTreeMap::new());
    let vol = linear_volume(40, 8, 8, false);
    // 30 model slices, C4 (slices 13..=16) not found between C3 and C5: covered (the
    // extent holds it), 6 of 7 found (at least 5 needed).
    let mut out = outputs(30, [-3.0, -3.0, 1.0, 2.0, -3.0, -3.0, -3.0], 3.0);
    (13..=16).for_each(|k| erase(&mut out, k));
    let v = interpret(
        &vol,
        &grid(30),
        &out,
        &c,
        &t,
        &RunInfo::new(&c, "cpu"),
        EnvelopePolicy::Enforce,
    );
    let r = &v.result;
    assert_eq!(r.status, Status::Positive);
    assert_eq!(r.not_covered.as_deref(), Some(&[][..]));
    let c4 = &r.vertebrae["C4"];
    assert!(c4.flagged && c4.z_range_mm.is_none() && c4.key_slice.is_none());
    assert!(r.vertebrae["C3"].key_slice.is_some());
}

#[test]
fn negative_result_has_an_overall_key_slice_but_no_vertebra_key_slice() {
    let c = contract();
    let t = Thresholds::resolve(&c, None, &BTreeMap::new());
    let vol = linear_volume(40, 8, 8, false);
    let out = outputs(30, [-3.0, -2.0, -3.0, -3.0, -3.0, -3.0, -3.0], -3.0);
    let v = interpret(
        &vol,
        &grid(30),
        &out,
        &c,
        &t,
        &RunInfo::new(&c, "cpu"),
        EnvelopePolicy::Enforce,
    );
    assert_eq!(v.result.status, Status::Negative);
    assert!(v.result.key_slice.is_some());
    assert!(v.result.vertebrae.values().all(|v| v.key_slice.is_none()));
}

#[test]
fn failed_and_indeterminate_results_name_their_instances_too() {
    let c = contract();
    let run = RunInfo::new(&c, "cpu");
    let mut meta = SeriesMeta {
        series_instance_uid: "1.2.9".into(),
        sop_instance_uids: vec!["1.2.9.1".into(), "1.2.9.2".into()],
        ..SeriesMeta::default()
    };
    let failed = failed_result(&meta, &run, "broken");
    assert_eq!(failed.instances, 2);
    let sops = ["1.2.9.1", "1.2.9.2"];
    assert_eq!(failed.id, result_id("1.2.9", "ab", Status::Failed, &sops));
    let indeterminate = indeterminate_result(&meta, &run, "too short");
    assert_eq!(
        indeterminate.id,
        result_id("1.2.9", "ab", Status::Indeterminate, &sops)
    );
    meta.sop_instance_uids.push("1.2.9.3".into());
    assert_ne!(failed_result(&meta, &run, "broken").id, failed.id);
}

#[test]
fn a_flagged_vertebra_makes_the_result_positive_without_the_patient_flag() {
    let c = contract();
    let t = Thresholds::resolve(&c, None, &BTreeMap::new());
    let vol = linear_volume(40, 8, 8, false);
    let run = RunInfo::new(&c, "cpu");
    // C5 flagged (p = 0.88), the patient not (p = 0.05).
    let out = outputs(30, [-3.0, -3.0, -3.0, -3.0, 2.0, -3.0, -3.0], -3.0);
    let r = interpret(&vol, &grid(30), &out, &c, &t, &run, EnvelopePolicy::Enforce).result;
    assert!(!r.patient.as_ref().unwrap().flagged);
    assert!(r.vertebrae["C5"].flagged);
    assert_eq!(r.status, Status::Positive, "a flagged vertebra is an alert");
    let sops: Vec<String> = (0..40).map(|k| format!("1.2.3.{k}")).collect();
    assert_eq!(r.id, result_id("1.2.3", "ab", Status::Positive, &sops));
    // The patient flag alone is positive too.
    let out = outputs(30, [-3.0; 7], 3.0);
    let r = interpret(&vol, &grid(30), &out, &c, &t, &run, EnvelopePolicy::Enforce).result;
    assert!(r.vertebrae.values().all(|v| !v.flagged));
    assert_eq!(r.status, Status::Positive);
    // Neither: negative.
    let out = outputs(30, [-3.0; 7], -3.0);
    let r = interpret(&vol, &grid(30), &out, &c, &t, &run, EnvelopePolicy::Enforce).result;
    assert_eq!(r.status, Status::Negative);
    assert_eq!(r.id, result_id("1.2.3", "ab", Status::Negative, &sops));
}

/// The vertebra, slab end and margin of a `NearOpenEnd` reason (panics on another reason).
fn near_open_end(why: &EarlyWithholdReason) -> (&str, SlabEnd, f64) {
    match why {
        EarlyWithholdReason::NearOpenEnd {
            vertebra,
            side,
            margin_mm,
            ..
        } => (vertebra, *side, *margin_mm),
        other => panic!("not near an open end: {other:?}"),
    }
}

#[test]
fn early_coverage_needs_c1_and_c7_with_a_vertebra_of_margin_or_a_final_end() {
    let c = contract();
    let open = EarlyCheck::default();
    // `outputs`: vertebra v on model slices [4v, 4v + 3], 2 mm apart: each vertebra is
    // 8 mm high; C1 on 0..=3 (lowest z), C7 on 24..=27.
    // 30 slices: C7 ends 2 slices (4 mm) below the highest end; C1 starts at the lowest.
    let out = outputs_from(0, 30, [-3.0; 7], -3.0);
    let why = early_coverage(&out, &grid(30), &c.coverage, &open).unwrap_err();
    let (vertebra, side, margin_mm) = near_open_end(&why);
    assert_eq!((vertebra, side), ("C1", SlabEnd::Inferior));
    assert!(margin_mm.abs() < 1e-9, "{why}");
    // Both ends final (first and last instance of the series): nothing more can come.
    let both = EarlyCheck {
        inferior_end_final: true,
        superior_end_final: true,
    };
    early_coverage(&out, &grid(30), &c.coverage, &both).unwrap();
    // Only the C1 side final: C7 still lacks its margin (4 mm < 8 mm).
    let c1_final = EarlyCheck {
        inferior_end_final: true,
        superior_end_final: false,
    };
    let why = early_coverage(&out, &grid(30), &c.coverage, &c1_final).unwrap_err();
    let (vertebra, side, margin_mm) = near_open_end(&why);
    assert_eq!((vertebra, side), ("C7", SlabEnd::Superior));
    assert!((margin_mm - 4.0).abs() < 1e-9, "{why}");
    // Margins: shift everything up by 4 slices (8 mm) and extend the slab by 4 more
    // above C7 (12 mm = 6 slices): both margins at least one vertebra.
    let mut wide = outputs_from(0, 38, [-3.0; 7], -3.0);
    let cells = wide.seg_h * wide.seg_w;
    let base = outputs_from(0, 28, [-3.0; 7], -3.0);
    wide.seg_logits.iter_mut().for_each(|v| *v = 0.0);
    for k in 0..38 {
        // Background everywhere, then copy slices 0..28 of `base` to 4..32.
        for cell in 0..cells {
            wide.seg_logits[(k * 8) * cells + cell] = 5.0;
        }
    }
    for k in 0..28 {
        let (src, dst) = (k * 8 * cells, (k + 4) * 8 * cells);
        wide.seg_logits[dst..dst + 8 * cells]
            .copy_from_slice(&base.seg_logits[src..src + 8 * cells]);
    }
    early_coverage(&wide, &grid(38), &c.coverage, &open).unwrap();
    // A slab without C7: never published early.
    let short = outputs_from(0, 20, [-3.0; 7], -3.0);
    let why = early_coverage(&short, &grid(20), &c.coverage, &both).unwrap_err();
    assert_eq!(
        why,
        EarlyWithholdReason::VertebraMissing {
            found: ["C1", "C2", "C3", "C4", "C5"].map(String::from).to_vec()
        }
    );
}

#[test]
fn threshold_override_changes_the_flag() {
    let c = contract();
    let overrides = BTreeMap::from([("C5".to_string(), 0.95f32)]);
    let t = Thresholds::resolve(&c, Some(0.99), &overrides);
    let vol = linear_volume(40, 8, 8, false);
    let out = outputs(30, [-3.0, -3.0, -3.0, -3.0, 2.0, -3.0, -3.0], 3.0);
    let v = interpret(
        &vol,
        &grid(30),
        &out,
        &c,
        &t,
        &RunInfo::new(&c, "cpu"),
        EnvelopePolicy::Enforce,
    );
    assert_eq!(v.result.status, Status::Negative);
    assert!(!v.result.vertebrae["C5"].flagged);
}

/// `outputs(30, ..)` with vertebra v moved `shift * v` cells along the columns: a neck
/// whose axis leans `shift` cells (5 mm) per vertebra (4 slices of 2 mm).
fn leaning_outputs(shift: usize, vertebra_logits: [f32; 7], patient_logit: f32) -> ModelOutputs {
    let mut out = outputs(30, vertebra_logits, patient_logit);
    let plane = out.seg_h * out.seg_w;
    for k in 1..29 {
        let v = (k - 1) / 4;
        for cell in 0..plane {
            let class = if (400 + shift * v..410 + shift * v).contains(&cell) {
                v + 1
            } else {
                0
            };
            for c in 0..out.seg_classes {
                out.seg_logits[(k * out.seg_classes + c) * plane + cell] =
                    if c == class { 5.0 } else { 0.0 };
            }
        }
    }
    out
}

#[test]
fn lateral_tilt_is_the_angle_of_the_vertebra_centroids() {
    let c = contract();
    let straight = leaning_outputs(0, [0.0; 7], 0.0);
    let tilt = lateral_tilt_deg(&straight, &vertebra_extent(&straight, &c.coverage), &c);
    assert!(tilt.unwrap().abs() < 1e-9, "{tilt:?}");
    // One 5 mm cell per 8 mm of z: atan(5 / 8) = 32.0 degrees.
    let leaning = leaning_outputs(1, [0.0; 7], 0.0);
    let tilt = lateral_tilt_deg(&leaning, &vertebra_extent(&leaning, &c.coverage), &c).unwrap();
    assert!((tilt - 32.005).abs() < 0.01, "{tilt}");
    // Too few vertebrae to fit an axis.
    let short = outputs(12, [0.0; 7], 0.0);
    assert_eq!(
        lateral_tilt_deg(&short, &vertebra_extent(&short, &c.coverage), &c),
        None
    );
}

#[test]
fn a_neck_tilted_beyond_the_contract_is_indeterminate_never_negative_or_positive() {
    let mut c = contract();
    let t = Thresholds::resolve(&c, None, &BTreeMap::new());
    let vol = linear_volume(40, 8, 8, false);
    let leaning = leaning_outputs(1, [5.0; 7], 5.0);
    // Without the limit (contracts before 0.7.0) the result is published as before.
    let v = interpret(
        &vol,
        &grid(30),
        &leaning,
        &c,
        &t,
        &RunInfo::new(&c, "cpu"),
        EnvelopePolicy::Enforce,
    );
    assert_eq!(v.result.status, Status::Positive);
    c.coverage.max_lateral_tilt_deg = Some(15.0);
    let v = interpret(
        &vol,
        &grid(30),
        &leaning,
        &c,
        &t,
        &RunInfo::new(&c, "cpu"),
        EnvelopePolicy::Enforce,
    );
    assert_eq!(v.result.status, Status::Indeterminate);
    let reason = v.result.reason.unwrap();
    assert!(
        reason.contains(REASON_POSE) && reason.contains("32 degrees"),
        "{reason}"
    );
    // A straight neck under the same limit is unaffected.
    let straight = leaning_outputs(0, [5.0; 7], 5.0);
    let v = interpret(
        &vol,
        &grid(30),
        &straight,
        &c,
        &t,
        &RunInfo::new(&c, "cpu"),
        EnvelopePolicy::Enforce,
    );
    assert_eq!(v.result.status, Status::Positive);
}

/// The contract of the tests with an envelope that needs `min` levels in view.
fn contract_needing(min: usize) -> ModelContract {
    let mut c = contract();
    c.envelope = Some(envelope::Envelope {
        pixel_spacing_mm: envelope::MmRange { min: 0.1, max: 5.0 },
        slice_spacing_mm: envelope::MmRange { min: 0.1, max: 5.0 },
        slice_thickness_mm: envelope::MmRange { min: 0.1, max: 5.0 },
        kernel_families: Vec::new(),
        min_coverage_mm: None,
        min_covered_vertebrae: Some(min),
    });
    c
}

fn names(v: &[&str]) -> Option<Vec<String>> {
    Some(v.iter().map(|s| s.to_string()).collect())
}

#[test]
fn in_view_is_from_the_first_to_the_last_vertebra_whole_in_the_series() {
    // 30 slices: all seven whole. 24: C6 (21..=24) reaches the last slice, C7 absent.
    let whole = |slices| {
        InView::of(
            &vertebra_extent(&outputs(slices, [0.0; 7], 0.0), &contract().coverage),
            slices,
        )
    };
    assert_eq!(whole(30).span, Some((0, 6)));
    assert!(whole(30).not_covered().is_empty());
    assert_eq!(whole(24).span, Some((0, 4)));
    assert_eq!(whole(24).not_covered(), ["C6", "C7"]);
    // C1 on the first slice (the series starts inside it): not covered either.
    let cut = outputs_from(0, 30, [0.0; 7], 0.0);
    let in_view = InView::of(&vertebra_extent(&cut, &contract().coverage), 30);
    assert_eq!(in_view.span, Some((1, 6)));
    assert_eq!(in_view.levels(), 6);
    // Nothing found: nothing covered.
    let none = InView::of(&[None; 7], 30);
    assert_eq!(
        (none.span, none.levels(), none.not_covered().len()),
        (None, 0, 7)
    );
}

#[test]
fn a_partial_series_is_analysed_in_view_and_never_negative() {
    let c = contract_needing(2);
    let t = Thresholds::resolve(&c, None, &BTreeMap::new());
    let vol = linear_volume(40, 8, 8, false);
    let run = RunInfo::new(&c, "cpu");
    // 14 model slices: C1, C2, C3 whole (1..=12), C4 on 13 (the last slice, cut).
    // Nothing flagged in view, C5 and C7 "flagged" out of view: not analysed.
    let out = outputs(14, [-3.0, -3.0, -3.0, -3.0, 3.0, -3.0, 3.0], -3.0);
    let v = interpret(&vol, &grid(14), &out, &c, &t, &run, EnvelopePolicy::Enforce);
    let r = &v.result;
    assert_eq!(r.status, Status::Indeterminate, "{r:?}");
    assert_eq!(r.not_covered, names(&["C4", "C5", "C6", "C7"]));
    assert_eq!(
        r.vertebrae.keys().collect::<Vec<_>>(),
        ["C1", "C2", "C3"],
        "only the vertebrae in view are analysed"
    );
    let reason = r.reason.as_deref().unwrap();
    assert_eq!(
        reason,
        "partial coverage: C4, C5, C6, C7 not in view; C1-C3 analysed, nothing flagged \
         there; read the levels not in view without triage"
    );
    assert!(r.patient.is_some() && r.key_slice.is_none() && v.key_model_slice.is_none());
    let sops: Vec<String> = (0..40).map(|k| format!("1.2.3.{k}")).collect();
    assert_eq!(r.id, result_id("1.2.3", "ab", Status::Indeterminate, &sops));
    // A flag in view (a dens fracture on a head CT): positive, not_covered still listed.
    let out = outputs(14, [-3.0, 3.0, -3.0, -3.0, -3.0, -3.0, -3.0], -3.0);
    let v = interpret(&vol, &grid(14), &out, &c, &t, &run, EnvelopePolicy::Enforce);
    assert_eq!(v.result.status, Status::Positive);
    assert!(v.result.vertebrae["C2"].flagged);
    assert_eq!(v.result.not_covered, names(&["C4", "C5", "C6", "C7"]));
    assert_eq!(v.key_vertebra, Some(1));
    // The patient flag alone is positive too.
    let out = outputs(14, [-3.0; 7], 3.0);
    let v = interpret(&vol, &grid(14), &out, &c, &t, &run, EnvelopePolicy::Enforce);
    assert_eq!(v.result.status, Status::Positive);
    // The lower neck only (a chest CT: C4-C7 whole, nothing found above): the same rule.
    let mut out = outputs_from(0, 30, [-3.0; 7], -3.0);
    (0..12).for_each(|k| erase(&mut out, k));
    let in_view = InView::of(&vertebra_extent(&out, &c.coverage), 30);
    assert_eq!(in_view.span, Some((3, 6)));
    let r = interpret(&vol, &grid(30), &out, &c, &t, &run, EnvelopePolicy::Enforce).result;
    assert_eq!(r.status, Status::Indeterminate);
    assert_eq!(r.not_covered, names(&["C1", "C2", "C3"]));
}

#[test]
fn too_few_levels_in_view_is_indeterminate_unless_the_envelope_is_ignored() {
    let c = contract_needing(2);
    let t = Thresholds::resolve(&c, None, &BTreeMap::new());
    let vol = linear_volume(40, 8, 8, false);
    let run = RunInfo::new(&c, "cpu");
    // 8 slices: C1 whole (1..=4), C2 cut (5..=7).
    let out = outputs(8, [5.0; 7], 5.0);
    let v = interpret(&vol, &grid(8), &out, &c, &t, &run, EnvelopePolicy::Enforce);
    assert_eq!(v.result.status, Status::Indeterminate);
    let reason = v.result.reason.as_deref().unwrap();
    assert!(
        reason.starts_with(envelope::REASON_OUTSIDE_ENVELOPE)
            && reason.contains("only C1 in view (1 level(s)), at least 2 contiguous"),
        "{reason}"
    );
    assert!(v.result.patient.is_none() && v.result.vertebrae.is_empty());
    assert_eq!(v.result.not_covered.as_ref().map(Vec::len), Some(6));
    assert_eq!(
        v.coverage_violation,
        Some(Violation::CoveredVertebrae {
            covered: vec!["C1".to_string()],
            min: 2
        })
    );
    // Ignored (`infer --ignore-envelope`): analysed, the violation still reported.
    let v = interpret(&vol, &grid(8), &out, &c, &t, &run, EnvelopePolicy::Ignore);
    assert_eq!(v.result.status, Status::Positive);
    assert_eq!(v.result.vertebrae.keys().collect::<Vec<_>>(), ["C1"]);
    assert!(v.coverage_violation.is_some());
    // Two levels: enough.
    let out = outputs(12, [-3.0; 7], -3.0);
    let v = interpret(&vol, &grid(12), &out, &c, &t, &run, EnvelopePolicy::Enforce);
    assert_eq!(v.result.not_covered, names(&["C3", "C4", "C5", "C6", "C7"]));
    assert!(v.coverage_violation.is_none());
    assert!(v
        .result
        .reason
        .unwrap()
        .starts_with(REASON_PARTIAL_COVERAGE));
}

#[test]
fn too_few_vertebrae_is_indeterminate_never_positive() {
    let c = contract();
    let t = Thresholds::resolve(&c, None, &BTreeMap::new());
    let vol = linear_volume(40, 8, 8, false);
    let run = RunInfo::new(&c, "cpu");
    // No vertebra found at all.
    let mut out = outputs(30, [5.0; 7], 5.0);
    (0..30).for_each(|k| erase(&mut out, k));
    let v = interpret(&vol, &grid(30), &out, &c, &t, &run, EnvelopePolicy::Enforce);
    assert_eq!(v.result.status, Status::Indeterminate);
    assert!(v
        .result
        .reason
        .as_ref()
        .unwrap()
        .contains(REASON_NOT_CERVICAL));
    assert!(v.result.vertebrae.is_empty() && v.result.patient.is_none());
    // C2..C4 missed between C1 and C5 (all seven in view): 4 of 7 found, 5 needed.
    let mut out = outputs(30, [5.0; 7], 5.0);
    (5..=16).for_each(|k| erase(&mut out, k));
    let v = interpret(&vol, &grid(30), &out, &c, &t, &run, EnvelopePolicy::Enforce);
    assert_eq!(v.result.status, Status::Indeterminate);
    let reason = v.result.reason.unwrap();
    assert!(
        reason.contains(REASON_NOT_CERVICAL) && reason.contains("4 of 7"),
        "{reason}"
    );
    assert_eq!(v.result.not_covered, Some(Vec::new()));
}
