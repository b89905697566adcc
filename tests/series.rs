//! Series stage: volume building from real DICOM files (written by pydicom and DCMTK, or
//! shipped with pydicom-data) and series selection.
//!
//! Needs python3 with pydicom, numpy, pydicom-data (and pylibjpeg-* for the reference HU
//! of compressed files) and DCMTK (`dcmcjpls`, `dcmcjpeg`). A missing tool fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cspine_triage::series::{
    load_series_from_paths, load_series_report, volume, CtVolume, SeriesOutcome,
};
use serde_json::Value;

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

fn single_volume(outcomes: Vec<SeriesOutcome>) -> Box<CtVolume> {
    assert_eq!(outcomes.len(), 1, "expected one outcome: {outcomes:?}");
    match outcomes.into_iter().next().unwrap() {
        SeriesOutcome::Volume(v) => v,
        SeriesOutcome::Failed { reason, .. } => panic!("series failed: {reason}"),
    }
}

fn single_failure(outcomes: Vec<SeriesOutcome>) -> String {
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
fn missing_slice_fails_with_a_gap_reason() {
    let reason = single_failure(load_series_from_paths(&[case("gap")]).unwrap());
    assert!(reason.contains("gap"), "{reason}");
    let after = fixtures().1["gap"]["missing_after"].as_str().unwrap();
    assert!(
        reason.contains(after),
        "reason should name the slice before the gap: {reason}"
    );
}

#[test]
fn mixed_orientation_fails() {
    let reason = single_failure(load_series_from_paths(&[case("mixed_orientation")]).unwrap());
    assert!(reason.contains("inconsistent orientation"), "{reason}");
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
    let v = single_volume(report.outcomes);
    assert_eq!(v.meta.series_instance_uid, m["axial"].as_str().unwrap());
    assert_eq!(v.voxels, read_hu(&case("study_with_localizer.hu")));
    let reason_of = |series: &str| {
        let uid = m[series].as_str().unwrap();
        report
            .skipped
            .iter()
            .find(|s| s.series_instance_uid == uid)
            .unwrap_or_else(|| {
                panic!(
                    "no skip recorded for the {series} series: {:?}",
                    report.skipped
                )
            })
            .reason
            .clone()
    };
    assert!(reason_of("localizer").contains("localizer"));
    assert!(reason_of("sagittal").contains("DERIVED"));
    assert!(reason_of("sr").contains("structured report"));
}

#[test]
fn bone_kernel_series_is_chosen_over_soft_tissue() {
    let report = load_series_report(&[case("two_candidates")], &[]).unwrap();
    let m = &fixtures().1["two_candidates"];
    let v = single_volume(report.outcomes);
    assert_eq!(v.meta.series_instance_uid, m["bone"].as_str().unwrap());
    let skip = report
        .skipped
        .iter()
        .find(|s| s.series_instance_uid == m["soft"].as_str().unwrap())
        .expect("soft-tissue series recorded as skipped");
    assert!(skip.reason.contains("preferred"), "{}", skip.reason);
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
