//! The result contract `cspine-triage/result/v1` (see `docs/alert.schema.json`).
//! Inference fills a [`TriageResult`]; the outbox and MQTT publish it unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub const SCHEMA_V1: &str = "cspine-triage/result/v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Positive,
    Negative,
    Indeterminate,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VertebraResult {
    pub probability: f32,
    pub flagged: bool,
    /// [from, to] along the slice normal in mm; None when the vertebra was not found.
    pub z_range_mm: Option<[f64; 2]>,
    /// Peak-attention slice of this vertebra; None unless it is flagged and localised.
    pub key_slice: Option<KeySlice>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatientResult {
    pub probability: f32,
    pub threshold: f32,
    pub flagged: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeySlice {
    pub sop_instance_uid: String,
    pub z_mm: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Timings {
    #[serde(with = "time::serde::rfc3339::option")]
    pub first_instance_received: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_instance_received: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub series_complete: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub inference_start: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub inference_end: Option<OffsetDateTime>,
    /// When the result was committed to the outbox for publishing; fixed at that moment
    /// so every re-delivery of an id is byte-identical.
    #[serde(with = "time::serde::rfc3339::option")]
    pub published: Option<OffsetDateTime>,
}

/// One triage result per analysed (or failed) series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriageResult {
    /// Always [`SCHEMA_V1`].
    pub schema: String,
    /// Stable id: derived from Series Instance UID + model sha256.
    pub id: String,
    pub status: Status,
    /// Why, when status is indeterminate or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub accession_number: String,
    /// Pseudonymised patient reference (keyed hash) unless raw IDs are configured.
    pub patient_ref: String,
    /// Keyed C1..C7; empty when the model did not run.
    pub vertebrae: BTreeMap<String, VertebraResult>,
    pub patient: Option<PatientResult>,
    pub key_slice: Option<KeySlice>,
    pub model: ModelInfo,
    /// "cpu" or "cuda".
    pub runtime: String,
    pub device: String,
    pub site: String,
    pub timings: Timings,
}

/// Stable result id: hex sha256 of `"<series_instance_uid>\n<model sha256>"`, so the
/// same series analysed by the same model always gets the same id (re-deliveries and
/// re-runs deduplicate) and a new model gives a new one.
pub fn result_id(series_instance_uid: &str, model_sha256: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(series_instance_uid.as_bytes());
    h.update(b"\n");
    h.update(model_sha256.as_bytes());
    hex::encode(h.finalize())
}
