//! Model outputs to the [`Verdict`]: the coverage and pose checks that make a series
//! `indeterminate`, the flags, the status and the key slices.

use super::base::{base_result, indeterminate_result, RunInfo};
use super::coverage::{InView, PartialCoverage};
use super::reasons::{REASON_NOT_CERVICAL, REASON_POSE};
use super::segmentation::{lateral_tilt_deg, peak_attention_slice, vertebra_extent};
use super::thresholds::{sigmoid, Thresholds};
use crate::inference::contract::{ModelContract, VERTEBRAE};
use crate::inference::engine::ModelOutputs;
use crate::inference::envelope::{self, EnvelopePolicy, Violation};
use crate::inference::preprocess::{nearest_source_slice, source_slice_z, ModelGrid};
use crate::result::{result_id, KeySlice, PatientResult, Status, TriageResult, VertebraResult};
use crate::series::{CtVolume, SeriesMeta};

/// An `indeterminate` verdict: nothing to localise, no key slice.
fn indeterminate_verdict(meta: &SeriesMeta, run: &RunInfo, reason: &str) -> Verdict {
    Verdict {
        result: indeterminate_result(meta, run, reason),
        key_model_slice: None,
        key_vertebra: None,
        coverage_violation: None,
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
    /// Fewer levels in view than the envelope's `min_covered_vertebrae`: the result is
    /// `indeterminate` for it unless the envelope is ignored.
    pub coverage_violation: Option<Violation>,
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

/// Turns model outputs into the result, as `docs/model-contract.md` specifies. Under
/// [`EnvelopePolicy::Ignore`] a series with fewer levels in view than the envelope's
/// `min_covered_vertebrae` is analysed anyway (`coverage_violation` says so).
pub fn interpret(
    volume: &CtVolume,
    grid: &ModelGrid,
    out: &ModelOutputs,
    contract: &ModelContract,
    thresholds: &Thresholds,
    run: &RunInfo,
    policy: EnvelopePolicy,
) -> Verdict {
    let meta = &volume.meta;
    let extent = vertebra_extent(out, &contract.coverage);
    let in_view = InView::of(&extent, out.slices);
    let not_covered = in_view.not_covered();
    let indeterminate = |reason: &str, violation: Option<Violation>| {
        let mut v = indeterminate_verdict(meta, run, reason);
        v.result.not_covered = Some(not_covered.clone());
        v.coverage_violation = violation;
        v
    };
    let coverage_violation = contract
        .envelope
        .as_ref()
        .and_then(|e| e.check_covered(&in_view.covered()));
    if let Some(violation) = &coverage_violation {
        if policy == EnvelopePolicy::Enforce {
            let reason = envelope::reason(std::slice::from_ref(violation));
            return indeterminate(&reason, coverage_violation);
        }
    }
    // Vertebrae in view that the segmentation found; a covered vertebra it missed counts
    // against `min_vertebrae` (of seven, or of the levels in view when fewer).
    let found = (0..7)
        .filter(|&v| in_view.covers(v) && extent[v].is_some())
        .count();
    let needed = contract.coverage.min_vertebrae.min(in_view.levels()).max(1);
    if found < needed {
        let reason = format!(
            "{REASON_NOT_CERVICAL}: {found} of {} cervical vertebrae in view found, at least \
             {needed} needed",
            in_view.levels()
        );
        return indeterminate(&reason, coverage_violation);
    }
    if let Some(max) = contract.coverage.max_lateral_tilt_deg {
        if let Some(tilt) = lateral_tilt_deg(out, &extent, contract).filter(|t| t.abs() > max) {
            let reason = format!(
                "{REASON_POSE}: the vertebrae found lie {:.0} degrees off the scanner axis \
                 towards a shoulder, the model is validated up to {max:.0}; read this study \
                 without triage",
                tilt.abs()
            );
            return indeterminate(&reason, coverage_violation);
        }
    }
    let probs: Vec<f32> = out.vertebra_logits.iter().map(|&l| sigmoid(l)).collect();
    // A vertebra not covered is not analysed: its flag is not the model's word on it.
    let flagged_v: Vec<bool> = (0..7)
        .map(|v| in_view.covers(v) && probs[v] >= thresholds.vertebrae[v])
        .collect();
    let mut result = base_result(meta, run, Status::Negative, None);
    result.not_covered = Some(not_covered.clone());
    for (v, name) in VERTEBRAE.iter().enumerate() {
        if !in_view.covers(v) {
            continue;
        }
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
    // covered vertebra, makes the result positive (an alert), never a `negative` with a
    // flagged vertebra in it. With nothing flagged, only a series covering all seven
    // vertebrae is `negative`: one that does not is `indeterminate` (partial coverage),
    // which no reader can take for "neck clear".
    let status = if flagged || any_flagged {
        Status::Positive
    } else if !not_covered.is_empty() {
        Status::Indeterminate
    } else {
        Status::Negative
    };
    if status != Status::Negative {
        result.status = status;
        result.id = result_id(
            &meta.series_instance_uid,
            &run.model.sha256,
            result.status,
            &meta.sop_instance_uids,
        );
    }
    if status == Status::Indeterminate {
        result.reason = Some(PartialCoverage { in_view }.to_string());
        return Verdict {
            result,
            key_model_slice: None,
            key_vertebra: None,
            coverage_violation,
        };
    }
    // Key slice: peak attention of the most probable flagged vertebra (of all covered ones
    // if none is).
    let key_vertebra = (0..7)
        .filter(|&v| in_view.covers(v) && (!any_flagged || flagged_v[v]))
        .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
        .expect("at least one vertebra is covered");
    let key = peak_attention_slice(out, key_vertebra);
    result.key_slice = Some(key_slice(volume, grid, key));
    Verdict {
        result,
        key_model_slice: Some(key),
        key_vertebra: Some(key_vertebra),
        coverage_violation,
    }
}
