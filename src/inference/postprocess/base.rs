//! Who ran the model ([`RunInfo`]) and the result every status starts from: a `failed` or
//! `indeterminate` result has nothing more.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use crate::inference::contract::ModelContract;
use crate::result::{
    result_id, InterpolatedGaps, ModelInfo, Status, Timings, TriageResult, SCHEMA_V1,
};
use crate::series::SeriesMeta;

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
pub(super) fn base_result(
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
        not_covered: None,
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
