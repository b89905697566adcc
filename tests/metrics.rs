//! The daemon's observability with real peers: one phantom study sent with storescu, then
//! the Prometheus endpoint (parsed by the reference Python parser and checked by
//! `promtool check metrics`), the JSON-lines event stream and the retained MQTT status
//! (mosquitto); and the embedded broker's credentials (mosquitto_sub).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// `GET /metrics` over plain HTTP/1.0: the body.
fn scrape(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// Runs `program args` with `input` on stdin: (success, stdout, stderr).
fn pipe(program: &Path, args: &[&str], input: &str) -> (bool, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value of the sample `name` with `labels` in the parsed families.
fn sample(families: &serde_json::Value, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let samples = families[family]["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no family {family}"));
    samples
        .iter()
        .find(|s| {
            s["name"] == name
                && labels
                    .iter()
                    .all(|(k, v)| s["labels"][*k].as_str() == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?} in {samples:?}"))["value"]
        .as_f64()
        .unwrap()
}

/// Validates `docs` against `docs/<schema>` (tests/python/alert_validate.py).
fn validate(schema: &str, docs: &[serde_json::Value], tmp: &Path) {
    let files: Vec<std::path::PathBuf> = docs
        .iter()
        .enumerate()
        .map(|(i, doc)| {
            let path = tmp.join(format!("{schema}.{i}.json"));
            std::fs::write(&path, doc.to_string()).unwrap();
            path
        })
        .collect();
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/alert_validate.py"))
        .arg(repo_root().join("docs").join(schema))
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{schema}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends an MQTT 3.1.1 CONNECT (clean session, with `login` if any) and returns the
/// CONNACK's return code, or `None` when the broker closed the connection without one.
fn connack(port: u16, login: Option<(&str, &str)>) -> Option<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(if login.is_some() { 0xC2 } else { 0x02 });
    body.extend_from_slice(&30u16.to_be_bytes()); // keep-alive
    string(&mut body, "metrics-test-client");
    if let Some((user, pass)) = login {
        string(&mut body, user);
        string(&mut body, pass);
    }
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    // A guard against a hung test, not a timing assertion.
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(&packet).unwrap();
    let mut ack = [0u8; 4];
    match stream.read_exact(&mut ack) {
        Ok(()) => {
            assert_eq!(&ack[..2], &[0x20, 0x02], "not a CONNACK");
            Some(ack[3])
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            panic!("the broker neither answered nor closed the connection")
        }
        Err(_) => None,
    }
}

fn storescu(port: u16, study: &Path) {
    let status = Command::new(dcmtk("storescu"))
        .args(["-aec", "CSPINE", "-aet", "CTSCANNER", "+sd", "+r"])
        .arg("127.0.0.1")
        .arg(port.to_string())
        .arg(study)
        .status()
        .unwrap();
    assert!(status.success(), "storescu failed for {}", study.display());
}

/// One study: the counters move by what was sent, each latency histogram holds the one
/// series, promtool accepts the exposition, the event file holds the study's story in
/// order, and the retained status carries the key figures.
#[test]
fn one_study_shows_in_metrics_events_and_status() {
    let promtool = require_tool("promtool");
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let study = synth(&tmp.path().join("study"), 9301, "none", &[]).remove(0);
    let slices = std::fs::read_dir(&study).unwrap().count();

    let (dicom_port, metrics_port) = (free_port(), free_port());
    let events_path = tmp.path().join("events.jsonl");
    let extra = format!(
        "status_interval_secs = 0.5\n\n[metrics]\nenabled = true\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
         [service]\nevents_path = \"{}\"\n",
        events_path.display()
    );
    let config = serve_config(tmp.path(), dicom_port, &broker.url(), &extra);
    let status_topic = "cspine/testsite/box1/status";
    let sub = Subscriber::start(broker.port, "cspine/testsite/box1/#");
    let daemon = spawn_serve(&config, dicom_port, &[]);
    storescu(dicom_port, &study);

    // The result is published and acknowledged.
    let read_events = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&events_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_until(
        "the result acknowledged by the broker",
        Duration::from_secs(300),
        || {
            read_events()
                .iter()
                .any(|e| e["event"] == "result_published")
        },
    );
    let events = read_events();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    let position = |kind: &str| {
        kinds
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_else(|| panic!("no {kind} in {kinds:?}\n{}", daemon.log()))
    };
    let stored = events
        .iter()
        .filter(|e| e["event"] == "instance_stored" && e["duplicate"] == false)
        .count();
    assert_eq!(stored, slices);
    assert!(position("association_opened") < position("instance_stored"));
    assert!(position("series_complete") < position("analysis_done"));
    assert!(position("analysis_done") < position("result_committed"));
    assert!(position("result_committed") < position("result_published"));
    let complete = &events[position("series_complete")];
    assert_eq!(complete["instances"], slices);
    assert_eq!(
        complete["study_instance_uid"],
        study.file_name().unwrap().to_str().unwrap()
    );
    let analysis = &events[position("analysis_done")];
    let status = analysis["status"].as_str().unwrap().to_owned();
    assert!(
        ["positive", "negative", "indeterminate"].contains(&status.as_str()),
        "{status}"
    );
    let result_id = analysis["result_id"].as_str().unwrap();
    assert_eq!(events[position("result_published")]["result_id"], result_id);
    validate("events.schema.json", &events, tmp.path());

    // The exposition: reference parser, counters, histograms, promtool.
    let text = scrape(metrics_port);
    let (ok, json, err) = pipe(
        Path::new("python3"),
        &[repo_root()
            .join("tests/python/metrics_parse.py")
            .to_str()
            .unwrap()],
        &text,
    );
    assert!(
        ok,
        "prometheus_client could not parse /metrics: {err}\n{text}"
    );
    let families: serde_json::Value = serde_json::from_str(&json).unwrap();
    // The parser names a counter's family without its `_total`.
    let count = |name: &str, labels: &[(&str, &str)]| {
        let family = name.strip_suffix("_total").unwrap_or(name);
        sample(&families, family, name, labels)
    };
    assert_eq!(count("cspine_instances_received_total", &[]), slices as f64);
    assert_eq!(count("cspine_associations_opened_total", &[]), 1.0);
    assert_eq!(count("cspine_associations_open", &[]), 0.0);
    assert_eq!(count("cspine_series_complete_total", &[]), 1.0);
    assert_eq!(
        count("cspine_series_analysed_total", &[("status", &status)]),
        1.0
    );
    assert_eq!(count("cspine_results_published_total", &[]), 1.0);
    assert!(families.get("cspine_instances_refused").is_none());
    for histogram in [
        "cspine_receive_to_series_complete_seconds",
        "cspine_series_complete_to_inference_done_seconds",
        "cspine_inference_done_to_published_seconds",
    ] {
        assert_eq!(families[histogram]["type"], "histogram");
        let n = sample(&families, histogram, &format!("{histogram}_count"), &[]);
        assert_eq!(n, 1.0, "{histogram}");
    }
    assert_eq!(count("cspine_queue_depth", &[("queue", "outbox")]), 0.0);
    assert!(count("cspine_spool_bytes", &[]) > 0.0);
    assert!(count("cspine_spool_free_bytes", &[]) > 0.0);
    assert_eq!(count("cspine_stages_stuck", &[]), 0.0);
    assert!(count("cspine_last_result_timestamp_seconds", &[]) > 1.7e9);
    let info = families["cspine_model_info"]["samples"][0]["labels"].clone();
    assert_eq!(info["runtime"], "cpu");
    assert_eq!(info["sha256"].as_str().unwrap().len(), 64);
    let (ok, out, err) = pipe(&promtool, &["check", "metrics"], &text);
    assert!(ok, "promtool check metrics: {out}{err}\n{text}");

    // The retained status: key figures, the last result among them.
    sub.wait_for("a status with the last result", |messages| {
        messages.iter().any(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            m.topic == status_topic && v["figures"]["last_result"].is_string()
        })
    });
    // A subscriber that comes later gets it as the retained message.
    let late = Subscriber::start(broker.port, status_topic);
    late.wait_for("the retained status", |messages| !messages.is_empty());
    let retained = late.messages().remove(0);
    assert!(retained.retain);
    let status: serde_json::Value = serde_json::from_slice(&retained.payload).unwrap();
    assert_eq!(status["state"], "online");
    validate(
        "status.schema.json",
        std::slice::from_ref(&status),
        tmp.path(),
    );
    let figures = &status["figures"];
    assert!(figures["last_result"].is_string(), "{status}");
    assert_eq!(figures["queues"]["outbox"], 0);
    assert_eq!(figures["queues"]["instances"], 0);
    assert_eq!(figures["stuck_stages"], serde_json::json!([]));
    assert!(figures["spool_free_bytes"].as_u64().unwrap() > 0);
    drop(daemon);
}

/// With `alert.username` and a password, the embedded broker refuses a client with the
/// wrong password, and the daemon's own client (which published the retained status)
/// is in.
#[test]
fn embedded_broker_requires_the_configured_login() {
    let mosquitto_sub = require_tool("mosquitto_sub");
    let tmp = tempfile::tempdir().unwrap();
    let (dicom_port, mqtt_port) = (free_port(), free_port());
    let config = serve_config(tmp.path(), dicom_port, "REPLACED", "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "mqtt_url = \"REPLACED\"",
        &format!(
            "embedded_broker_port = {mqtt_port}\nusername = \"cspine\"\npassword = \"right-one\""
        ),
    );
    std::fs::write(&config, text).unwrap();
    let daemon = spawn_serve(&config, dicom_port, &[]);

    // rumqttd closes the connection of a refused login without a CONNACK.
    assert_eq!(connack(mqtt_port, Some(("cspine", "wrong"))), None);
    assert_eq!(connack(mqtt_port, None), None);
    assert_eq!(connack(mqtt_port, Some(("cspine", "right-one"))), Some(0));
    // The daemon's own client is in: it published the retained status.
    let right = Command::new(&mosquitto_sub)
        .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
        .args(["-t", "cspine/testsite/box1/status", "-C", "1", "-W", "30"])
        .args(["-u", "cspine", "-P", "right-one"])
        .output()
        .unwrap();
    assert!(
        right.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&right.stderr),
        daemon.log()
    );
    let status: serde_json::Value = serde_json::from_slice(&right.stdout).unwrap();
    assert_eq!(status["state"], "online");
}
