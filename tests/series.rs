//! Series stage: volume building from real DICOM files (written by pydicom and DCMTK, or
//! shipped with pydicom-data) and series selection.
//!
//! Needs python3 with pydicom, numpy, pydicom-data (and pylibjpeg-* for the reference HU
//! of compressed files) and DCMTK (`dcmcjpls`, `dcmcjpeg`). A missing tool fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cspine_triage::dicom::StoredInstance;
use cspine_triage::series::{
    load_series_from_paths, load_series_report, run_assembler, volume, AssemblyConfig, BuildError,
    CtVolume, FailReason, InPlaneWindow, InstanceHeader, Rejection, SeriesOutcome, SkipReason,
    StudyCandidates, VolumeError, VolumeLimits, VolumeWindow,
};
use serde_json::Value;
use tokio::sync::mpsc;

fn python_fixture(script: &str, dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let output = Command::new("python3")
        .arg(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run python3 {}: {e} (install python3)",
                script.display()
            )
        });
    assert!(
        output.status.success(),
        "{} failed (needs pydicom, numpy, pydicom-data, pylibjpeg, DCMTK):\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Synthetic series written once per test binary by tests/python/series_make.py.
fn fixtures() -> &'static (tempfile::TempDir, Value) {
    static FIXTURES: OnceLock<(tempfile::TempDir, Value)> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        python_fixture("series_make.py", dir.path());
        let manifest = std::fs::read_to_string(dir.path().join("manifest.json")).unwrap();
        (dir, serde_json::from_str(&manifest).unwrap())
    })
}

fn case(name: &str) -> PathBuf {
    fixtures().0.path().join(name)
}

fn read_hu(path: &Path) -> Vec<i16> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Every study's volume, as `infer` builds them one at a time.
fn built(studies: Vec<StudyCandidates>, window: Option<&VolumeWindow>) -> Vec<SeriesOutcome> {
    studies.into_iter().map(|s| s.build(window)).collect()
}

fn single_volume(outcomes: Vec<SeriesOutcome>) -> Box<CtVolume> {
    assert_eq!(outcomes.len(), 1, "expected one outcome: {outcomes:?}");
    match outcomes.into_iter().next().unwrap() {
        SeriesOutcome::Volume(v) => v,
        SeriesOutcome::Failed { reason, .. } => panic!("series failed: {reason}"),
    }
}

fn single_failure(outcomes: Vec<SeriesOutcome>) -> FailReason {
    assert_eq!(outcomes.len(), 1, "expected one outcome");
    match outcomes.into_iter().next().unwrap() {
        SeriesOutcome::Volume(_) => panic!("series should have failed"),
        SeriesOutcome::Failed { reason, .. } => reason,
    }
}

#[test]
fn shuffled_series_with_reversed_numbers_builds_the_identical_volume() {
    let ordered = single_volume(load_series_from_paths(&[case("ordered")]).unwrap());
    let shuffled = single_volume(load_series_from_paths(&[case("shuffled")]).unwrap());
    let manifest = &fixtures().1["ordered"];
    let dims: Vec<usize> = serde_json::from_value(manifest["dims"].clone()).unwrap();
    assert_eq!(ordered.dims.to_vec(), dims);
    assert_eq!(
        ordered.voxels,
        read_hu(&case("ordered.hu")),
        "HU differ from pydicom's"
    );
    assert_eq!(shuffled.dims, ordered.dims);
    assert_eq!(shuffled.voxels, ordered.voxels);
    assert_eq!(shuffled.geometry, ordered.geometry);
    let sops: Vec<String> = serde_json::from_value(manifest["sops"].clone()).unwrap();
    let order: Vec<&str> = shuffled
        .slices
        .iter()
        .map(|s| s.sop_instance_uid.as_str())
        .collect();
    assert_eq!(order, sops.iter().map(String::as_str).collect::<Vec<_>>());

    let g = &ordered.geometry;
    assert_eq!(g.origin, [-20.0, -30.0, 10.0]);
    assert!((g.spacing[0] - 1.25).abs() < 1e-9 && g.spacing[1] == 0.7 && g.spacing[2] == 0.8);
    assert_eq!(g.normal, [0.0, 0.0, 1.0]);
    assert_eq!(
        ordered.meta.series_instance_uid,
        manifest["series"].as_str().unwrap()
    );
    assert_eq!(ordered.meta.accession_number, "ACC-1");
    // Padding (-2000 stored) became air, not -3024 HU.
    assert_eq!(ordered.voxels[0], volume::PADDING_HU);
}

#[test]
fn a_windowed_volume_keeps_exactly_its_window_of_every_slice() {
    let whole = single_volume(load_series_from_paths(&[case("shuffled")]).unwrap());
    let [n, rows, cols] = whole.dims;
    // A block, a gap, single columns: what a model grid finer than the pixels leaves.
    let window = InPlaneWindow::new(
        rows,
        cols,
        (1..rows - 2).filter(|r| r % 4 != 2),
        [0, 3, 4, 7, cols - 1],
    );
    let chosen = window.clone();
    let choose = VolumeWindow(std::sync::Arc::new(move |plan: &volume::VolumePlan| {
        assert_eq!(plan.dims, [n, rows, cols]);
        chosen.clone()
    }));
    let report = load_series_report(&[case("shuffled")], &[]).unwrap();
    let part = single_volume(built(report.studies, Some(&choose)));
    assert_eq!(part.dims, whole.dims, "dims stay those of the full matrix");
    assert_eq!(part.window, window);
    assert_eq!(part.geometry, whole.geometry);
    assert_eq!(part.voxels.len(), n * window.len());
    for k in 0..n {
        for &r in window.rows() {
            for &c in window.cols() {
                assert_eq!(
                    part.voxel(k, r, c),
                    whole.voxel(k, r, c),
                    "slice {k} ({r}, {c})"
                );
            }
        }
    }
}

#[test]
fn missing_slice_fails_with_a_gap_reason() {
    let reason = single_failure(load_series_from_paths(&[case("gap")]).unwrap());
    let after = fixtures().1["gap"]["missing_after"].as_str().unwrap();
    match &reason {
        FailReason::Build {
            error: BuildError::Volume(VolumeError::Gap { before, .. }),
            fallbacks,
        } => {
            assert_eq!(before, after, "the reason names the slice before the gap");
            assert!(fallbacks.is_empty(), "{reason}");
        }
        other => panic!("not a gap: {other}"),
    }
    assert!(reason.to_string().contains("gap"), "{reason}");
}

#[test]
fn a_thin_series_with_one_slice_missing_builds_and_reports_the_interpolated_gap() {
    let m = &fixtures().1["thin_gap"];
    let uid = |key: &str| m[key].as_str().unwrap().to_string();
    let report = load_series_report(&[case("thin_gap")], &[]).unwrap();
    let v = single_volume(built(report.studies, None));
    assert_eq!(v.meta.series_instance_uid, uid("series"));
    assert_eq!(v.dims, [m["slices"].as_u64().unwrap() as usize, 512, 512]);
    assert_eq!(v.geometry.spacing[0], 0.5);
    let gaps = v.meta.interpolated_gaps.expect("the gap is recorded");
    assert_eq!(gaps.count, 1);
    assert!((gaps.largest_mm - 1.0).abs() < 1e-9, "{gaps:?}");
    // The slices either side of the gap are neighbours in the volume, 1 mm apart; the
    // missing one is not among the instances the result will name.
    let at = |sop: &str| v.slices.iter().position(|s| s.sop_instance_uid == sop);
    let before = at(&uid("before")).unwrap();
    assert_eq!(at(&uid("after")), Some(before + 1));
    assert!((v.slices[before + 1].z_mm - v.slices[before].z_mm - 1.0).abs() < 1e-9);
    assert!(at(&uid("missing")).is_none());
    assert!(!v.meta.sop_instance_uids.contains(&uid("missing")));
    // The slice after the gap (k = 18) holds its own pixels: (r + c + 7k) mod 4000 - 1024.
    let (r, c) = (100, 300);
    assert_eq!(
        v.voxel(before + 1, r, c),
        ((r + c + 7 * 18) % 4000) as i16 - 1024
    );

    // With gaps interpolated only up to 0.75 mm, the same series fails on that gap.
    let strict = VolumeLimits {
        max_gap_mm: 0.75,
        ..VolumeLimits::default()
    };
    let report = load_series_report(&[case("thin_gap")], &[]).unwrap();
    let outcomes: Vec<SeriesOutcome> = report
        .studies
        .into_iter()
        .map(|s| s.build_within(None, &strict))
        .collect();
    match single_failure(outcomes) {
        FailReason::Build {
            error: BuildError::Volume(VolumeError::Gap { before, .. }),
            ..
        } => assert_eq!(before, uid("before")),
        other => panic!("not a gap: {other}"),
    }
}

#[test]
fn mixed_orientation_fails() {
    let reason = single_failure(load_series_from_paths(&[case("mixed_orientation")]).unwrap());
    assert!(
        matches!(
            reason,
            FailReason::Build {
                error: BuildError::Headers(_),
                ..
            }
        ),
        "{reason:?}"
    );
    assert!(
        reason.to_string().contains("inconsistent orientation"),
        "{reason}"
    );
}

#[test]
fn rescale_bits_stored_and_padding_are_honoured() {
    let v = single_volume(load_series_from_paths(&[case("rescale")]).unwrap());
    assert_eq!(v.voxels, read_hu(&case("rescale.hu")));
    assert_eq!(v.voxels[0], volume::PADDING_HU);
    // Unsigned 12-bit stored value 3*r + 5*c + 40*k at (k=1, r=5, c=7), slope 2, intercept -1000.
    let [_, rows, cols] = v.dims;
    assert_eq!(v.voxels[(rows + 5) * cols + 7], 2 * (15 + 35 + 40) - 1000);
}

#[test]
fn localizer_reformat_and_sr_of_the_study_are_skipped_with_reasons() {
    let report = load_series_report(&[case("study_with_localizer")], &[]).unwrap();
    let m = &fixtures().1["study_with_localizer"];
    let v = single_volume(built(report.studies, None));
    assert_eq!(v.meta.series_instance_uid, m["axial"].as_str().unwrap());
    assert_eq!(v.voxels, read_hu(&case("study_with_localizer.hu")));
    let reason_of = |series: &str| {
        let uid = m[series].as_str().unwrap();
        report
            .skipped
            .iter()
            .find(|s| s.key.series == uid)
            .unwrap_or_else(|| {
                panic!(
                    "no skip recorded for the {series} series: {:?}",
                    report.skipped
                )
            })
            .reason
            .clone()
    };
    assert_eq!(
        reason_of("localizer"),
        SkipReason::NotASlice(Rejection::Localizer)
    );
    assert!(matches!(
        reason_of("sagittal"),
        SkipReason::NotASlice(Rejection::NotOriginal { image_type }) if image_type == "DERIVED"
    ));
    assert!(matches!(
        reason_of("sr"),
        SkipReason::NotASlice(Rejection::StructuredReport { .. })
    ));
}

#[test]
fn bone_kernel_series_is_chosen_over_soft_tissue() {
    let report = load_series_report(&[case("two_candidates")], &[]).unwrap();
    let m = &fixtures().1["two_candidates"];
    let v = single_volume(built(report.studies, None));
    assert_eq!(v.meta.series_instance_uid, m["bone"].as_str().unwrap());
    let skip = report
        .skipped
        .iter()
        .find(|s| s.key.series == m["soft"].as_str().unwrap())
        .expect("soft-tissue series recorded as skipped");
    assert!(
        matches!(&skip.reason, SkipReason::NotTheBest { best, .. }
            if best.series_instance_uid == m["bone"].as_str().unwrap()),
        "{}",
        skip.reason
    );
}

#[test]
fn a_study_falls_back_to_the_next_series_when_the_best_cannot_be_built() {
    let outcomes = load_series_from_paths(&[case("fallback")]).unwrap();
    let v = single_volume(outcomes);
    assert_eq!(
        v.meta.series_instance_uid,
        fixtures().1["fallback"]["soft"].as_str().unwrap()
    );
}

#[test]
fn real_files_in_every_transfer_syntax_decode_to_pydicoms_hu() {
    let dir = tempfile::tempdir().unwrap();
    python_fixture("series_reference.py", dir.path());
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("manifest.json")).unwrap())
            .unwrap();
    let entries = manifest.as_array().unwrap();
    assert!(
        entries.len() >= 15,
        "reference set is incomplete: {manifest}"
    );
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for entry in entries {
        let name = entry["name"].as_str().unwrap();
        let ts = entry["transfer_syntax"].as_str().unwrap();
        let decoded = volume::decode_slice(&dir.path().join(format!("{name}.dcm")));
        // 12-bit JPEG (Extended, process 2 & 4) is a known gap of dicom-pixeldata 0.10
        // (jpeg-decoder): it must be a clear error, never wrong pixels.
        if ts == "1.2.840.10008.1.2.4.51" && entry["bits_stored"].as_u64() == Some(12) {
            let err = format!(
                "{:#}",
                decoded.expect_err("12-bit JPEG Extended now decodes: compare it")
            );
            assert!(
                err.contains("SamplePrecision(12)"),
                "{name}: unclear error {err}"
            );
            report.push(format!("{name} ({ts}): refused as expected: {err}"));
            continue;
        }
        let (rows, cols, hu) = match decoded {
            Ok(d) => d,
            Err(e) => {
                failures.push(format!("{name} ({ts}): {e:#}"));
                continue;
            }
        };
        assert_eq!(
            (rows as u64, cols as u64),
            (
                entry["rows"].as_u64().unwrap(),
                entry["columns"].as_u64().unwrap()
            )
        );
        let expected = read_hu(&dir.path().join(format!("{name}.hu")));
        let max_diff = hu
            .iter()
            .zip(&expected)
            .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
            .max()
            .unwrap();
        report.push(format!(
            "{name} ({ts}): max |HU diff| vs pydicom {max_diff}"
        ));
        if max_diff > entry["tolerance"].as_i64().unwrap() as i32 {
            failures.push(format!(
                "{name} ({ts}): HU differ from pydicom by up to {max_diff}"
            ));
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The instances of fixture folders as the SCP would announce them.
fn stored_instances(cases: &[&str]) -> Vec<StoredInstance> {
    let mut out = Vec::new();
    for c in cases {
        let mut files: Vec<PathBuf> = std::fs::read_dir(case(c))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for path in files {
            let h = InstanceHeader::read(&path).unwrap();
            out.push(StoredInstance {
                path,
                study_instance_uid: h.study_instance_uid,
                series_instance_uid: h.series_instance_uid,
                sop_instance_uid: h.sop_instance_uid,
                sop_class_uid: h.sop_class_uid,
                calling_ae: "STORESCU".into(),
                received_at: time::OffsetDateTime::now_utc(),
                arrival: Default::default(),
            });
        }
    }
    out
}

#[tokio::test]
async fn assembler_task_emits_the_chosen_series_of_each_study() {
    let config = AssemblyConfig {
        quiet_period_secs: 0.3,
        study_quiet_period_secs: None, // = quiet period
        ..Default::default()
    };
    let (in_tx, in_rx) = mpsc::channel(4);
    let (out_tx, mut out_rx) = mpsc::channel(1);
    let health = cspine_triage::service::health::Health::new(Default::default());
    let task = tokio::spawn(run_assembler(
        config,
        health.register("series"),
        in_rx,
        out_tx,
        Default::default(),
    ));
    // Shuffled order: the assembler must not care.
    let mut instances = stored_instances(&["study_with_localizer", "two_candidates", "gap"]);
    instances.reverse();
    for s in instances {
        in_tx.send(s).await.unwrap();
    }
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(30), out_rx.recv())
            .await
            .expect("no outcome within 30 s")
            .expect("assembler stopped");
        outcomes.push(outcome);
    }
    drop(in_tx);
    task.await.unwrap().unwrap();
    let m = &fixtures().1;
    let mut volumes = Vec::new();
    let mut failures = Vec::new();
    for o in outcomes {
        match o {
            SeriesOutcome::Volume(v) => {
                assert_eq!(v.meta.calling_ae, "STORESCU");
                assert!(v.meta.first_received.is_some() && v.meta.completed.is_some());
                volumes.push(v.meta.series_instance_uid.clone());
            }
            SeriesOutcome::Failed { meta, reason } => {
                failures.push((meta.series_instance_uid, reason))
            }
        }
    }
    volumes.sort();
    let mut expected = vec![
        m["study_with_localizer"]["axial"]
            .as_str()
            .unwrap()
            .to_string(),
        m["two_candidates"]["bone"].as_str().unwrap().to_string(),
    ];
    expected.sort();
    assert_eq!(volumes, expected);
    assert_eq!(failures.len(), 1);
    assert!(
        matches!(
            failures[0].1,
            FailReason::Build {
                error: BuildError::Volume(VolumeError::Gap { .. }),
                ..
            }
        ),
        "{:?}",
        failures[0].1
    );
}

#[test]
fn series_config_is_validated_by_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[series]\nquiet_period_secs = 2.0\nbone_kernels = [\"FC30\"]\n\
         anatomy_coverage_trigger = true\nmin_coverage_mm = 140.0\n\n\
         [[series.expected_count]]\ncalling_ae = \"CT_NECK\"\nimages = 320\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cspine-triage"))
        .args(["check-config"])
        .arg(&good)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("calling_ae = \"CT_NECK\"")
            && stdout.contains("images = 320")
            && stdout.contains("anatomy_coverage_trigger = true")
            && stdout.contains("min_coverage_mm = 140.0")
            && stdout.contains("coverage_check_secs = 2.0"),
        "{stdout}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[series]\nanatomy_coverage_trigger = true\nmin_coverage_mm = 0.0\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cspine-triage"))
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("series.min_coverage_mm must be > 0"));
}
