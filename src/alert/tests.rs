//! Tests of the published schema (python3 jsonschema against `docs/alert.schema.json`)
//! and of the `[alert]` section's defaults, checks and password handling.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use time::OffsetDateTime;

use super::*;
use crate::result::*;

fn at(s: &str) -> Option<OffsetDateTime> {
    Some(OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap())
}

fn full_result() -> TriageResult {
    let vertebrae = (1..=7)
        .map(|i| {
            let v = VertebraResult {
                probability: if i == 2 { 0.87 } else { 0.02 },
                flagged: i == 2,
                z_range_mm: (i != 7)
                    .then_some([-120.0 + 18.0 * i as f64, -103.5 + 18.0 * i as f64]),
                key_slice: (i == 2).then(|| KeySlice {
                    sop_instance_uid: "1.2.826.0.1.3680043.8.498.10.2.77".into(),
                    z_mm: -84.5,
                }),
            };
            (format!("C{i}"), v)
        })
        .collect::<BTreeMap<_, _>>();
    TriageResult {
        schema: SCHEMA_V1.into(),
        id: "4f1c2a9e0b7d3c5a".into(),
        status: Status::Positive,
        reason: None,
        study_instance_uid: "1.2.826.0.1.3680043.8.498.10".into(),
        series_instance_uid: "1.2.826.0.1.3680043.8.498.10.2".into(),
        instances: 212,
        interpolated_gaps: Some(InterpolatedGaps {
            count: 1,
            largest_mm: 1.0,
        }),
        accession_number: "A123".into(),
        patient_ref: PatientRefs::with_key(b"0123456789abcdef0123".to_vec()).reference("P1"),
        vertebrae,
        not_covered: Some(Vec::new()),
        patient: Some(PatientResult {
            probability: 0.91,
            threshold: 0.5,
            flagged: true,
        }),
        key_slice: Some(KeySlice {
            sop_instance_uid: "1.2.826.0.1.3680043.8.498.10.2.77".into(),
            z_mm: -84.5,
        }),
        model: ModelInfo {
            name: "cspine".into(),
            version: "1.0.0".into(),
            sha256: "0f".repeat(32),
        },
        runtime: "cuda".into(),
        device: "ct1".into(),
        site: "st-mary".into(),
        timings: Timings {
            first_instance_received: at("2026-11-27T13:00:00Z"),
            last_instance_received: at("2026-11-27T13:00:04.5Z"),
            series_complete: at("2026-11-27T13:00:06Z"),
            inference_start: at("2026-11-27T13:00:06.01Z"),
            inference_end: at("2026-11-27T13:00:15.2Z"),
            published: at("2026-11-27T13:00:15.203Z"),
        },
        dicom_objects: Vec::new(),
    }
}

/// Validates each document with python3 jsonschema (draft 2020-12, formats checked);
/// returns the validator's complaints per document (empty = valid).
fn validate(docs: &[serde_json::Value]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut outcomes = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let file = dir.path().join(format!("{i}.json"));
        std::fs::write(&file, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
        let out = Command::new("python3")
            .arg(repo.join("tests/python/alert_validate.py"))
            .arg(repo.join("docs/alert.schema.json"))
            .arg(&file)
            .output()
            .expect("python3 is needed to validate against the schema");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("Traceback"),
            "validator failed (is python3-jsonschema installed?): {stderr}"
        );
        outcomes.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    outcomes
}

#[test]
fn triage_results_validate_against_the_published_schema() {
    let mut positive = full_result();
    positive.dicom_objects = vec![DicomObjectRef {
        kind: DicomObjectKind::StructuredReport,
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.33".into(),
        sop_instance_uid: "2.25.1234".into(),
        series_instance_uid: "2.25.5678".into(),
    }];
    let mut failed = full_result();
    failed.status = Status::Failed;
    failed.reason = Some("series has 3 slices, at least 64 are needed".into());
    failed.vertebrae.clear();
    failed.patient = None;
    failed.key_slice = None;
    failed.study_instance_uid = String::new();
    failed.timings.inference_start = None;
    failed.timings.inference_end = None;
    failed.dicom_objects.clear();
    failed.not_covered = None;
    // A series covering C1-C3 only: those analysed, nothing flagged, not a negative.
    let mut partial = full_result();
    partial.status = Status::Indeterminate;
    partial.reason = Some("partial coverage: C4, C5, C6, C7 not in view".into());
    partial
        .vertebrae
        .retain(|name, _| ["C1", "C2", "C3"].contains(&name.as_str()));
    partial.not_covered = Some(["C4", "C5", "C6", "C7"].map(String::from).to_vec());
    partial.key_slice = None;
    let docs: Vec<_> = [&positive, &failed, &partial]
        .iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect();
    for (doc, complaints) in docs.iter().zip(validate(&docs)) {
        assert!(complaints.is_empty(), "{complaints}\n{doc:#}");
    }

    // The schema is not vacuous: contract violations are caught.
    let mut no_reason = serde_json::to_value(&failed).unwrap();
    no_reason.as_object_mut().unwrap().remove("reason");
    let mut bad_vertebra = docs[0].clone();
    bad_vertebra["vertebrae"]["T1"] = bad_vertebra["vertebrae"]["C1"].clone();
    let mut bad_time = docs[0].clone();
    bad_time["timings"]["published"] = "yesterday".into();
    let mut extra = docs[0].clone();
    extra["surprise"] = 1.into();
    let mut bad_vertebra_key = docs[0].clone();
    bad_vertebra_key["vertebrae"]["C2"]["key_slice"] =
        serde_json::json!({ "sop_instance_uid": "1.2.3" });
    let mut no_instances = docs[0].clone();
    no_instances.as_object_mut().unwrap().remove("instances");
    let mut negative_instances = docs[0].clone();
    negative_instances["instances"] = (-1).into();
    let mut no_gap = docs[0].clone();
    no_gap["interpolated_gaps"]["count"] = 0.into();
    let mut gap_extra = docs[0].clone();
    gap_extra["interpolated_gaps"]["where"] = "C4".into();
    let mut bad_object = docs[0].clone();
    bad_object["dicom_objects"][0]["kind"] = "photo".into();
    let mut not_covered_t1 = docs[2].clone();
    not_covered_t1["not_covered"] = serde_json::json!(["C4", "T1"]);
    let mut not_covered_twice = docs[2].clone();
    not_covered_twice["not_covered"] = serde_json::json!(["C4", "C4"]);
    let mut negative_partial = docs[2].clone();
    negative_partial["status"] = "negative".into();
    negative_partial.as_object_mut().unwrap().remove("reason");
    let bad = [
        no_reason,
        bad_vertebra,
        bad_time,
        extra,
        bad_vertebra_key,
        no_instances,
        negative_instances,
        no_gap,
        gap_extra,
        bad_object,
        not_covered_t1,
        not_covered_twice,
        negative_partial,
    ];
    for (doc, complaints) in bad.iter().zip(validate(&bad)) {
        assert!(!complaints.is_empty(), "must be rejected:\n{doc:#}");
    }
}

#[test]
fn config_defaults_validate_and_password_is_not_printed() {
    let mut config = AlertConfig::default();
    config.validate().unwrap();
    assert_eq!(config.effective_topic_prefix(), "cspine/site/cspine-1/");
    config.password = Some("hunter2".into());
    config.topic_prefix = Some("hospital/ct".into());
    assert_eq!(config.effective_topic_prefix(), "hospital/ct/");
    let text = toml::to_string(&config).unwrap();
    assert!(!text.contains("hunter2"));
    // Nor by `{:?}` (a panic message, a debug log line).
    for debug in [format!("{config:?}"), format!("{config:#?}")] {
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }
    assert_eq!(config.password().unwrap().as_deref(), Some("hunter2"));
    let parsed: AlertConfig = toml::from_str("password = \"s3cret\"").unwrap();
    assert_eq!(parsed.password().unwrap().as_deref(), Some("s3cret"));
    assert!(!format!("{parsed:?}").contains("s3cret"));
    config.site = "a/b".into();
    assert!(config.validate().is_err());
    let config = AlertConfig {
        mqtt_url: Some("http://x".into()),
        ..AlertConfig::default()
    };
    assert!(format!("{:#}", config.validate().unwrap_err()).contains("mqtt://"));
}
