//! DICOM result objects checked by real readers: objects built for a positive, a negative
//! and a failed result of a synthetic series are verified with dciodvfy (dicom3tools: no
//! errors), the SR is rendered by DCMTK's dsrdump, and pydicom reads every object
//! (tests/python/report_read.py). The alert stage names the objects of a selected result
//! in the result it commits.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{dcmtk, free_port, repo_root, require_tool, synth};
use cspine_triage::alert::{AlertConfig, Alerts, Outbox, StatusInfo};
use cspine_triage::report::{
    build_result_objects, ObjectSelection, ReportConfig, ResultObject, ResultObjectKind,
};
use cspine_triage::result::{
    result_id, KeySlice, ModelInfo, PatientResult, ResultMessage, SourceStudy, Status, Timings,
    TriageResult, VertebraResult, SCHEMA_V1,
};
use cspine_triage::series::{load_series_from_paths, SeriesOutcome};
use serde_json::Value;

/// The source of a small synthetic series, captured as the series stage captures it.
fn synthetic_source(dir: &Path) -> SourceStudy {
    let study = synth(
        dir,
        9301,
        "C2",
        &["--matrix", "128", "--slice-thickness", "3"],
    );
    let outcomes = load_series_from_paths(&study).unwrap();
    match outcomes.into_iter().next().expect("one study") {
        SeriesOutcome::Volume(v) => v.meta.source,
        SeriesOutcome::Failed { reason, .. } => panic!("synthetic series failed: {reason}"),
    }
}

/// A 256 x 256 RGB key image, as inference draws it.
fn key_png() -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, 256, 256);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().unwrap();
    let data: Vec<u8> = (0..256 * 256 * 3).map(|i| (i / 3 % 256) as u8).collect();
    w.write_image_data(&data).unwrap();
    w.finish().unwrap();
    out
}

fn message(source: &SourceStudy, status: Status) -> ResultMessage {
    let sops: Vec<&str> = source
        .instances
        .iter()
        .map(|i| i.sop_instance_uid.as_str())
        .collect();
    let key = KeySlice {
        sop_instance_uid: sops[sops.len() / 2].to_owned(),
        z_mm: -80.0,
    };
    let ran = matches!(status, Status::Positive | Status::Negative);
    let positive = status == Status::Positive;
    let vertebrae: BTreeMap<String, VertebraResult> = (1..=7)
        .filter(|_| ran)
        .map(|i| {
            let flagged = positive && i == 2;
            let v = VertebraResult {
                probability: if flagged { 0.87 } else { 0.03 },
                flagged,
                z_range_mm: Some([-100.0 + 15.0 * i as f64, -86.0 + 15.0 * i as f64]),
                key_slice: flagged.then(|| key.clone()),
            };
            (format!("C{i}"), v)
        })
        .collect();
    let model = ModelInfo {
        name: "cspine-phantom".into(),
        version: "1.0.0".into(),
        sha256: "ab".repeat(32),
    };
    let result = TriageResult {
        schema: SCHEMA_V1.into(),
        id: result_id(&source.series_instance_uid, &model.sha256, status, &sops),
        status,
        reason: (!ran).then(|| "series has 3 slices, at least 64 are needed".to_owned()),
        study_instance_uid: source.study_instance_uid.clone(),
        series_instance_uid: source.series_instance_uid.clone(),
        instances: sops.len(),
        interpolated_gaps: None,
        accession_number: source.accession_number.clone(),
        patient_ref: String::new(),
        vertebrae,
        patient: ran.then_some(PatientResult {
            probability: if positive { 0.91 } else { 0.04 },
            threshold: 0.5,
            flagged: positive,
        }),
        key_slice: ran.then(|| key.clone()),
        model,
        runtime: "cpu".into(),
        device: String::new(),
        site: String::new(),
        timings: Timings::default(),
        dicom_objects: Vec::new(),
        not_covered: Some(Vec::new()),
    };
    ResultMessage {
        result,
        patient_id: source.patient_id.clone(),
        key_image_png: ran.then(key_png),
        sop_instance_uids: sops.iter().map(|s| s.to_string()).collect(),
        failed_better: Vec::new(),
        source: source.clone(),
    }
}

fn write(dir: &Path, name: &str, objects: &[ResultObject]) -> Vec<PathBuf> {
    objects
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let path = dir.join(format!("{name}-{i}.dcm"));
            std::fs::write(&path, &o.part10).unwrap();
            path
        })
        .collect()
}

/// dciodvfy's findings in a file: its lines that begin with "Error" (they may wrap onto
/// continuation lines) and with "Warning".
fn dciodvfy(path: &Path) -> (Vec<String>, Vec<String>) {
    let out = Command::new(require_tool("dciodvfy"))
        .arg(path)
        .output()
        .expect("run dciodvfy");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let pick = |prefix: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    };
    (pick("Error"), pick("Warning"))
}

fn pydicom(paths: &[PathBuf]) -> Vec<Value> {
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/report_read.py"))
        .args(paths)
        .output()
        .expect("python3 with pydicom is needed");
    assert!(
        out.status.success(),
        "pydicom could not read the objects: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The (concept, value) pairs of an SR content tree as pydicom read it.
fn content_has(doc: &Value, concept: &str, value: &Value) -> bool {
    doc["content"]
        .as_array()
        .unwrap()
        .iter()
        .any(|item| item[3] == concept && &item[4] == value)
}

#[test]
fn result_objects_pass_dciodvfy_dsrdump_and_pydicom() {
    let tmp = tempfile::tempdir().unwrap();
    let source = synthetic_source(&tmp.path().join("synth"));
    assert!(!source.patient_id.is_empty() && !source.study_instance_uid.is_empty());
    assert!(source.instances.len() > 10, "{}", source.instances.len());
    let all = ReportConfig {
        objects: ObjectSelection::All,
        institution_name: Some("St Mary".into()),
        ..ReportConfig::default()
    };

    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    for status in [Status::Positive, Status::Negative, Status::Failed] {
        let msg = message(&source, status);
        let objects = build_result_objects(&msg, &all).unwrap();
        let kinds: Vec<ResultObjectKind> = objects.iter().map(|o| o.kind).collect();
        use ResultObjectKind::*;
        let expected: &[ResultObjectKind] = match status {
            Status::Failed => &[StructuredReport],
            _ => &[StructuredReport, KeyObjectSelection, SecondaryCapture],
        };
        assert_eq!(kinds, expected, "{status:?}");
        // Deterministic: the same result gives the same UIDs.
        let again = build_result_objects(&msg, &all).unwrap();
        for (a, b) in objects.iter().zip(&again) {
            assert_eq!(
                (&a.sop_instance_uid, &a.series_instance_uid),
                (&b.sop_instance_uid, &b.series_instance_uid)
            );
        }

        let paths = write(tmp.path(), status.as_str(), &objects);
        for path in &paths {
            let (errs, warns) = dciodvfy(path);
            errors.extend(errs.into_iter().map(|e| format!("{}: {e}", path.display())));
            warnings.extend(warns.into_iter().map(|w| format!("{status:?}: {w}")));
        }
        let sr = dsrdump_status(&paths[0]);
        assert!(sr, "dsrdump could not render {}", paths[0].display());

        let docs = pydicom(&paths);
        for (doc, object) in docs.iter().zip(&objects) {
            assert_eq!(doc["transfer_syntax"], "1.2.840.10008.1.2.1");
            assert_eq!(doc["sop_instance_uid"], object.sop_instance_uid.as_str());
            assert_eq!(
                doc["media_sop_instance_uid"],
                object.sop_instance_uid.as_str()
            );
            assert_eq!(
                doc["series_instance_uid"],
                object.series_instance_uid.as_str()
            );
            assert_eq!(
                doc["study_instance_uid"],
                source.study_instance_uid.as_str()
            );
            assert_ne!(
                doc["series_instance_uid"],
                source.series_instance_uid.as_str()
            );
            assert_eq!(doc["patient_id"], source.patient_id.as_str());
            assert_eq!(doc["patient_name"], source.patient_name.as_str());
            assert_eq!(doc["accession_number"], source.accession_number.as_str());
            assert_eq!(doc["study_date"], source.study_date.as_str());
        }
        let sr = &docs[0];
        assert_eq!(sr["modality"], "SR");
        assert_eq!(sr["title"], "Imaging Measurement Report");
        assert!(content_has(
            sr,
            "Comment",
            &"Triage aid, not for diagnosis; model trained on synthetic data.".into()
        ));
        assert!(content_has(sr, "Algorithm Name", &"cspine-phantom".into()));
        assert!(content_has(sr, "Algorithm Version", &"1.0.0".into()));
        assert!(content_has(
            sr,
            "Algorithm Parameters",
            &format!("sha256={}", "ab".repeat(32)).into()
        ));
        assert_eq!(
            sr["evidence"].as_array().unwrap().len(),
            source.instances.len()
        );
        let key = msg
            .result
            .key_slice
            .as_ref()
            .map(|k| k.sop_instance_uid.as_str());
        match status {
            Status::Positive => {
                assert!(content_has(sr, "Probability", &0.87.into()));
                assert!(content_has(sr, "Finding Site", &"C2 vertebra".into()));
                assert!(content_has(sr, "Flagged by triage model", &"Yes".into()));
                assert!(content_has(
                    sr,
                    "Source of Measurement",
                    &key.unwrap().into()
                ));
            }
            Status::Negative => {
                assert!(!content_has(sr, "Flagged by triage model", &"Yes".into()));
                assert!(content_has(sr, "Flagged by triage model", &"No".into()));
            }
            _ => {
                assert!(content_has(
                    sr,
                    "Reason",
                    &"series has 3 slices, at least 64 are needed".into()
                ));
                assert!(!content_has(sr, "Flagged by triage model", &"No".into()));
            }
        }
        if let Some(key) = key {
            let kos = &docs[1];
            assert_eq!(kos["modality"], "KO");
            assert_eq!(kos["title"], "Of Interest");
            assert_eq!(kos["evidence"], serde_json::json!([key]));
            assert!(kos["content"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i[2] == "IMAGE" && i[4] == key));
            let sc = &docs[2];
            assert_eq!(sc["burned_in_annotation"], "YES");
            let shape = sc["pixels"].as_array().unwrap();
            assert_eq!(shape[1], 256);
            assert_eq!(shape[2], 3);
            assert!(shape[0].as_u64().unwrap() > 256, "band above the image");
        }
    }
    // The warnings, for the record (allowed).
    warnings.sort();
    warnings.dedup();
    for w in &warnings {
        eprintln!("dciodvfy {w}");
    }
    assert!(errors.is_empty(), "dciodvfy: {errors:#?}");

    // Selection: positives only by default; nothing built for a source without instances.
    let default = ReportConfig::default();
    assert!(default.selects(Status::Positive) && !default.selects(Status::Negative));
    let mut empty = message(&source, Status::Positive);
    empty.source.instances.clear();
    assert!(build_result_objects(&empty, &default).is_err());
    let mut stranger = message(&source, Status::Positive);
    stranger.result.key_slice.as_mut().unwrap().sop_instance_uid = "1.2.3.999".into();
    assert!(build_result_objects(&stranger, &default).is_err());
}

/// Whether DCMTK's dsrdump renders the SR (exit status 0).
fn dsrdump_status(path: &Path) -> bool {
    let out = Command::new(dcmtk("dsrdump"))
        .arg(path)
        .output()
        .expect("run dsrdump");
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    out.status.success() && !out.stdout.is_empty()
}

/// With a PACS destination configured, the alert stage builds the objects of a selected
/// result before the commit, names them in the committed result and queues them for the
/// destination before it reports the commit; an unselected one names none. No broker and
/// no PACS listen: the results stay in the outbox and the objects in the queue.
#[test]
fn committed_results_name_their_dicom_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let source = synthetic_source(&tmp.path().join("synth"));
    let positive = message(&source, Status::Positive);
    let negative = message(&source, Status::Negative);
    let expected = build_result_objects(&positive, &ReportConfig::default()).unwrap();

    let config = AlertConfig {
        mqtt_url: Some(format!("mqtt://127.0.0.1:{}", free_port())),
        outbox_dir: tmp.path().join("outbox"),
        shutdown_drain_secs: 0.0,
        ..AlertConfig::default()
    };
    let pacs: cspine_triage::pacs::PacsConfig = toml::from_str(&format!(
        "queue_dir = \"{}\"\n[[destinations]]\nname = \"pacs\"\nae_title = \"PACS\"\n\
         host = \"127.0.0.1\"\nport = {}\n",
        tmp.path().join("pacs").display(),
        free_port()
    ))
    .unwrap();
    let delivery = cspine_triage::pacs::Delivery::open(&pacs, "CSPINE").unwrap();
    let alerts = Alerts::open(&config)
        .unwrap()
        .with_report(ReportConfig::default())
        .with_pacs(Some(delivery.clone()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (ctx, mut crx) = tokio::sync::mpsc::channel(4);
        let heartbeat =
            cspine_triage::service::health::Health::new(Default::default()).register("alert");
        let run = tokio::spawn(alerts.run(heartbeat, StatusInfo::new(None), rx, Some(ctx)));
        for msg in [positive.clone(), negative.clone()] {
            tx.send(msg).await.unwrap();
            crx.recv().await.expect("committed");
        }
        drop(tx);
        run.await.unwrap().unwrap();
    });

    let outbox = Outbox::open(&config.outbox_dir, config.outbox_limits()).unwrap();
    let published: BTreeMap<String, Value> = outbox
        .pending()
        .iter()
        .map(|e| {
            let entry = outbox.load(e.seq).unwrap();
            (
                e.id.clone(),
                serde_json::from_slice(&entry.result_json).unwrap(),
            )
        })
        .collect();
    let named: Vec<(String, String, String)> = published[&positive.result.id]["dicom_objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let s = |k: &str| o[k].as_str().unwrap().to_owned();
            (s("kind"), s("sop_instance_uid"), s("series_instance_uid"))
        })
        .collect();
    let built: Vec<(String, String, String)> = expected
        .iter()
        .map(|o| {
            let kind = serde_json::to_value(o.kind).unwrap();
            (
                kind.as_str().unwrap().to_owned(),
                o.sop_instance_uid.clone(),
                o.series_instance_uid.clone(),
            )
        })
        .collect();
    assert_eq!(named, built);
    assert_eq!(
        published[&negative.result.id]["dicom_objects"],
        serde_json::json!([])
    );
    // Queued (fsynced) before the commit was reported: every object, nothing else.
    assert_eq!(delivery.depth()[0].entries, expected.len());
}
