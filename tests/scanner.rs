//! Whole-daemon scenarios that send studies the way scanners really do, with real peers
//! (pynetdicom as the scanner: `tests/python/scanner.py`; DCMTK `storescu`; mosquitto):
//! the scout first and the axial series after the quiet period, a study again after it
//! was forgotten, two series of a study in separate associations, late and corrected
//! instances, two scanners at once, a series cut by an association abort and sent again,
//! and kill -9 in the middle of these. Each test asserts the DIMSE statuses the scanner got
//! and the results published over MQTT (or the spool's files), never log wording.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const SCANNER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/scanner.py");
const TOPIC: &str = "cspine/testsite/box1/result";
const RESULT_WAIT: Duration = Duration::from_secs(300);
/// `[series]` keys: a study is forgotten (and its spool files released) 3 s after its
/// last instance once its results are committed, so that tests can send after that.
const SHORT_RETENTION: &str = "completed_retention_secs = 3.0";

fn scanner(args: &[&str]) -> serde_json::Value {
    require_tool("python3");
    let out = Command::new("python3")
        .arg(SCANNER)
        .args(args)
        .output()
        .expect("run tests/python/scanner.py");
    assert!(
        out.status.success(),
        "scanner.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("scanner.py prints JSON")
}

/// Sends `files` in one association (pynetdicom) and returns one DIMSE status per file
/// (-1: not sent, the association was aborted first; -2: a response without a status;
/// -3: the association had ended).
fn send(port: u16, files: &[PathBuf], extra: &[&str]) -> Vec<i64> {
    let mut args = vec!["send".to_string(), port.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(files.iter().map(|f| f.display().to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let reply = scanner(&refs);
    let statuses: Vec<i64> = reply["statuses"]
        .as_array()
        .expect("statuses")
        .iter()
        .map(|s| s.as_i64().unwrap())
        .collect();
    assert!(!statuses.is_empty(), "scanner.py send: {reply}");
    statuses
}

fn assert_all_success(statuses: &[i64], what: &str, daemon: &Proc) {
    assert!(
        !statuses.is_empty() && statuses.iter().all(|&s| s == 0),
        "{what}: not every instance was answered Success: {statuses:?}\n{}",
        daemon.log()
    );
}

/// A synthetic study (256 x 256, 1.5 mm: small enough to be quick), its files in the
/// order a scanner sends them, and its Study Instance UID.
fn study(dir: &Path, seed: u64) -> (Vec<PathBuf>, String) {
    let dirs = synth(
        &dir.join(format!("s{seed}")),
        seed,
        "none",
        &["--matrix", "256", "--slice-thickness", "1.5"],
    );
    let files = files_in_z_order(&dirs[0]);
    let uid = dirs[0].file_name().unwrap().to_string_lossy().into_owned();
    (files, uid)
}

/// Sends a corrected version of `file` (same SOP Instance UID, other content; asserts
/// Success) and returns its SOP Instance UID.
fn send_corrected(b: &Box1, file: &Path) -> String {
    let corrected = b.tmp.path().join("corrected.dcm");
    let sop = scanner(&[
        "correct",
        file.to_str().unwrap(),
        corrected.to_str().unwrap(),
    ])["sop"]
        .as_str()
        .unwrap()
        .to_string();
    assert_all_success(
        &send(b.port, &[corrected], &[]),
        "the corrected instance",
        &b.daemon,
    );
    sop
}

/// Waits for a result of the series of `files` that analysed every one of them.
fn wait_whole_series(b: &Box1, files: &[PathBuf]) {
    let series = series_of(&files[0]);
    let ok = wait_until_ok(RESULT_WAIT, || {
        results(&b.sub)
            .iter()
            .any(|r| r["series_instance_uid"] == series.as_str() && r["instances"] == files.len())
    });
    assert!(ok, "no whole-series result:\n{}", b.daemon.log());
}

fn results(sub: &Subscriber) -> Vec<serde_json::Value> {
    sub.on(TOPIC)
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect()
}

/// Waits until `n` results for `series` were published (re-deliveries of an id count
/// once) and returns them, oldest first.
fn wait_results(sub: &Subscriber, series: &str, n: usize, daemon: &Proc) -> Vec<serde_json::Value> {
    let of_series = || -> Vec<serde_json::Value> {
        let mut seen = BTreeSet::new();
        results(sub)
            .into_iter()
            .filter(|r| r["series_instance_uid"] == series)
            .filter(|r| seen.insert((r["id"].to_string(), r["timings"]["published"].to_string())))
            .collect()
    };
    let ok = wait_until_ok(RESULT_WAIT, || of_series().len() >= n);
    assert!(
        ok,
        "{n} result(s) for series {series} not published; got {:?}\n{}",
        of_series(),
        daemon.log()
    );
    of_series()
}

fn wait_until_ok(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    done()
}

fn series_of(file: &Path) -> String {
    uid_of(file, dicom_dictionary_std::tags::SERIES_INSTANCE_UID)
}

fn uid_of(file: &Path, tag: dicom_core::Tag) -> String {
    let obj = dicom_object::open_file(file).unwrap();
    obj.element(tag)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string()
}

/// Waits until the spool no longer holds the study (released after the quiet period or
/// forgotten after the retention).
fn wait_released(spool: &Path, study: &str, daemon: &Proc) {
    assert!(
        wait_until_ok(RESULT_WAIT, || !spool.join(study).exists()),
        "study {study} still in the spool:\n{}",
        daemon.log()
    );
}

struct Box1 {
    tmp: tempfile::TempDir,
    _broker: Mosquitto,
    sub: Subscriber,
    port: u16,
    config: PathBuf,
    daemon: Proc,
}

impl Box1 {
    fn start(series_extra: &str) -> Box1 {
        let tmp = tempfile::tempdir().unwrap();
        let broker = Mosquitto::start();
        let sub = Subscriber::start(broker.port, TOPIC);
        let port = free_port();
        let config = serve_config_full(tmp.path(), port, &broker.url(), "", series_extra, "");
        let daemon = spawn_serve(&config, port, &[]);
        Box1 {
            tmp,
            _broker: broker,
            sub,
            port,
            config,
            daemon,
        }
    }

    fn spool(&self) -> PathBuf {
        self.tmp.path().join("spool")
    }

    fn restart_after_kill9(&mut self) {
        self.daemon.kill9();
        self.daemon = spawn_serve(&self.config, self.port, &[]);
    }
}

/// The scanner's daily routine: the topogram (scout) first, alone, in its own association;
/// the quiet period passes and the scout, which cannot be analysed, is released from the
/// spool with its study directory; the axial series follows seconds later in a new
/// association. Every instance is answered Success and the axial series is analysed.
/// Then the study is forgotten, and the whole study is sent again (a re-send from the
/// PACS): taken again and analysed again.
#[test]
fn scout_first_then_the_axial_series_after_the_quiet_period() {
    let b = Box1::start(SHORT_RETENTION);
    let (files, study_uid) = study(b.tmp.path(), 9301);
    let scout = b.tmp.path().join("scout.dcm");
    scanner(&["scout", files[0].to_str().unwrap(), scout.to_str().unwrap()]);

    assert_all_success(
        &send(b.port, std::slice::from_ref(&scout), &[]),
        "scout",
        &b.daemon,
    );
    wait_released(&b.spool(), &study_uid, &b.daemon);

    assert_all_success(
        &send(b.port, &files, &[]),
        "axial series after the scout",
        &b.daemon,
    );
    let axial = series_of(&files[0]);
    let first = wait_results(&b.sub, &axial, 1, &b.daemon);
    assert_ne!(first[0]["status"], "failed", "{}", first[0]);
    assert_eq!(first[0]["instances"], files.len());

    // Forgotten after the retention: the spool no longer holds the study.
    wait_released(&b.spool(), &study_uid, &b.daemon);
    let mut again = vec![scout];
    again.extend(files.iter().cloned());
    assert_all_success(
        &send(b.port, &again, &[]),
        "the study again after it was forgotten",
        &b.daemon,
    );
    // A pause in the re-send longer than the quiet period (a loaded machine) gives a partial
    // result first and the whole series' revised one later: wait for the whole one.
    let whole = wait_until_ok(RESULT_WAIT, || {
        results(&b.sub).iter().skip(1).any(|r| {
            r["series_instance_uid"] == axial.as_str()
                && r["instances"] == files.len()
                && r["status"] != "failed"
        })
    });
    assert!(
        whole,
        "no whole-series result after the re-send:\n{}",
        b.daemon.log()
    );
}

/// Two series of one study seconds apart in separate associations (a bone and a soft
/// kernel reconstruction, thin and thick): both are taken, and the study gets a result.
#[test]
fn two_series_of_a_study_in_separate_associations() {
    let b = Box1::start("");
    let (files, _) = study(b.tmp.path(), 9302);
    let soft_dir = b.tmp.path().join("soft");
    let src_dir = files[0].parent().unwrap();
    let soft = scanner(&[
        "reseries",
        src_dir.to_str().unwrap(),
        soft_dir.to_str().unwrap(),
        "--kernel",
        "B30f",
        "--thickness",
        "3.0",
    ]);
    let soft_series = soft["series"].as_str().unwrap().to_string();
    let bone_series = series_of(&files[0]);
    assert_all_success(&send(b.port, &files, &[]), "bone series", &b.daemon);
    std::thread::sleep(Duration::from_secs(2));
    let mut soft_files: Vec<PathBuf> = files
        .iter()
        .map(|f| soft_dir.join(f.file_name().unwrap()))
        .collect();
    soft_files.sort();
    assert_all_success(&send(b.port, &soft_files, &[]), "soft series", &b.daemon);
    let ok = wait_until_ok(RESULT_WAIT, || {
        results(&b.sub).iter().any(|r| {
            (r["series_instance_uid"] == bone_series.as_str()
                || r["series_instance_uid"] == soft_series.as_str())
                && r["status"] != "failed"
        })
    });
    assert!(ok, "no result for the study:\n{}", b.daemon.log());
}

/// A late instance after the study was analysed and forgotten: Success, and the series is
/// analysed again with it.
#[test]
fn a_late_instance_after_the_study_was_forgotten() {
    let b = Box1::start(SHORT_RETENTION);
    let (files, study_uid) = study(b.tmp.path(), 9303);
    let (early, late) = files.split_at(files.len() - 1);
    assert_all_success(&send(b.port, early, &[]), "the series", &b.daemon);
    let series = series_of(&files[0]);
    wait_results(&b.sub, &series, 1, &b.daemon);
    wait_released(&b.spool(), &study_uid, &b.daemon);
    assert_all_success(&send(b.port, late, &[]), "the late instance", &b.daemon);
    // The late instance alone is a series of one slice now (its study was forgotten):
    // the daemon answers it with a result, never a lost instance.
    let two = wait_results(&b.sub, &series, 2, &b.daemon);
    assert_eq!(two[1]["instances"], 1, "{}", two[1]);
}

/// A corrected re-send: one instance of an analysed series sent again with the same SOP
/// Instance UID and other content. Success, the spool holds the corrected version, and the
/// series is analysed again (the result is published again).
#[test]
fn a_corrected_resend_replaces_the_instance_and_the_series_is_analysed_again() {
    let b = Box1::start("");
    let (files, _) = study(b.tmp.path(), 9304);
    assert_all_success(&send(b.port, &files, &[]), "the series", &b.daemon);
    let series = series_of(&files[0]);
    wait_results(&b.sub, &series, 1, &b.daemon);
    let sop = send_corrected(&b, &files[files.len() / 2]);
    let two = wait_results(&b.sub, &series, 2, &b.daemon);
    assert_eq!(two[1]["instances"], files.len(), "{}", two[1]);
    assert_eq!(
        comments_in_spool(&b.spool(), &sop).as_deref(),
        Some("corrected re-send"),
        "the corrected version is not in the spool"
    );
}

/// Two scanners send their studies at the same time: every instance is answered Success
/// and both studies get a result.
#[test]
fn two_scanners_at_once() {
    let b = Box1::start("");
    let (a_files, _) = study(b.tmp.path(), 9305);
    let (b_files, _) = study(b.tmp.path(), 9306);
    let port = b.port;
    let (fa, fb) = (a_files.clone(), b_files.clone());
    let ta = std::thread::spawn(move || send(port, &fa, &["--aet", "CT_NORTH"]));
    let tb = std::thread::spawn(move || send(port, &fb, &["--aet", "CT_SOUTH"]));
    assert_all_success(&ta.join().unwrap(), "scanner A", &b.daemon);
    assert_all_success(&tb.join().unwrap(), "scanner B", &b.daemon);
    for files in [&a_files, &b_files] {
        let r = wait_results(&b.sub, &series_of(&files[0]), 1, &b.daemon);
        assert_eq!(r[0]["instances"], files.len(), "{}", r[0]);
    }
}

/// A series cut by an association abort halfway, then sent again whole: every instance of
/// the second send is Success and the series is analysed whole (the first half was not
/// lost, nor stored twice).
#[test]
fn a_series_cut_by_an_abort_then_sent_again() {
    let b = Box1::start("");
    let (files, _) = study(b.tmp.path(), 9307);
    let half = (files.len() / 2).to_string();
    let cut = send(b.port, &files, &["--abort-after", &half]);
    assert!(cut[..files.len() / 2].iter().all(|&s| s == 0), "{cut:?}");
    assert_all_success(&send(b.port, &files, &[]), "the series again", &b.daemon);
    wait_whole_series(&b, &files);
}

/// kill -9 in the middle of the scout-first routine (after the scout was released and
/// half of the axial series was acknowledged): after the restart the rest arrives, every
/// instance is answered Success, and the whole series is analysed.
#[test]
fn kill_9_during_scout_first_loses_nothing() {
    let mut b = Box1::start("");
    let (files, study_uid) = study(b.tmp.path(), 9308);
    let scout = b.tmp.path().join("scout.dcm");
    scanner(&["scout", files[0].to_str().unwrap(), scout.to_str().unwrap()]);
    assert_all_success(&send(b.port, &[scout], &[]), "scout", &b.daemon);
    wait_released(&b.spool(), &study_uid, &b.daemon);
    let (first, rest) = files.split_at(files.len() / 2);
    assert_all_success(&send(b.port, first, &[]), "first half", &b.daemon);
    b.restart_after_kill9();
    assert_all_success(
        &send(b.port, rest, &[]),
        "second half after the restart",
        &b.daemon,
    );
    wait_whole_series(&b, &files);
}

/// kill -9 right after a corrected re-send was acknowledged: after the restart the
/// corrected version is the one in the spool and the series is analysed again.
#[test]
fn kill_9_after_a_corrected_resend_analyses_the_corrected_version() {
    let mut b = Box1::start("");
    let (files, _) = study(b.tmp.path(), 9309);
    assert_all_success(&send(b.port, &files, &[]), "the series", &b.daemon);
    let series = series_of(&files[0]);
    wait_results(&b.sub, &series, 1, &b.daemon);
    let sop = send_corrected(&b, &files[3]);
    b.restart_after_kill9();
    wait_results(&b.sub, &series, 2, &b.daemon);
    assert_eq!(
        comments_in_spool(&b.spool(), &sop).as_deref(),
        Some("corrected re-send")
    );
}

/// kill -9 between two series of one study sent in separate associations: the first
/// series was acknowledged, the daemon is killed before its quiet period ends, the second
/// series arrives after the restart, and the study gets a whole-series result.
#[test]
fn kill_9_between_two_series_of_a_study_loses_nothing() {
    let mut b = Box1::start("");
    let (files, _) = study(b.tmp.path(), 9312);
    let soft_dir = b.tmp.path().join("soft");
    let soft = scanner(&[
        "reseries",
        files[0].parent().unwrap().to_str().unwrap(),
        soft_dir.to_str().unwrap(),
        "--kernel",
        "B30f",
        "--thickness",
        "3.0",
    ]);
    let soft_series = soft["series"].as_str().unwrap().to_string();
    let bone_series = series_of(&files[0]);
    assert_all_success(&send(b.port, &files, &[]), "bone series", &b.daemon);
    b.restart_after_kill9();
    let mut soft_files: Vec<PathBuf> = files
        .iter()
        .map(|f| soft_dir.join(f.file_name().unwrap()))
        .collect();
    soft_files.sort();
    assert_all_success(
        &send(b.port, &soft_files, &[]),
        "soft series after the restart",
        &b.daemon,
    );
    let ok = wait_until_ok(RESULT_WAIT, || {
        results(&b.sub).iter().any(|r| {
            (r["series_instance_uid"] == bone_series.as_str()
                || r["series_instance_uid"] == soft_series.as_str())
                && r["status"] != "failed"
                && r["instances"] == files.len()
        })
    });
    assert!(
        ok,
        "no whole-series result for the study:\n{}",
        b.daemon.log()
    );
}

/// kill -9 right after a late instance of an analysed series was acknowledged (the study
/// is still remembered): after the restart the series is analysed again with the late
/// instance and every earlier one.
#[test]
fn kill_9_after_a_late_instance_analyses_it_with_the_series() {
    let mut b = Box1::start("");
    let (files, _) = study(b.tmp.path(), 9313);
    let (early, late) = files.split_at(files.len() - 1);
    assert_all_success(&send(b.port, early, &[]), "the series", &b.daemon);
    let series = series_of(&files[0]);
    wait_results(&b.sub, &series, 1, &b.daemon);
    assert_all_success(&send(b.port, late, &[]), "the late instance", &b.daemon);
    b.restart_after_kill9();
    let two = wait_results(&b.sub, &series, 2, &b.daemon);
    assert_eq!(two[1]["instances"], files.len(), "{}", two[1]);
}

/// kill -9 after a series was cut by an association abort: after the restart the scanner
/// sends the series again whole, every instance is Success and the series is analysed whole.
#[test]
fn kill_9_after_a_series_cut_by_an_abort_loses_nothing() {
    let mut b = Box1::start("");
    let (files, _) = study(b.tmp.path(), 9314);
    let half = (files.len() / 2).to_string();
    let cut = send(b.port, &files, &["--abort-after", &half]);
    assert!(cut[..files.len() / 2].iter().all(|&s| s == 0), "{cut:?}");
    b.restart_after_kill9();
    assert_all_success(&send(b.port, &files, &[]), "the series again", &b.daemon);
    wait_whole_series(&b, &files);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Image Comments of the spool file of SOP Instance `sop` (the file is named after it).
fn comments_in_spool(spool: &Path, sop: &str) -> Option<String> {
    let name = format!("{sop}.dcm");
    let path = walk(spool)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == name))?;
    let obj = dicom_object::open_file(path).ok()?;
    let comments = obj
        .element(dicom_dictionary_std::tags::IMAGE_COMMENTS)
        .ok()?;
    Some(comments.to_str().ok()?.trim_end().to_string())
}

/// kill -9 while two scanners are sending: every instance either scanner was told Success
/// for is in the spool after the restart; both send their studies again (as scanners
/// retry an interrupted transfer) and both get a whole-series result.
#[test]
fn kill_9_while_two_scanners_send_loses_no_acknowledged_instance() {
    let mut b = Box1::start("");
    let (a_files, _) = study(b.tmp.path(), 9310);
    let (b_files, _) = study(b.tmp.path(), 9311);
    let port = b.port;
    let (fa, fb) = (a_files.clone(), b_files.clone());
    // A short DIMSE timeout: the killed daemon's associations are noticed through it.
    let quick = ["--dimse-timeout", "15"];
    let ta =
        std::thread::spawn(move || send(port, &fa, &[&["--aet", "CT_NORTH"][..], &quick].concat()));
    let tb =
        std::thread::spawn(move || send(port, &fb, &[&["--aet", "CT_SOUTH"][..], &quick].concat()));
    // Kill once some instances are in the spool, while both are still sending.
    let spool = b.spool();
    assert!(wait_until_ok(RESULT_WAIT, || walk(&spool).len() >= 20));
    b.restart_after_kill9();
    let (sa, sb) = (ta.join().unwrap(), tb.join().unwrap());
    let stored: std::collections::BTreeSet<String> = walk(&b.spool())
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for (files, statuses) in [(&a_files, &sa), (&b_files, &sb)] {
        for (file, status) in files.iter().zip(statuses.iter()) {
            if *status == 0 {
                let sop = sop_of(file);
                assert!(
                    stored.contains(&format!("{sop}.dcm")),
                    "{} was acknowledged but is not in the spool after kill -9",
                    file.display()
                );
            }
        }
    }
    assert_all_success(&send(b.port, &a_files, &[]), "scanner A again", &b.daemon);
    assert_all_success(&send(b.port, &b_files, &[]), "scanner B again", &b.daemon);
    wait_whole_series(&b, &a_files);
    wait_whole_series(&b, &b_files);
}

fn sop_of(file: &Path) -> String {
    uid_of(file, dicom_dictionary_std::tags::SOP_INSTANCE_UID)
}
