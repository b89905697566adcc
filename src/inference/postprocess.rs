//! From model outputs to a [`TriageResult`]: probabilities, flags, localization and the
//! coverage check that turns a series without a cervical spine into `indeterminate`.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use super::contract::{Coverage, ModelContract, VERTEBRAE};
use super::engine::ModelOutputs;
use super::preprocess::{nearest_source_slice, source_slice_z, ModelGrid};
use crate::result::{
    result_id, InterpolatedGaps, KeySlice, ModelInfo, PatientResult, Status, Timings, TriageResult,
    VertebraResult, SCHEMA_V1,
};
use crate::series::EarlyCheck;
use crate::series::{CtVolume, SeriesMeta};

pub const REASON_NOT_CERVICAL: &str = "series does not cover the cervical spine";
pub const REASON_TOO_SHORT: &str = "series too short along z";
pub const REASON_POSE: &str = "neck tilted beyond the poses the model was validated for";

/// Decision thresholds in effect: the contract's, possibly overridden by configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub patient: f32,
    /// C1..C7.
    pub vertebrae: [f32; 7],
}

impl Thresholds {
    pub fn resolve(
        contract: &ModelContract,
        patient: Option<f32>,
        vertebrae: &BTreeMap<String, f32>,
    ) -> Thresholds {
        let mut t = Thresholds {
            patient: patient.unwrap_or(contract.thresholds.patient),
            vertebrae: [0.5; 7],
        };
        for (i, v) in VERTEBRAE.iter().enumerate() {
            t.vertebrae[i] = vertebrae
                .get(*v)
                .or_else(|| contract.thresholds.vertebrae.get(*v))
                .copied()
                .unwrap_or(0.5);
        }
        t
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Argmax class of every segmentation cell of model slice `k` (`seg_h * seg_w` values).
pub fn seg_argmax(out: &ModelOutputs, k: usize) -> Vec<u8> {
    let cells = out.seg_h * out.seg_w;
    let base = k * out.seg_classes * cells;
    (0..cells)
        .map(|cell| {
            let mut best = 0;
            for c in 1..out.seg_classes {
                if out.seg_logits[base + c * cells + cell]
                    > out.seg_logits[base + best * cells + cell]
                {
                    best = c;
                }
            }
            best as u8
        })
        .collect()
}

/// Slices with no cell of a vertebra that may still lie inside its run (a 2 mm slice through
/// a disc or a crack can lose the label for a slice or two).
const MAX_GAP_SLICES: usize = 2;

/// First and last model slice of each vertebra: the run of slices where it is present (at
/// least `min_pixels` cells of the slice have it as argmax class), gaps of up to
/// [`MAX_GAP_SLICES`] bridged, with the most cells. A vertebra is one compact object along
/// z: stray cells of its class far away (in the skull, in the thorax) must not stretch its
/// range, as a first-to-last span would.
pub fn vertebra_extent(out: &ModelOutputs, coverage: &Coverage) -> [Option<(usize, usize)>; 7] {
    // Per vertebra: the best run so far and the current one, as (first, last, cells).
    let mut best: [Option<(usize, usize, usize)>; 7] = [None; 7];
    let mut current: [Option<(usize, usize, usize)>; 7] = [None; 7];
    for k in 0..out.slices {
        let mut counts = [0usize; 8];
        for class in seg_argmax(out, k) {
            counts[class as usize] += 1;
        }
        for v in 0..7 {
            let n = counts[v + 1];
            if n < coverage.min_pixels.max(1) {
                continue;
            }
            current[v] = match current[v] {
                Some((first, last, cells)) if k - last <= MAX_GAP_SLICES + 1 => {
                    Some((first, k, cells + n))
                }
                _ => Some((k, k, n)),
            };
            if best[v].is_none_or(|b| current[v].unwrap().2 > b.2) {
                best[v] = current[v];
            }
        }
    }
    best.map(|b| b.map(|(first, last, _)| (first, last)))
}

/// Sideways tilt of the neck: the angle (degrees) of its axis from the scanner's z axis in the
/// coronal plane, from the segmentation alone. Each vertebra's column centroid over its main
/// run (`extent`) is fitted against its slice centroid by least squares, one point per
/// vertebra. A head tilted towards a shoulder tilts this axis; lordosis (a sagittal bend), a
/// turn or a nod do not. `None` with fewer than `coverage.min_vertebrae` vertebrae found.
/// `models/training/robustness.py` (`lateral_tilt_deg`) is the reference and measures it.
pub fn lateral_tilt_deg(
    out: &ModelOutputs,
    extent: &[Option<(usize, usize)>; 7],
    contract: &ModelContract,
) -> Option<f64> {
    let cell_mm = contract.outputs.segmentation.stride as f64 * contract.input.spacing_mm.column;
    let slice_mm = contract.input.spacing_mm.slice;
    let mut points = Vec::with_capacity(7);
    for (v, run) in extent.iter().enumerate() {
        let Some((first, last)) = *run else { continue };
        let (mut cells, mut col_sum, mut k_sum) = (0usize, 0usize, 0usize);
        for k in first..=last {
            for (cell, &class) in seg_argmax(out, k).iter().enumerate() {
                if class as usize == v + 1 {
                    cells += 1;
                    col_sum += cell % out.seg_w;
                    k_sum += k;
                }
            }
        }
        points.push((
            k_sum as f64 / cells as f64 * slice_mm,
            col_sum as f64 / cells as f64 * cell_mm,
        ));
    }
    if points.len() < contract.coverage.min_vertebrae.max(2) {
        return None;
    }
    let n = points.len() as f64;
    let (z_mean, x_mean) = points
        .iter()
        .fold((0.0, 0.0), |(z, x), p| (z + p.0 / n, x + p.1 / n));
    let (cov, var) = points.iter().fold((0.0, 0.0), |(c, v), (z, x)| {
        (c + (z - z_mean) * (x - x_mean), v + (z - z_mean).powi(2))
    });
    (var > 0.0).then(|| (cov / var).atan().to_degrees())
}

/// The coverage check of an early analysis (the anatomy-coverage trigger,
/// [`crate::series::AssemblyConfig::anatomy_coverage_trigger`]): the segmentation found
/// C1 and C7, and the slab goes on beyond each by at least one vertebra height (the mean
/// z extent of the vertebrae found) unless the slab ends there with an end of the series
/// (`check`). `Err` says why the early result must not be published.
pub fn early_coverage(
    out: &ModelOutputs,
    grid: &ModelGrid,
    coverage: &Coverage,
    check: &EarlyCheck,
) -> Result<(), String> {
    let extent = vertebra_extent(out, coverage);
    let z = &grid.z_mm;
    let (Some(c1), Some(c7)) = (extent[0], extent[6]) else {
        let found: Vec<&str> = VERTEBRAE
            .iter()
            .zip(&extent)
            .filter(|(_, e)| e.is_some())
            .map(|(v, _)| *v)
            .collect();
        return Err(format!(
            "the slab does not show both C1 and C7 (found: {})",
            if found.is_empty() {
                "none".to_string()
            } else {
                found.join(", ")
            }
        ));
    };
    let dz = if z.len() > 1 {
        (z[z.len() - 1] - z[0]) / (z.len() - 1) as f64
    } else {
        0.0
    };
    let heights: Vec<f64> = extent
        .iter()
        .flatten()
        .map(|&(a, b)| z[b] - z[a] + dz)
        .collect();
    let height = heights.iter().sum::<f64>() / heights.len() as f64;
    let (lowest, highest) = (z[0], z[z.len() - 1]);
    let centre = |(a, b): (usize, usize)| (z[a] + z[b]) / 2.0;
    // C1 is superior (higher patient z) in any sane segmentation; do not rely on it.
    let c1_superior = centre(c1) >= centre(c7);
    let (c1_margin, c1_end_final, c1_side) = if c1_superior {
        (highest - z[c1.1], check.superior_end_final, "superior")
    } else {
        (z[c1.0] - lowest, check.inferior_end_final, "inferior")
    };
    let (c7_margin, c7_end_final, c7_side) = if c1_superior {
        (z[c7.0] - lowest, check.inferior_end_final, "inferior")
    } else {
        (highest - z[c7.1], check.superior_end_final, "superior")
    };
    for (name, margin, end_final, side) in [
        ("C1", c1_margin, c1_end_final, c1_side),
        ("C7", c7_margin, c7_end_final, c7_side),
    ] {
        if margin < height && !end_final {
            return Err(format!(
                "{name} ends {margin:.1} mm from the slab's {side} end, less than a vertebra \
                 ({height:.1} mm), and more slices may come there"
            ));
        }
    }
    Ok(())
}

/// Who ran the model, for the result.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub model: ModelInfo,
    pub runtime: String,
    pub inference_start: Option<OffsetDateTime>,
    pub inference_end: Option<OffsetDateTime>,
}

impl RunInfo {
    pub fn new(contract: &ModelContract, runtime: &str) -> RunInfo {
        RunInfo {
            model: ModelInfo {
                name: contract.name.clone(),
                version: contract.version.clone(),
                sha256: contract.sha256.clone(),
            },
            runtime: runtime.to_string(),
            inference_start: None,
            inference_end: None,
        }
    }
}

/// A result with no model verdict: the fields every status shares. `patient_ref`,
/// `site` and `device` stay empty and `timings.published` None: the alert stage fills them.
fn base_result(
    meta: &SeriesMeta,
    run: &RunInfo,
    status: Status,
    reason: Option<String>,
) -> TriageResult {
    TriageResult {
        schema: SCHEMA_V1.to_string(),
        id: result_id(
            &meta.series_instance_uid,
            &run.model.sha256,
            status,
            &meta.sop_instance_uids,
        ),
        status,
        reason,
        study_instance_uid: meta.study_instance_uid.clone(),
        series_instance_uid: meta.series_instance_uid.clone(),
        instances: meta.sop_instance_uids.len(),
        interpolated_gaps: meta.interpolated_gaps.map(|g| InterpolatedGaps {
            count: g.count,
            largest_mm: g.largest_mm,
        }),
        accession_number: meta.accession_number.clone(),
        patient_ref: String::new(),
        vertebrae: BTreeMap::new(),
        patient: None,
        key_slice: None,
        model: run.model.clone(),
        runtime: run.runtime.clone(),
        device: String::new(),
        site: String::new(),
        timings: Timings {
            first_instance_received: meta.first_received,
            last_instance_received: meta.last_received,
            series_complete: meta.completed,
            inference_start: run.inference_start,
            inference_end: run.inference_end,
            published: None,
        },
        dicom_objects: Vec::new(),
    }
}

/// A series that could not be analysed at all (unreadable, inconsistent, model error).
pub fn failed_result(meta: &SeriesMeta, run: &RunInfo, reason: &str) -> TriageResult {
    base_result(meta, run, Status::Failed, Some(reason.to_string()))
}

/// A series analysed but not answerable (too short, no cervical spine): never an alert.
pub fn indeterminate_result(meta: &SeriesMeta, run: &RunInfo, reason: &str) -> TriageResult {
    base_result(meta, run, Status::Indeterminate, Some(reason.to_string()))
}

/// An `indeterminate` verdict: nothing to localise, no key slice.
fn indeterminate_verdict(meta: &SeriesMeta, run: &RunInfo, reason: &str) -> Verdict {
    Verdict {
        result: indeterminate_result(meta, run, reason),
        key_model_slice: None,
        key_vertebra: None,
    }
}

/// The verdict, plus the model slice the key image should show.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub result: TriageResult,
    /// Model slice of the key slice; None when indeterminate.
    pub key_model_slice: Option<usize>,
    /// Vertebra (0 = C1) whose attention chose the key slice.
    pub key_vertebra: Option<usize>,
}

/// The model slice where vertebra `v` (0 = C1) has its highest attention (the first one
/// on ties).
pub fn peak_attention_slice(out: &ModelOutputs, v: usize) -> usize {
    let row = &out.attention[v * out.slices..(v + 1) * out.slices];
    (0..out.slices)
        .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
        .unwrap_or(0)
}

/// Model slice `k` as the result reports it: the source slice nearest in z, its SOP
/// Instance UID and patient z.
fn key_slice(volume: &CtVolume, grid: &ModelGrid, k: usize) -> KeySlice {
    let source = nearest_source_slice(volume, grid.z_mm[k]);
    KeySlice {
        sop_instance_uid: volume.slices[source].sop_instance_uid.clone(),
        z_mm: source_slice_z(volume, source),
    }
}

/// Turns model outputs into the result, as `docs/model-contract.md` specifies.
pub fn interpret(
    volume: &CtVolume,
    grid: &ModelGrid,
    out: &ModelOutputs,
    contract: &ModelContract,
    thresholds: &Thresholds,
    run: &RunInfo,
) -> Verdict {
    let meta = &volume.meta;
    let extent = vertebra_extent(out, &contract.coverage);
    let present = extent.iter().filter(|e| e.is_some()).count();
    if present < contract.coverage.min_vertebrae {
        let reason = format!(
            "{REASON_NOT_CERVICAL}: {present} of 7 cervical vertebrae found, at least {} needed",
            contract.coverage.min_vertebrae
        );
        return indeterminate_verdict(meta, run, &reason);
    }
    if let Some(max) = contract.coverage.max_lateral_tilt_deg {
        if let Some(tilt) = lateral_tilt_deg(out, &extent, contract).filter(|t| t.abs() > max) {
            let reason = format!(
                "{REASON_POSE}: the vertebrae found lie {:.0} degrees off the scanner axis \
                 towards a shoulder, the model is validated up to {max:.0}; read this study \
                 without triage",
                tilt.abs()
            );
            return indeterminate_verdict(meta, run, &reason);
        }
    }
    let probs: Vec<f32> = out.vertebra_logits.iter().map(|&l| sigmoid(l)).collect();
    let flagged_v: Vec<bool> = (0..7)
        .map(|v| probs[v] >= thresholds.vertebrae[v])
        .collect();
    let mut result = base_result(meta, run, Status::Negative, None);
    for (v, name) in VERTEBRAE.iter().enumerate() {
        result.vertebrae.insert(
            name.to_string(),
            VertebraResult {
                probability: probs[v],
                flagged: flagged_v[v],
                z_range_mm: extent[v].map(|(a, b)| [grid.z_mm[a], grid.z_mm[b]]),
                // Only where a dashboard should look: flagged and found in the series.
                key_slice: (flagged_v[v] && extent[v].is_some())
                    .then(|| key_slice(volume, grid, peak_attention_slice(out, v))),
            },
        );
    }
    let p = sigmoid(out.patient_logit);
    let flagged = p >= thresholds.patient;
    result.patient = Some(PatientResult {
        probability: p,
        threshold: thresholds.patient,
        flagged,
    });
    let any_flagged = flagged_v.iter().any(|&f| f);
    // A triage tool errs on the side of sensitivity: any flag, patient-level or on a
    // vertebra, makes the result positive (an alert), never a `negative` with a flagged
    // vertebra in it.
    if flagged || any_flagged {
        result.status = Status::Positive;
        result.id = result_id(
            &meta.series_instance_uid,
            &run.model.sha256,
            result.status,
            &meta.sop_instance_uids,
        );
    }
    // Key slice: peak attention of the most probable flagged vertebra (of all if none is).
    let key_vertebra = (0..7)
        .filter(|&v| !any_flagged || flagged_v[v])
        .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
        .expect("seven vertebrae");
    let key = peak_attention_slice(out, key_vertebra);
    result.key_slice = Some(key_slice(volume, grid, key));
    Verdict {
        result,
        key_model_slice: Some(key),
        key_vertebra: Some(key_vertebra),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::preprocess::tests::linear_volume;

    fn contract() -> ModelContract {
        serde_json::from_str(&crate::inference::contract::tests::example_json("ab")).unwrap()
    }

    /// Outputs where vertebra v occupies model slices [4v, 4v + 3] with 10 cells each.
    fn outputs(slices: usize, vertebra_logits: [f32; 7], patient_logit: f32) -> ModelOutputs {
        let (h, w, classes) = (32, 32, 8);
        let mut seg = vec![0f32; slices * classes * h * w];
        for k in 0..slices {
            let v = k / 4;
            for cell in 0..h * w {
                let class = if v < 7 && cell < 10 { v + 1 } else { 0 };
                seg[(k * classes + class) * h * w + cell] = 5.0;
            }
        }
        let mut attention = vec![1.0 / slices as f32; 7 * slices];
        for v in 0..7 {
            let peak = (4 * v + 2).min(slices - 1);
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

    #[test]
    fn vertebra_extent_is_its_main_run_not_first_to_last_cell() {
        let c = contract();
        let mut out = outputs(60, [0.0; 7], 0.0);
        // C1 is at slices 0..=3 (10 cells each); a stray C1 blob far below at slice 50,
        // and C3 (slices 8..=11) loses its label on slice 10 (a 2 mm slice through a crack).
        paint(&mut out, 50, 1, 5);
        paint(&mut out, 10, 0, 10);
        for cell in 0..10 {
            let plane = out.seg_h * out.seg_w;
            out.seg_logits[(10 * out.seg_classes + 3) * plane + cell] = 0.0;
        }
        let extent = vertebra_extent(&out, &c.coverage);
        assert_eq!(extent[0], Some((0, 3)), "stray cells do not stretch C1");
        assert_eq!(extent[2], Some((8, 11)), "a one-slice gap is bridged");
    }

    #[test]
    fn positive_flags_the_vertebra_and_points_at_its_peak() {
        let c = contract();
        let t = Thresholds::resolve(&c, None, &BTreeMap::new());
        let vol = linear_volume(40, 8, 8, false);
        let out = outputs(30, [-3.0, -3.0, -3.0, -3.0, 2.0, -3.0, -3.0], 3.0);
        let run = RunInfo::new(&c, "cpu");
        let v = interpret(&vol, &grid(30), &out, &c, &t, &run);
        let r = &v.result;
        assert_eq!(r.status, Status::Positive);
        assert!(r.vertebrae["C5"].flagged);
        assert!(!r.vertebrae["C4"].flagged);
        assert_eq!(
            r.vertebrae["C5"].z_range_mm,
            Some([10.0 + 32.0, 10.0 + 38.0])
        );
        assert_eq!(v.key_model_slice, Some(18));
        assert_eq!(v.key_vertebra, Some(4));
        // Model slice 18 is at z = 46 mm; source slices are 2.5 mm apart from z = 10.
        let key = r.key_slice.as_ref().unwrap();
        assert!((key.z_mm - 46.0).abs() <= 1.25, "{key:?}");
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
        let v = interpret(&vol, &grid(30), &out, &c, &t, &RunInfo::new(&c, "cpu"));
        let r = &v.result;
        // Attention peaks (see `outputs`): C2 at model slice 6 (z = 22 mm), C5 at 18 (46 mm),
        // each reported as the nearest source slice (2.5 mm apart from z = 10 mm).
        let c2 = r.vertebrae["C2"].key_slice.as_ref().expect("C2 is flagged");
        let c5 = r.vertebrae["C5"].key_slice.as_ref().expect("C5 is flagged");
        assert_eq!((c2.z_mm, c2.sop_instance_uid.as_str()), (22.5, "1.2.3.5"));
        assert_eq!((c5.z_mm, c5.sop_instance_uid.as_str()), (45.0, "1.2.3.14"));
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
        // 24 model slices: C1..C6 present (at least 5 needed), C7 not found.
        let out = outputs(24, [-3.0, -3.0, 1.0, -3.0, -3.0, -3.0, 2.0], 3.0);
        let v = interpret(&vol, &grid(24), &out, &c, &t, &RunInfo::new(&c, "cpu"));
        let r = &v.result;
        assert_eq!(r.status, Status::Positive);
        let c7 = &r.vertebrae["C7"];
        assert!(c7.flagged && c7.z_range_mm.is_none() && c7.key_slice.is_none());
        assert!(r.vertebrae["C3"].key_slice.is_some());
    }

    #[test]
    fn negative_result_has_an_overall_key_slice_but_no_vertebra_key_slice() {
        let c = contract();
        let t = Thresholds::resolve(&c, None, &BTreeMap::new());
        let vol = linear_volume(40, 8, 8, false);
        let out = outputs(30, [-3.0, -2.0, -3.0, -3.0, -3.0, -3.0, -3.0], -3.0);
        let v = interpret(&vol, &grid(30), &out, &c, &t, &RunInfo::new(&c, "cpu"));
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
        let r = interpret(&vol, &grid(30), &out, &c, &t, &run).result;
        assert!(!r.patient.as_ref().unwrap().flagged);
        assert!(r.vertebrae["C5"].flagged);
        assert_eq!(r.status, Status::Positive, "a flagged vertebra is an alert");
        let sops: Vec<String> = (0..40).map(|k| format!("1.2.3.{k}")).collect();
        assert_eq!(r.id, result_id("1.2.3", "ab", Status::Positive, &sops));
        // The patient flag alone is positive too.
        let out = outputs(30, [-3.0; 7], 3.0);
        let r = interpret(&vol, &grid(30), &out, &c, &t, &run).result;
        assert!(r.vertebrae.values().all(|v| !v.flagged));
        assert_eq!(r.status, Status::Positive);
        // Neither: negative.
        let out = outputs(30, [-3.0; 7], -3.0);
        let r = interpret(&vol, &grid(30), &out, &c, &t, &run).result;
        assert_eq!(r.status, Status::Negative);
        assert_eq!(r.id, result_id("1.2.3", "ab", Status::Negative, &sops));
    }

    #[test]
    fn early_coverage_needs_c1_and_c7_with_a_vertebra_of_margin_or_a_final_end() {
        let c = contract();
        let open = EarlyCheck::default();
        // `outputs`: vertebra v on model slices [4v, 4v + 3], 2 mm apart: each vertebra is
        // 8 mm high; C1 on 0..=3 (lowest z), C7 on 24..=27.
        // 30 slices: C7 ends 2 slices (4 mm) below the highest end; C1 starts at the lowest.
        let out = outputs(30, [-3.0; 7], -3.0);
        let why = early_coverage(&out, &grid(30), &c.coverage, &open).unwrap_err();
        assert!(why.contains("C1 ends 0.0 mm"), "{why}");
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
        assert!(why.contains("C7 ends 4.0 mm"), "{why}");
        // Margins: shift everything up by 4 slices (8 mm) and extend the slab by 4 more
        // above C7 (12 mm = 6 slices): both margins at least one vertebra.
        let mut wide = outputs(38, [-3.0; 7], -3.0);
        let cells = wide.seg_h * wide.seg_w;
        let base = outputs(28, [-3.0; 7], -3.0);
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
        let short = outputs(20, [-3.0; 7], -3.0);
        let why = early_coverage(&short, &grid(20), &c.coverage, &both).unwrap_err();
        assert!(
            why.contains("C1 and C7") && why.contains("C1, C2, C3, C4, C5"),
            "{why}"
        );
    }

    #[test]
    fn threshold_override_changes_the_flag() {
        let c = contract();
        let overrides = BTreeMap::from([("C5".to_string(), 0.95f32)]);
        let t = Thresholds::resolve(&c, Some(0.99), &overrides);
        let vol = linear_volume(40, 8, 8, false);
        let out = outputs(30, [-3.0, -3.0, -3.0, -3.0, 2.0, -3.0, -3.0], 3.0);
        let v = interpret(&vol, &grid(30), &out, &c, &t, &RunInfo::new(&c, "cpu"));
        assert_eq!(v.result.status, Status::Negative);
        assert!(!v.result.vertebrae["C5"].flagged);
    }

    /// `outputs(30, ..)` with vertebra v moved `shift * v` cells along the columns: a neck
    /// whose axis leans `shift` cells (5 mm) per vertebra (4 slices of 2 mm).
    fn leaning_outputs(
        shift: usize,
        vertebra_logits: [f32; 7],
        patient_logit: f32,
    ) -> ModelOutputs {
        let mut out = outputs(30, vertebra_logits, patient_logit);
        let plane = out.seg_h * out.seg_w;
        for k in 0..28 {
            let v = k / 4;
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
        let v = interpret(&vol, &grid(30), &leaning, &c, &t, &RunInfo::new(&c, "cpu"));
        assert_eq!(v.result.status, Status::Positive);
        c.coverage.max_lateral_tilt_deg = Some(15.0);
        let v = interpret(&vol, &grid(30), &leaning, &c, &t, &RunInfo::new(&c, "cpu"));
        assert_eq!(v.result.status, Status::Indeterminate);
        let reason = v.result.reason.unwrap();
        assert!(
            reason.contains(REASON_POSE) && reason.contains("32 degrees"),
            "{reason}"
        );
        // A straight neck under the same limit is unaffected.
        let straight = leaning_outputs(0, [5.0; 7], 5.0);
        let v = interpret(&vol, &grid(30), &straight, &c, &t, &RunInfo::new(&c, "cpu"));
        assert_eq!(v.result.status, Status::Positive);
    }

    #[test]
    fn too_few_vertebrae_is_indeterminate_never_positive() {
        let c = contract();
        let t = Thresholds::resolve(&c, None, &BTreeMap::new());
        let vol = linear_volume(40, 8, 8, false);
        // 12 slices: only C1..C3 present.
        let out = outputs(12, [5.0; 7], 5.0);
        let v = interpret(&vol, &grid(12), &out, &c, &t, &RunInfo::new(&c, "cpu"));
        assert_eq!(v.result.status, Status::Indeterminate);
        assert!(v
            .result
            .reason
            .as_ref()
            .unwrap()
            .contains(REASON_NOT_CERVICAL));
        assert!(v.result.vertebrae.is_empty() && v.result.patient.is_none());
    }
}
