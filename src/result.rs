//! The result contract `cspine-triage/result/v1` (see `docs/alert.schema.json`) and the
//! [`ResultMessage`] that carries it from inference to alert.
//! Inference fills a [`TriageResult`]; the outbox and MQTT publish it unchanged.
//! It sits below both stages, so that neither imports the other for it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use crate::series::source::{SourceInstance, SourceStudy};
use crate::series::FailedSeries;

pub const SCHEMA_V1: &str = "cspine-triage/result/v1";

/// Upper bound of the key image's PNG size: inference redraws a larger one at the model
/// resolution, and an MQTT client sizes its packet limit after it.
pub const KEY_IMAGE_MAX_BYTES: usize = 100 * 1024;

/// Message from inference: one finished (or failed) series.
#[derive(Debug, Clone)]
pub struct ResultMessage {
    /// `patient_ref`, `site`, `device` and `timings.published` are overwritten here.
    pub result: TriageResult,
    /// DICOM Patient ID (0010,0020) as received; turned into `patient_ref`.
    pub patient_id: String,
    /// Key image (PNG), published on `keyimage/<id>`.
    pub key_image_png: Option<Vec<u8>>,
    /// The SOP Instance UIDs the result analysed (what its id names), passed on in
    /// `alert::Committed` for the spool's analysed mark; not published.
    pub sop_instance_uids: Vec<String>,
    /// Better series of the study that could not be built, when the result is a
    /// fallback's ([`crate::series::SeriesMeta::failed_better`]): marked with it.
    pub failed_better: Vec<FailedSeries>,
    /// The analysed source series (patient and study modules, its instances), for the
    /// DICOM result objects sent to PACS; not published.
    pub source: SourceStudy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Positive,
    Negative,
    Indeterminate,
    Failed,
}

impl From<Status> for crate::events::AnalysisStatus {
    fn from(status: Status) -> Self {
        use crate::events::AnalysisStatus as A;
        match status {
            Status::Positive => A::Positive,
            Status::Negative => A::Negative,
            Status::Indeterminate => A::Indeterminate,
            Status::Failed => A::Failed,
        }
    }
}

impl Status {
    /// Every status, e.g. to find which id an analysis of some instances was given.
    pub const ALL: [Status; 4] = [
        Status::Positive,
        Status::Negative,
        Status::Indeterminate,
        Status::Failed,
    ];

    /// The name in the JSON document.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Positive => "positive",
            Status::Negative => "negative",
            Status::Indeterminate => "indeterminate",
            Status::Failed => "failed",
        }
    }
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

/// Missing slices the analysis interpolated across (`interpolated_gaps`): steps between
/// neighbouring slices more than 1.5 times the series' median spacing, none longer than
/// the configured maximum (by default the model's own 2 mm slice step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InterpolatedGaps {
    /// How many such steps.
    pub count: usize,
    /// The longest, mm along the slice normal.
    pub largest_mm: f64,
}

/// One triage result per analysed (or failed) series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriageResult {
    /// Always [`SCHEMA_V1`].
    pub schema: String,
    /// Id of this analysis: see [`result_id`].
    pub id: String,
    pub status: Status,
    /// Why, when status is indeterminate or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    /// Number of instances (distinct SOP Instance UIDs) of the series that were analysed
    /// (or, for a failed series, that analysis was attempted on).
    pub instances: usize,
    /// Gaps in the series' slice positions that were interpolated across; absent when
    /// there were none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpolated_gaps: Option<InterpolatedGaps>,
    pub accession_number: String,
    /// Pseudonymised patient reference (keyed hash) unless raw IDs are configured.
    pub patient_ref: String,
    /// Keyed C1..C7; empty when the model did not run. A vertebra listed in
    /// `not_covered` has no entry.
    pub vertebrae: BTreeMap<String, VertebraResult>,
    /// Vertebrae (C1..C7, in order) the series does not cover, as the model's segmentation
    /// tells (`docs/model-contract.md`, partial coverage): not analysed, to be read without
    /// triage. Empty when all seven are covered; None (absent) when the model did not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_covered: Option<Vec<String>>,
    pub patient: Option<PatientResult>,
    pub key_slice: Option<KeySlice>,
    pub model: ModelInfo,
    /// "cpu" or "cuda".
    pub runtime: String,
    pub device: String,
    pub site: String,
    pub timings: Timings,
    /// The DICOM objects built for this result and queued for PACS (`[report]`); empty
    /// when none are. Absent in results of earlier producers of v1.
    #[serde(default)]
    pub dicom_objects: Vec<DicomObjectRef>,
}

/// Which DICOM result object (the JSON names of `dicom_objects[].kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DicomObjectKind {
    StructuredReport,
    KeyObjectSelection,
    SecondaryCapture,
}

/// One DICOM object built for a result, as the result names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DicomObjectRef {
    pub kind: DicomObjectKind,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub series_instance_uid: String,
}

/// Result id: hex sha256 of
/// `"<series_instance_uid>\n<model sha256>\n<status>\n<sop_1>\n<sop_2>\n...<sop_n>"`,
/// where `status` is the JSON name of the status (`positive`, `negative`,
/// `indeterminate`, `failed`) and `sop_1..sop_n` are the distinct SOP Instance UIDs of
/// the instances analysed, sorted (byte order) and joined by `\n` (nothing after the last
/// one; nothing at all for none).
///
/// It names the analysis: the same instances of a series analysed by the same model
/// always get the same id (re-deliveries, re-runs and restarts deduplicate), while a
/// series analysed again with more (or other) instances, or by another model, gets a new
/// one (a revised result), and so does a re-analysis that reaches another status (e.g. a
/// success after a transient failure), which must not be de-duplicated away either.
pub fn result_id<S: AsRef<str>>(
    series_instance_uid: &str,
    model_sha256: &str,
    status: Status,
    sop_instance_uids: &[S],
) -> String {
    use sha2::{Digest, Sha256};
    let mut sops: Vec<&str> = sop_instance_uids.iter().map(AsRef::as_ref).collect();
    sops.sort_unstable();
    sops.dedup();
    let mut h = Sha256::new();
    for part in [series_instance_uid, model_sha256, status.as_str()] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    h.update(sops.join("\n").as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::*;

    #[test]
    fn id_names_the_analysis_not_the_order_of_its_instances() {
        let a = result_id("1.2.3", "ab", Positive, &["1.2.3.2", "1.2.3.1"]);
        // Order and repeats of the instances do not matter: a re-run gives the same id.
        assert_eq!(
            a,
            result_id("1.2.3", "ab", Positive, &["1.2.3.1", "1.2.3.2", "1.2.3.1"])
        );
        // The documented formula.
        use sha2::{Digest, Sha256};
        let expected = hex::encode(Sha256::digest(b"1.2.3\nab\npositive\n1.2.3.1\n1.2.3.2"));
        assert_eq!(a, expected);
        // A revised analysis (one more instance, one less), another series, model or
        // status: a new id.
        let sops = ["1.2.3.1", "1.2.3.2"];
        for other in [
            result_id("1.2.3", "ab", Positive, &["1.2.3.1", "1.2.3.2", "1.2.3.3"]),
            result_id("1.2.3", "ab", Positive, &["1.2.3.1"]),
            result_id("1.2.4", "ab", Positive, &sops),
            result_id("1.2.3", "cd", Positive, &sops),
            result_id("1.2.3", "ab", Negative, &sops),
            result_id("1.2.3", "ab", Failed, &sops),
        ] {
            assert_ne!(a, other);
        }
        // No instances at all is still a well-defined id.
        let none: [&str; 0] = [];
        assert_eq!(
            result_id("1.2.3", "ab", Failed, &none),
            hex::encode(Sha256::digest(b"1.2.3\nab\nfailed\n"))
        );
    }

    #[test]
    fn status_names_are_the_json_ones() {
        for s in [Positive, Negative, Indeterminate, Failed] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
