//! `cspine-triage synth`: the real binary, checked by an independent reader
//! (pydicom + numpy in `tests/python/synth_check.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cspine-triage")
}

fn synth(out: &Path, args: &[&str]) {
    let output = Command::new(bin())
        .arg("synth")
        .arg(out)
        .args(args)
        .output()
        .expect("cannot run cspine-triage");
    assert!(
        output.status.success(),
        "cspine-triage synth {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every file under `dir`, relative path -> bytes.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn python_check(out: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/synth_check.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(out)
        .output()
        .expect("python3 is required for the synth tests (with pydicom and numpy installed)");
    assert!(
        output.status.success(),
        "synth_check.py failed (needs python3 with pydicom and numpy):\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn train_csv(out: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(out.join("train.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7")
    );
    lines
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[test]
fn same_seed_gives_identical_files_and_other_seed_differs() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    let args = ["--count", "2", "--seed", "11", "--matrix", "96"];
    synth(a.path(), &args);
    // A different thread count must not change a byte.
    synth(b.path(), &[&args[..], &["--threads", "1"]].concat());
    synth(
        c.path(),
        &["--count", "2", "--seed", "12", "--matrix", "96"],
    );
    let (ta, tb, tc) = (tree(a.path()), tree(b.path()), tree(c.path()));
    assert!(ta.len() > 20, "too few files: {}", ta.len());
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (k, v) in &ta {
        assert!(
            tb[k] == *v,
            "{} differs between runs with the same seed",
            k.display()
        );
    }
    assert!(
        ta.keys().all(|k| !tc.contains_key(k)),
        "seed 12 reused seed 11's UIDs"
    );
}

#[test]
fn pydicom_reads_random_studies_with_consistent_geometry_hu_and_masks() {
    let out = tempfile::tempdir().unwrap();
    // Fully randomised apart from the matrix (kept small for test time).
    synth(
        out.path(),
        &["--count", "4", "--seed", "3", "--matrix", "128"],
    );
    let report = python_check(out.path());
    assert_eq!(report.lines().count(), 4, "{report}");
}

#[test]
fn every_transfer_syntax_reads_back_identically() {
    let mut volumes = Vec::new();
    for ts in ["explicit", "implicit", "deflated"] {
        let out = tempfile::tempdir().unwrap();
        synth(
            out.path(),
            &["--seed", "5", "--matrix", "96", "--transfer-syntax", ts],
        );
        let report = python_check(out.path());
        assert!(report.contains(match ts {
            "explicit" => "\"1.2.840.10008.1.2.1\"",
            "implicit" => "\"1.2.840.10008.1.2\"",
            _ => "\"1.2.840.10008.1.2.1.99\"",
        }));
        let mut t = tree(out.path());
        t.retain(|k, _| k.starts_with("segmentations"));
        volumes.push(t);
    }
    // The transfer syntax changes only the encoding, never the anatomy.
    assert_eq!(volumes[0], volumes[1]);
    assert_eq!(volumes[0], volumes[2]);
}

#[test]
fn fracture_c5_flags_c5_only() {
    let out = tempfile::tempdir().unwrap();
    synth(
        out.path(),
        &[
            "--count",
            "3",
            "--seed",
            "21",
            "--matrix",
            "128",
            "--fracture",
            "C5",
        ],
    );
    let rows = train_csv(out.path());
    assert_eq!(rows.len(), 3);
    for r in &rows {
        assert_eq!(&r[1..], ["1", "0", "0", "0", "0", "1", "0", "0"], "{r:?}");
    }
    python_check(out.path());
}

#[test]
fn fracture_none_gives_all_zeros() {
    let out = tempfile::tempdir().unwrap();
    synth(
        out.path(),
        &[
            "--count",
            "3",
            "--seed",
            "21",
            "--matrix",
            "96",
            "--fracture",
            "none",
        ],
    );
    let rows = train_csv(out.path());
    assert_eq!(rows.len(), 3);
    for r in &rows {
        assert_eq!(&r[1..], ["0"; 8], "{r:?}");
    }
}

#[test]
fn bad_fracture_argument_is_a_clear_error() {
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(bin())
        .args(["synth", out.path().to_str().unwrap(), "--fracture", "C9"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("C1..C7, none or random"), "{err}");
}
