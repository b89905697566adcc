//! End to end, as the users see it: DCMTK `storescu` sends generated studies to the daemon
//! (the scanner's side); a subscriber on a real mosquitto receives schema-valid results
//! (the dashboard's side).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Validates one result document against `docs/alert.schema.json` with python3 jsonschema.
fn assert_schema_valid(result: &serde_json::Value) {
    let schema = repo_root().join("docs/alert.schema.json");
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import json,sys,jsonschema; s=json.load(open(sys.argv[1])); \
             jsonschema.validate(json.loads(sys.stdin.read()), s, \
             format_checker=jsonschema.FormatChecker())",
        )
        .arg(&schema)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(result.to_string().as_bytes())?;
            child.wait_with_output()
        })
        .expect("run python3 jsonschema (installed by .ci/run)");
    assert!(
        out.status.success(),
        "result does not validate against the schema: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        result
    );
}

/// Sends a C5-fractured and a fracture-free phantom study with DCMTK `storescu` to a
/// running daemon and returns the results a subscriber received, fractured first.
fn send_two_studies_and_collect_results() -> (serde_json::Value, serde_json::Value) {
    let storescu = dcmtk("storescu");
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();

    // Two studies a scanner would send: one with a C5 fracture, one without.
    let fractured = synth(&tmp.path().join("fx"), 9101, "C5", &[]);
    let clean = synth(&tmp.path().join("clean"), 9102, "none", &[]);

    let dicom_port = free_port();
    let config = serve_config(tmp.path(), dicom_port, &broker.url(), "");
    let daemon = spawn_serve(&config, dicom_port, &[]);

    // The dashboard subscribes before anything is sent.
    let watcher = Command::new(BIN)
        .args([
            "watch",
            "--mqtt",
            &broker.url(),
            "--prefix",
            "cspine/testsite/box1/",
        ])
        .args(["--count", "2", "--timeout", "600"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    for study in fractured.iter().chain(&clean) {
        let status = Command::new(&storescu)
            .args(["-aec", "CSPINE", "-aet", "CTSCANNER", "+sd", "+r"])
            .arg("127.0.0.1")
            .arg(dicom_port.to_string())
            .arg(study)
            .status()
            .unwrap();
        assert!(status.success(), "storescu failed for {}", study.display());
    }

    let out = watcher.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "no results arrived: {}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    let results: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 2);
    for r in &results {
        assert_schema_valid(r);
        assert_eq!(r["site"], "testsite");
    }

    let study_uid = |dir: &Path| dir.file_name().unwrap().to_string_lossy().to_string();
    let by_study = |uid: &str| {
        results
            .iter()
            .find(|r| r["study_instance_uid"] == uid)
            .unwrap_or_else(|| panic!("no result for study {uid}: {results:?}"))
    };
    let fx = by_study(&study_uid(&fractured[0])).clone();
    let ok = by_study(&study_uid(&clean[0])).clone();
    (fx, ok)
}

/// The delivery contract, whatever the model says: one schema-valid result per series,
/// for the right study, with the model and timings filled in, in time order.
#[test]
fn storescu_studies_in_schema_valid_results_out() {
    let (fx, ok) = send_two_studies_and_collect_results();
    for r in [&fx, &ok] {
        assert_eq!(r["schema"], "cspine-triage/result/v1");
        assert_eq!(r["runtime"], "cpu");
        let sha = std::fs::read_to_string(repo_root().join("models/model.json")).unwrap();
        let sha: serde_json::Value = serde_json::from_str(&sha).unwrap();
        assert_eq!(r["model"]["sha256"], sha["sha256"]);
        let t = &r["timings"];
        let order = [
            "first_instance_received",
            "last_instance_received",
            "series_complete",
            "inference_start",
            "inference_end",
            "published",
        ];
        let times: Vec<time::OffsetDateTime> = order
            .iter()
            .map(|k| {
                let s = t[*k]
                    .as_str()
                    .unwrap_or_else(|| panic!("timings.{k} missing: {t}"));
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .unwrap()
            })
            .collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "timings out of order: {t}"
        );
        assert_ne!(r["status"], "failed", "{r}");
    }
}

/// The clinical point of the pipeline: the fractured vertebra is flagged.
#[test]
fn storescu_fractured_study_is_flagged_at_the_right_vertebra() {
    let (fx, ok) = send_two_studies_and_collect_results();
    assert_eq!(fx["status"], "positive", "{fx}");
    assert_eq!(fx["vertebrae"]["C5"]["flagged"], true, "{fx}");
    assert_eq!(ok["status"], "negative", "{ok}");
    // No PACS destination configured: no DICOM result objects are built or named
    // (tests/pacs_orthanc.rs runs the box with Orthanc as its PACS).
    assert_eq!(fx["dicom_objects"], serde_json::json!([]), "{fx}");
    assert_eq!(ok["dicom_objects"], serde_json::json!([]), "{ok}");
}

/// Sends a ~90-slice series without its last 8 slices, waits for its result and for the
/// spool's analysed mark of the series, then sends the 8 late slices and waits for the
/// second result. Returns the first result, the second one, the number of instances of the
/// series and the daemon log.
/// Returns the first and the revised result, the series' instance count, the daemon's log
/// (for failure messages) and the `spool_released` events of the series.
fn send_a_series_then_its_late_slices() -> (
    serde_json::Value,
    serde_json::Value,
    usize,
    String,
    Vec<serde_json::Value>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let topic = "cspine/testsite/box1/result";
    let sub = Subscriber::start(broker.port, topic);
    // 256x256 slices 1.5 mm apart: small enough to be quick.
    let study = synth(
        &tmp.path().join("s"),
        9103,
        "C3",
        &["--matrix", "256", "--slice-thickness", "1.5"],
    );
    let files = files_in_z_order(&study[0]);
    // The last slices (one end of the stack, so the first part has no gap) come late.
    let (early, late) = files.split_at(files.len() - 8);

    let dicom_port = free_port();
    let events_path = tmp.path().join("events.jsonl");
    // The `[service]` table after the `[alert]` keys, as tests/faults/site.rs adds it.
    let service = events::service_table(&events_path);
    let config = serve_config(tmp.path(), dicom_port, &broker.url(), &service);
    let mut events = events::EventLog::whole(&events_path);
    let daemon = spawn_serve(&config, dicom_port, &[]);
    let results = || -> Vec<serde_json::Value> {
        sub.on(topic)
            .iter()
            .map(|m| serde_json::from_slice(&m.payload).unwrap())
            .collect()
    };
    let distinct_ids = || {
        results()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let timeout = Duration::from_secs(300);

    storescu_send(dicom_port, early);
    sub.wait_for_within("the first result", timeout, |_| distinct_ids().len() == 1);
    let first = results()[0].clone();
    // The series is marked analysed in the spool once its result is in the outbox (and
    // kept there while its study is remembered): the late slices arrive after that.
    let series = first["series_instance_uid"].as_str().unwrap().to_owned();
    events.wait_for("the series marked analysed in the spool", timeout, |e| {
        events::is_of_series(e, "series_marked", &series)
    });

    storescu_send(dicom_port, late);
    sub.wait_for_within("the revised result", timeout, |_| distinct_ids().len() == 2);
    let second = results()
        .into_iter()
        .find(|r| r["id"] != first["id"])
        .unwrap();
    assert_eq!(first["instances"], early.len(), "{first}");
    let released = events
        .of("spool_released")
        .into_iter()
        .filter(|e| e["series_instance_uid"] == series.as_str())
        .collect();
    (first, second, files.len(), daemon.log(), released)
}

/// Late instances: a series whose result was published receives more instances (a scanner
/// that sends the last slices late, a PACS that forwards them again). The series is
/// assembled again and the dashboard gets a second result for the same series under a new
/// id (the id names the instances analysed, docs/ALERTS.md), with the larger instance count
/// and a later `timings.published`, so that de-duplicating by id cannot drop it.
#[test]
fn late_instances_give_a_revised_result_under_a_new_id() {
    let (first, second, instances, log, _) = send_a_series_then_its_late_slices();
    for r in [&first, &second] {
        assert_schema_valid(r);
    }
    assert_ne!(first["status"], "failed", "{first}");
    assert_eq!(second["series_instance_uid"], first["series_instance_uid"]);
    assert_eq!(second["instances"], instances, "{second}\n{log}");
    let published = |r: &serde_json::Value| {
        time::OffsetDateTime::parse(
            r["timings"]["published"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert!(published(&second) > published(&first), "{first}\n{second}");
    eprintln!(
        "first result: {} ({} instances); revised result: {} ({} instances{})",
        first["status"],
        first["instances"],
        second["status"],
        second["instances"],
        second["reason"]
            .as_str()
            .map(|r| format!(", {r}"))
            .unwrap_or_default()
    );
}

/// The revised result of late instances analyses the whole series: the spool keeps the
/// earlier instances of an analysed series while its study is remembered
/// (`series.completed_retention_secs`), so the revision reads them all, and nothing of the
/// series was removed from the spool.
#[test]
fn late_instances_revision_analyses_the_whole_series() {
    let (_, second, instances, log, released) = send_a_series_then_its_late_slices();
    assert_ne!(second["status"], "failed", "{second}\n{log}");
    assert_eq!(second["instances"], instances, "{second}");
    assert!(
        released.is_empty(),
        "released within the retention: {released:?}\n{log}"
    );
}

fn storescu_send(port: u16, files: &[std::path::PathBuf]) {
    let status = Command::new(dcmtk("storescu"))
        .args(["-aec", "CSPINE", "-aet", "CTSCANNER"])
        .arg("127.0.0.1")
        .arg(port.to_string())
        .args(files)
        .status()
        .unwrap();
    assert!(status.success(), "storescu failed");
}

/// `[series]` keys of the trigger tests: a short slab and frequent checks, so that the
/// 256x256 test study (1.5 mm slices) is checked several times while it arrives.
const TRIGGER_ON: &str =
    "anatomy_coverage_trigger = true\nmin_coverage_mm = 40.0\ncoverage_check_secs = 0.3";

/// The anatomy-coverage trigger's plumbing through the daemon. So that the test does not
/// depend on what the model finds in a partial slab, the test hook
/// `CSPINE_TEST_EARLY_ACCEPT=1` publishes every early analysis. The first two thirds of a
/// series arrive, the quiet period is long (20 s): an early result of that slab is
/// published before the rest is even sent, i.e. earlier than any result without the trigger (which needs the series to
/// be quiet for the quiet period after its last instance). The rest arrives: when the
/// series completes it is analysed again, whole, under a new id.
#[test]
fn anatomy_coverage_trigger_publishes_early_then_the_whole_series() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let topic = "cspine/testsite/box1/result";
    let sub = Subscriber::start(broker.port, topic);
    let study = synth(
        &tmp.path().join("s"),
        9104,
        "C4",
        &["--matrix", "256", "--slice-thickness", "1.5"],
    );
    let files = files_in_z_order(&study[0]);
    let (first, rest) = files.split_at(files.len() * 2 / 3);
    let port = free_port();
    let config = serve_config_full(tmp.path(), port, &broker.url(), "", TRIGGER_ON, "");
    let mut serve = serve_command(&config, &["--quiet-period", "20"]);
    serve.env("CSPINE_TEST_EARLY_ACCEPT", "1");
    let daemon = Proc::spawn(serve);
    assert!(
        wait_for_port(port, Duration::from_secs(60)),
        "{}",
        daemon.log()
    );
    let results = || -> Vec<serde_json::Value> {
        sub.on(topic)
            .iter()
            .map(|m| serde_json::from_slice(&m.payload).unwrap())
            .collect()
    };
    let timeout = Duration::from_secs(300);

    storescu_send(port, first);
    let first_sent = std::time::Instant::now();
    sub.wait_for_within("the early result", timeout, |_| !results().is_empty());
    let early_after = first_sent.elapsed();
    let early = results()[0].clone();
    assert!(
        daemon
            .log()
            .contains("analysing it early (anatomy-coverage trigger)"),
        "{}",
        daemon.log()
    );
    // The slab is what had arrived: contiguous, all of the first part at most.
    let early_n = early["instances"].as_u64().unwrap() as usize;
    assert!(early_n > 0 && early_n <= first.len(), "{early}");
    assert!(
        early_after < Duration::from_secs(20),
        "the early result came {early_after:?} after the first part: the quiet period, not \
         the trigger"
    );

    storescu_send(port, rest);
    sub.wait_for_within("the result of the whole series", timeout, |_| {
        results().iter().any(|r| r["instances"] == files.len())
    });
    let whole = results()
        .into_iter()
        .find(|r| r["instances"] == files.len())
        .unwrap();
    assert_ne!(whole["id"], early["id"]);
    assert_eq!(whole["series_instance_uid"], early["series_instance_uid"]);
    assert_schema_valid(&early);
    assert_schema_valid(&whole);
    eprintln!(
        "early result ({} of {} instances, {}) {:.1} s after the first part was sent, before \
         the rest; then the whole series ({})",
        early_n,
        files.len(),
        early["status"],
        early_after.as_secs_f64(),
        whole["status"]
    );
}

/// Trigger on against trigger off on one whole series sent at once, with the committed
/// model: whether an early analysis of a partial slab passes the coverage check depends on
/// the model (the withheld path is covered by the unit tests of the check), so at most one
/// early result may come first; the whole-series result is the same analysis (same id) as
/// without the trigger, and the first result comes no later than without it, up to one
/// early analysis that may still be running when the series completes (measured: printed).
#[test]
fn anatomy_coverage_trigger_keeps_the_whole_series_result_and_is_no_later() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let topic = "cspine/testsite/box1/result";
    let study = synth(
        &tmp.path().join("s"),
        9105,
        "none",
        &["--matrix", "256", "--slice-thickness", "1.5"],
    );
    let files = files_in_z_order(&study[0]);
    let timeout = Duration::from_secs(300);
    // Last C-STORE response to the first result, trigger off then on; the results and the
    // event file.
    let run = |name: &str, series_extra: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let sub = Subscriber::start(broker.port, topic);
        let port = free_port();
        let events_path = dir.join("events.jsonl");
        let service = events::service_table(&events_path);
        let config = serve_config_full(&dir, port, &broker.url(), "", series_extra, &service);
        let daemon = spawn_serve(&config, port, &[]);
        storescu_send(port, &files);
        let sent = std::time::Instant::now();
        sub.wait_for_within("a result", timeout, |m| !m.is_empty());
        let took = sent.elapsed();
        // An early result comes before the whole series' one: wait for that one (however
        // loaded the machine), then a moment for anything that should not come at all.
        sub.wait_for_within("the whole series' result", timeout, |m| {
            m.iter().any(|m| {
                serde_json::from_slice::<serde_json::Value>(&m.payload)
                    .is_ok_and(|r| r["instances"] == files.len())
            })
        });
        std::thread::sleep(Duration::from_secs(2));
        let results: Vec<serde_json::Value> = sub
            .on(topic)
            .iter()
            .map(|m| serde_json::from_slice(&m.payload).unwrap())
            .collect();
        events::assert_valid_event_file(&events_path);
        let log = events::EventLog::whole(&events_path);
        (took, results, daemon.log(), log)
    };
    let (off, off_results, _, _) = run("off", "");
    let (on, on_results, log, mut on_events) = run("on", TRIGGER_ON);
    assert_eq!(off_results.len(), 1, "{off_results:?}");
    let whole: Vec<_> = on_results
        .iter()
        .filter(|r| r["instances"] == files.len())
        .collect();
    assert_eq!(whole.len(), 1, "{on_results:?}\n{log}");
    assert_eq!(whole[0]["id"], off_results[0]["id"], "the same analysis");
    assert!(
        on_results.len() <= 2,
        "at most one early result before the whole series: {on_results:?}"
    );
    let early_started = on_events
        .of("analysis_started")
        .iter()
        .filter(|e| e["early"] == true)
        .count();
    assert!(early_started >= 1, "the trigger ran:\n{log}");
    let withheld = on_events.of("early_analysis_withheld");
    assert_eq!(
        early_started,
        withheld.len() + on_results.len() - 1,
        "each early analysis is published or withheld: {withheld:?}\n{log}"
    );
    eprintln!(
        "last response -> first result: {:.2} s without the trigger, {:.2} s with it ({} \
         early result(s) published, {} withheld: {:?})",
        off.as_secs_f64(),
        on.as_secs_f64(),
        on_results.len() - 1,
        withheld.len(),
        withheld.iter().map(|e| &e["reason"]).collect::<Vec<_>>()
    );
    // "No later" as an order, not a timing (shared machines): an early result, if any, comes
    // before the whole series' one. The times are printed above; BENCHMARKS.md measures them.
    assert!(
        on_results.last().unwrap()["instances"] == files.len(),
        "the whole series' result is the last one: {on_results:?}"
    );
}
