//! Alert delivery against a real broker: mosquitto (`/usr/sbin/mosquitto`) started by each
//! test on a free loopback port, subscribers in python paho-mqtt
//! (`tests/python/alert_sub.py`), schema checks with python jsonschema
//! (`tests/python/alert_validate.py`).
//!
//! The library API is driven in-process where that is enough. Where a process must die
//! (kill -9, Last Will) or its log must be read, this test binary re-runs itself as a child
//! running only the ignored test `child_alert_process`, configured through environment
//! variables: the real library code in a real separate process, no extra binary.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, wait_until, Message, SubOptions, Subscriber};
use cspine_triage::alert::{AlertConfig, Alerts, Committed, StatusInfo};
use cspine_triage::result::{
    InterpolatedGaps, KeySlice, ModelInfo, PatientResult, ResultMessage, Status, Timings,
    TriageResult, VertebraResult, SCHEMA_V1,
};
use time::OffsetDateTime;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// The alert stage's heartbeat, as `serve` registers it (nothing watches it here).
fn alert_heartbeat() -> cspine_triage::heartbeat::Heartbeat {
    cspine_triage::service::health::Health::new(Default::default()).register("alert")
}
const TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- helpers

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require(tool: &str) {
    let found = if tool.starts_with('/') {
        Path::new(tool).exists()
    } else {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    assert!(found, "{tool} is required for this test (apt-get install mosquitto mosquitto-clients openssl python3-paho-mqtt python3-jsonschema)");
}

/// A mosquitto process with a generated config; killed on drop.
struct Mosquitto {
    child: Option<Child>,
    conf: PathBuf,
    port: u16,
}

impl Mosquitto {
    /// `extra` is appended to the listener block (TLS, auth).
    fn start(dir: &Path, port: u16, extra: &str) -> Mosquitto {
        require(MOSQUITTO);
        let data = dir.join("mosquitto-data");
        std::fs::create_dir_all(&data).unwrap();
        let conf = dir.join("mosquitto.conf");
        let auth = if extra.contains("password_file") {
            ""
        } else {
            "allow_anonymous true\n"
        };
        // Started as root, mosquitto switches to user "mosquitto", which cannot read the
        // test's private temp dir: stay who we are.
        let me = Command::new("id").arg("-un").output().expect("run id -un");
        let me = String::from_utf8_lossy(&me.stdout).trim().to_owned();
        std::fs::write(
            &conf,
            format!(
                "user {me}\nper_listener_settings false\npersistence true\npersistence_location {}/\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n{auth}\
                 listener {port} 127.0.0.1\n{extra}\n",
                data.display(),
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            child: None,
            conf,
            port,
        };
        m.restart();
        m
    }

    fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let port = self.port;
        wait_until("mosquitto to listen", TIMEOUT, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// SIGTERM (mosquitto saves its persistence database) and wait.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn instant(s: &str) -> Option<OffsetDateTime> {
    Some(OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap())
}

/// A result with every field filled.
fn full_result(id: &str, status: Status) -> TriageResult {
    let mut vertebrae = BTreeMap::new();
    for (i, name) in ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
        .iter()
        .enumerate()
    {
        let flagged = status == Status::Positive && i == 1;
        vertebrae.insert(
            name.to_string(),
            VertebraResult {
                probability: if flagged { 0.91 } else { 0.03 },
                flagged,
                z_range_mm: if i == 6 {
                    None
                } else {
                    Some([-100.0 + 20.0 * i as f64, -81.5 + 20.0 * i as f64])
                },
                key_slice: flagged.then(|| KeySlice {
                    sop_instance_uid: "1.2.826.0.1.3680043.8.498.1.7.42".into(),
                    z_mm: -78.25,
                }),
            },
        );
    }
    TriageResult {
        schema: SCHEMA_V1.into(),
        id: id.into(),
        status,
        reason: None,
        study_instance_uid: "1.2.826.0.1.3680043.8.498.1".into(),
        series_instance_uid: format!("1.2.826.0.1.3680043.8.498.1.{}", id.len()),
        instances: 120,
        interpolated_gaps: Some(InterpolatedGaps {
            count: 1,
            largest_mm: 1.0,
        }),
        accession_number: "ACC0001".into(),
        patient_ref: String::new(),
        vertebrae,
        not_covered: Some(Vec::new()),
        patient: Some(PatientResult {
            probability: if status == Status::Positive {
                0.93
            } else {
                0.05
            },
            threshold: 0.5,
            flagged: status == Status::Positive,
        }),
        key_slice: Some(KeySlice {
            sop_instance_uid: "1.2.826.0.1.3680043.8.498.1.7.42".into(),
            z_mm: -78.25,
        }),
        model: ModelInfo {
            name: "cspine-phantom".into(),
            version: "1.0.0".into(),
            sha256: "ab".repeat(32),
        },
        runtime: "cpu".into(),
        device: String::new(),
        site: String::new(),
        timings: Timings {
            first_instance_received: instant("2026-11-27T13:00:00Z"),
            last_instance_received: instant("2026-11-27T13:00:05.250Z"),
            series_complete: instant("2026-11-27T13:00:07Z"),
            inference_start: instant("2026-11-27T13:00:07.100Z"),
            inference_end: instant("2026-11-27T13:00:19.900Z"),
            published: None,
        },
        dicom_objects: Vec::new(),
    }
}

fn message(id: &str, status: Status, png: Option<&[u8]>) -> ResultMessage {
    ResultMessage {
        failed_better: Vec::new(),
        result: full_result(id, status),
        patient_id: "PAT-0042".into(),
        key_image_png: png.map(<[u8]>::to_vec),
        sop_instance_uids: Vec::new(),
        source: Default::default(),
    }
}

fn config(dir: &Path, url: Option<String>) -> AlertConfig {
    AlertConfig {
        mqtt_url: url,
        site: "testsite".into(),
        device: "ct1".into(),
        outbox_dir: dir.join("outbox"),
        reconnect_min_secs: 0.2,
        reconnect_max_secs: 1.0,
        shutdown_drain_secs: 2.0,
        ..AlertConfig::default()
    }
}

fn validate_against_schema(dir: &Path, payload: &[u8]) {
    let file = dir.join(format!("doc-{}.json", rand_suffix()));
    std::fs::write(&file, payload).unwrap();
    let out = Command::new("python3")
        .arg(repo().join("tests/python/alert_validate.py"))
        .arg(repo().join("docs/alert.schema.json"))
        .arg(&file)
        .output()
        .expect("run tests/python/alert_validate.py");
    assert!(
        out.status.success(),
        "result does not validate against docs/alert.schema.json:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn json(payload: &[u8]) -> serde_json::Value {
    serde_json::from_slice(payload).expect("payload is JSON")
}

/// Runs [`Alerts`] in-process on its own runtime thread.
struct InProcess {
    tx: Option<tokio::sync::mpsc::Sender<ResultMessage>>,
    committed: std::sync::mpsc::Receiver<Committed>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    fn start(config: AlertConfig) -> InProcess {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (ctx, crx) = std::sync::mpsc::channel();
        let alerts = Alerts::open(&config).expect("open alerts");
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let (ctx_async, mut crx_async) = tokio::sync::mpsc::channel(16);
                let forward = tokio::spawn(async move {
                    while let Some(c) = crx_async.recv().await {
                        let _ = ctx.send(c);
                    }
                });
                let model = ModelInfo {
                    name: "cspine-phantom".into(),
                    version: "1.0.0".into(),
                    sha256: "ab".repeat(32),
                };
                let result = alerts
                    .run(
                        alert_heartbeat(),
                        StatusInfo::new(Some(model)),
                        rx,
                        Some(ctx_async),
                    )
                    .await;
                let _ = forward.await;
                result
            })
        });
        InProcess {
            tx: Some(tx),
            committed: crx,
            thread: Some(thread),
        }
    }

    /// Sends a result and waits until it is durably in the outbox.
    fn commit(&self, msg: ResultMessage) -> Committed {
        let id = msg.result.id.clone();
        self.tx.as_ref().unwrap().blocking_send(msg).unwrap();
        let committed = self.committed.recv_timeout(TIMEOUT).expect("committed");
        assert_eq!(committed.id, id);
        committed
    }

    /// Closes the channel: drain, offline, return.
    fn finish(mut self) {
        self.tx.take();
        self.thread
            .take()
            .unwrap()
            .join()
            .unwrap()
            .expect("alerts run");
    }
}

fn entries_on_disk(outbox: &Path) -> usize {
    std::fs::read_dir(outbox)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .map(|e| e.path().extension().is_some_and(|x| x == "entry"))
                    .unwrap_or(false)
            })
            .count()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------- child process mode

const CHILD_CONFIG: &str = "CSPINE_ALERT_CHILD_CONFIG";
const CHILD_RESULTS: &str = "CSPINE_ALERT_CHILD_RESULTS";

/// Not a test: the body of the child process of the kill -9, Last Will and TLS tests
/// (run as `<this binary> --ignored --exact child_alert_process`). Without its environment
/// it does nothing. It commits the comma-separated ids of `CSPINE_ALERT_CHILD_RESULTS`,
/// prints `COMMITTED <id>` for each, then keeps delivering until killed.
#[test]
#[ignore = "helper process for other tests"]
fn child_alert_process() {
    let Ok(config_path) = std::env::var(CHILD_CONFIG) else {
        return;
    };
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .is_test(false)
        .try_init();
    let text = std::fs::read_to_string(&config_path).unwrap();
    let config: AlertConfig = toml::from_str(&text).unwrap();
    let ids: Vec<String> = std::env::var(CHILD_RESULTS)
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let alerts = Alerts::open(&config).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (ctx, mut crx) = tokio::sync::mpsc::channel(16);
        let run = tokio::spawn(alerts.run(alert_heartbeat(), StatusInfo::new(None), rx, Some(ctx)));
        for id in &ids {
            tx.send(message(id, Status::Positive, Some(b"\x89PNG-child")))
                .await
                .unwrap();
            let c = crx.recv().await.unwrap();
            println!("COMMITTED {}", c.id);
            std::io::stdout().flush().unwrap();
        }
        println!("CHILD READY");
        std::io::stdout().flush().unwrap();
        // Keep the sender: the run only ends when the process is killed.
        let _keep = tx;
        run.await.unwrap().unwrap();
    });
}

/// A child process running [`child_alert_process`]; stdout and stderr lines are collected.
struct ChildAlerts {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl ChildAlerts {
    fn start(dir: &Path, config: &AlertConfig, ids: &[&str]) -> ChildAlerts {
        let config_path = dir.join(format!("child-{}.toml", rand_suffix()));
        std::fs::write(&config_path, toml::to_string(config).unwrap()).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "child_alert_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_CONFIG, &config_path)
            .env(CHILD_RESULTS, ids.join(","))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start child process");
        let collect = |stream: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        ChildAlerts {
            child,
            stdout,
            stderr,
        }
    }

    fn wait_stdout(&self, line: &str) {
        self.wait(&format!("child to print {line:?}"), || {
            // libtest may print "test child_alert_process ... " before the first line.
            self.stdout
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.ends_with(line))
        });
    }

    fn wait_stderr_contains(&self, needle: &str) {
        self.wait(&format!("child to log {needle:?}"), || {
            self.stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
        });
    }

    /// Like [`wait_until`], but a timeout shows what the child printed.
    fn wait(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done() {
            if Instant::now() > deadline {
                // Copy first: panicking with a lock held would poison it for the readers.
                let out = self.stdout.lock().unwrap().join("\n");
                let err = self.stderr.lock().unwrap().join("\n");
                panic!("timed out waiting for {what}; child stdout:\n{out}\nchild stderr:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_9(&mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ChildAlerts {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn published_result_arrives_and_validates_against_schema() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = Mosquitto::start(dir.path(), port, "");
    let sub = Subscriber::start(port, "cspine/#");
    let config = config(dir.path(), Some(format!("mqtt://127.0.0.1:{port}")));
    let alerts = InProcess::start(config.clone());

    let png = b"\x89PNG\r\n\x1a\n-not-really-a-png".to_vec();
    alerts.commit(message("res-pos-1", Status::Positive, Some(&png)));
    alerts.commit(message("res-neg-1", Status::Negative, None));

    let prefix = "cspine/testsite/ct1/";
    sub.wait_for("both results, the alert and the key image", |m| {
        let n = |t: &str| {
            m.iter()
                .filter(|x| x.topic == format!("{prefix}{t}"))
                .count()
        };
        n("result") >= 2 && n("alert") >= 1 && n("keyimage/res-pos-1") >= 1
    });
    let results = sub.on(&format!("{prefix}result"));
    let ids: Vec<_> = results
        .iter()
        .map(|m| json(&m.payload)["id"].clone())
        .collect();
    assert_eq!(ids, ["res-pos-1", "res-neg-1"]);
    for m in &results {
        assert!(!m.retain, "results are not retained");
        validate_against_schema(dir.path(), &m.payload);
        let v = json(&m.payload);
        assert_eq!(v["schema"], SCHEMA_V1);
        assert_eq!(v["site"], "testsite");
        assert_eq!(v["device"], "ct1");
        let patient_ref = v["patient_ref"].as_str().unwrap();
        assert_eq!(patient_ref.len(), 64, "pseudonymised by default");
        assert!(!patient_ref.contains("PAT-0042"));
        assert!(v["timings"]["published"].is_string());
    }
    // The alert topic carries exactly the positive result, byte for byte.
    let alert_msgs = sub.on(&format!("{prefix}alert"));
    assert_eq!(alert_msgs.len(), 1);
    assert_eq!(alert_msgs[0].payload, results[0].payload);
    let key = sub.on(&format!("{prefix}keyimage/res-pos-1"));
    assert_eq!(key[0].payload, png);
    assert!(!key[0].retain);
    assert!(sub.on(&format!("{prefix}keyimage/res-neg-1")).is_empty());
    // Retained online status with version and model.
    let status = sub.on(&format!("{prefix}status"));
    let online = json(&status[0].payload);
    assert_eq!(online["state"], "online");
    assert_eq!(online["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(online["model"]["name"], "cspine-phantom");

    // Acknowledged entries leave the outbox.
    wait_until("the outbox to empty", TIMEOUT, || {
        entries_on_disk(&config.outbox_dir) == 0
    });

    // Orderly shutdown says offline (retained).
    alerts.finish();
    sub.wait_for("offline status", |m| {
        m.iter()
            .any(|x| x.topic == format!("{prefix}status") && json(&x.payload)["state"] == "offline")
    });
    let late = Subscriber::start(port, &format!("{prefix}status"));
    late.wait_for("retained status", |m| !m.is_empty());
    let retained = late.messages();
    assert!(retained[0].retain);
    assert_eq!(json(&retained[0].payload)["state"], "offline");
}

/// First-occurrence order of result ids, and a check that every repeat of an id is a
/// byte-identical re-delivery.
fn result_ids_in_order(results: &[Message]) -> Vec<String> {
    let mut first: HashMap<String, Vec<u8>> = HashMap::new();
    let mut order = Vec::new();
    for m in results {
        let id = json(&m.payload)["id"].as_str().unwrap().to_owned();
        match first.get(&id) {
            Some(payload) => assert_eq!(
                payload, &m.payload,
                "a repeated id must be an exact re-delivery ({id})"
            ),
            None => {
                first.insert(id.clone(), m.payload.clone());
                order.push(id);
            }
        }
    }
    order
}

#[test]
fn broker_outage_every_result_arrives_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut broker = Mosquitto::start(dir.path(), port, "");
    let prefix = "cspine/testsite/ct1/";
    // A persistent session: the broker keeps our subscription and queues QoS 1 messages
    // while we are disconnected (it is down too, then restarted from its database).
    let sub = Subscriber::start_with(
        port,
        &format!("{prefix}result"),
        SubOptions {
            client_id: "outage-subscriber",
            persistent: true,
            ..SubOptions::default()
        },
    );
    let config = config(dir.path(), Some(format!("mqtt://127.0.0.1:{port}")));
    let alerts = InProcess::start(config.clone());
    alerts.commit(message("outage-0", Status::Negative, None));
    sub.wait_for("the first result", |m| !m.is_empty());

    broker.stop();
    let ids: Vec<String> = (1..=6).map(|i| format!("outage-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let status = if i % 2 == 0 {
            Status::Positive
        } else {
            Status::Negative
        };
        alerts.commit(message(id, status, Some(b"\x89PNG-outage")));
    }
    // Everything is durably waiting while the broker is down.
    assert_eq!(entries_on_disk(&config.outbox_dir), 6);
    std::thread::sleep(Duration::from_millis(1500)); // a few failed reconnects
    assert_eq!(
        entries_on_disk(&config.outbox_dir),
        6,
        "nothing leaves the outbox unacked"
    );

    broker.restart();
    sub.wait_for("all six results after the restart", |m| {
        let ids: std::collections::HashSet<_> =
            m.iter().map(|x| json(&x.payload)["id"].clone()).collect();
        ids.len() == 7
    });
    let order = result_ids_in_order(&sub.messages());
    let mut expected = vec!["outage-0".to_owned()];
    expected.extend(ids);
    assert_eq!(
        order, expected,
        "results arrive in commit order, once per id"
    );
    wait_until("the outbox to empty", TIMEOUT, || {
        entries_on_disk(&config.outbox_dir) == 0
    });

    // Second outage while results are in flight (sent, PUBACK pending): larger key images
    // keep several of them on the wire when the broker goes away.
    let png = vec![0x5a_u8; 256 * 1024];
    let more: Vec<String> = (7..=26).map(|i| format!("outage-{i}")).collect();
    for id in &more {
        alerts.commit(message(id, Status::Positive, Some(&png)));
    }
    broker.stop();
    let waiting = entries_on_disk(&config.outbox_dir);
    broker.restart();
    sub.wait_for("every result after the second outage", |m| {
        let ids: std::collections::HashSet<_> =
            m.iter().map(|x| json(&x.payload)["id"].clone()).collect();
        ids.len() == 27
    });
    expected.extend(more);
    assert_eq!(result_ids_in_order(&sub.messages()), expected);
    wait_until("the outbox to empty", TIMEOUT, || {
        entries_on_disk(&config.outbox_dir) == 0
    });
    eprintln!("second outage hit with {waiting} result(s) not yet acknowledged");
    alerts.finish();
}

#[test]
fn kill_9_before_puback_result_arrives_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // No broker yet: the child commits and can never get a PUBACK before it dies.
    let config = config(dir.path(), Some(format!("mqtt://127.0.0.1:{port}")));
    let mut child = ChildAlerts::start(dir.path(), &config, &["crash-1", "crash-2"]);
    child.wait_stdout("COMMITTED crash-2");
    child.wait_stderr_contains("cannot connect to MQTT broker");
    child.kill_9();
    assert_eq!(
        entries_on_disk(&config.outbox_dir),
        2,
        "both results survive kill -9"
    );

    let _broker = Mosquitto::start(dir.path(), port, "");
    let prefix = "cspine/testsite/ct1/";
    let sub = Subscriber::start(port, &format!("{prefix}#"));
    let _restarted = ChildAlerts::start(dir.path(), &config, &[]);
    sub.wait_for("both results after the restart", |m| {
        m.iter()
            .filter(|x| x.topic == format!("{prefix}result"))
            .count()
            >= 2
            && m.iter()
                .filter(|x| x.topic == format!("{prefix}alert"))
                .count()
                >= 2
    });
    let order = result_ids_in_order(&sub.on(&format!("{prefix}result")));
    assert_eq!(order, ["crash-1", "crash-2"]);
    assert_eq!(
        sub.on(&format!("{prefix}keyimage/crash-1"))[0].payload,
        b"\x89PNG-child"
    );
    wait_until("the outbox to empty", TIMEOUT, || {
        entries_on_disk(&config.outbox_dir) == 0
    });
}

#[test]
fn last_will_marks_device_offline_when_killed() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = Mosquitto::start(dir.path(), port, "");
    let topic = "cspine/testsite/ct1/status";
    let sub = Subscriber::start(port, topic);
    let config = config(dir.path(), Some(format!("mqtt://127.0.0.1:{port}")));
    let mut child = ChildAlerts::start(dir.path(), &config, &[]);
    sub.wait_for("online status", |m| {
        m.iter().any(|x| json(&x.payload)["state"] == "online")
    });
    child.kill_9();
    sub.wait_for("the Last Will (offline)", |m| {
        m.iter().any(|x| json(&x.payload)["state"] == "offline")
    });
    let last = sub.messages().pop().unwrap();
    let offline = json(&last.payload);
    assert_eq!(offline["state"], "offline");
    assert_eq!(offline["device"], "ct1");
    // Retained: a dashboard that starts later still sees the device offline.
    let late = Subscriber::start(port, topic);
    late.wait_for("retained status", |m| !m.is_empty());
    assert!(late.messages()[0].retain);
    assert_eq!(json(&late.messages()[0].payload)["state"], "offline");
}

fn openssl(dir: &Path, args: &[&str]) {
    require("openssl");
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.crt`) and, signed by it, `server.crt` for 127.0.0.1 plus client certificates
/// `<name>.crt` / `<name>.key` with CN = name.
fn make_pki(d: &Path, clients: &[&str]) {
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=cspine test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    // Extensions make X.509 v3 certificates: rustls refuses v1.
    std::fs::write(d.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    let mut names = vec!["server"];
    names.extend_from_slice(clients);
    for name in names {
        let cn = if name == "server" {
            "/CN=127.0.0.1".to_owned()
        } else {
            format!("/CN={name}")
        };
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        let ext = if name == "server" {
            "server.ext"
        } else {
            "client.ext"
        };
        openssl(
            d,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-subj", &cn, "-keyout", &key, "-out", &csr,
            ],
        );
        let args = [
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
            "-extfile",
            ext,
        ];
        openssl(d, &args);
    }
}

#[test]
fn tls_client_certificate_authenticates_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d, &["device", "dashboard"]);
    let port = free_port();
    let _broker = Mosquitto::start(
        d,
        port,
        &format!(
            "cafile {0}/ca.crt\ncertfile {0}/server.crt\nkeyfile {0}/server.key\n\
             require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n",
            d.display()
        ),
    );
    let prefix = "cspine/testsite/ct1/";
    let sub = Subscriber::start_with(
        port,
        &format!("{prefix}result"),
        SubOptions {
            ca: Some(&d.join("ca.crt")),
            cert: Some((&d.join("dashboard.crt"), &d.join("dashboard.key"))),
            ..SubOptions::default()
        },
    );
    let mut config = config(d, Some(format!("mqtts://127.0.0.1:{port}")));
    config.ca_file = Some(d.join("ca.crt"));
    config.client_cert_file = Some(d.join("device.crt"));
    config.client_key_file = Some(d.join("device.key"));
    let child = ChildAlerts::start(d, &config, &["mtls-1"]);
    child.wait_stdout("COMMITTED mtls-1");
    child.wait("the result over mutual TLS", || !sub.messages().is_empty());
    assert_eq!(json(&sub.messages()[0].payload)["id"], "mtls-1");
}

#[test]
fn tls_with_password_wrong_password_is_logged_and_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d, &[]);
    require("mosquitto_passwd");
    let passwd = d.join("passwd");
    let status = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["cspine", "right-secret"])
        .status()
        .expect("run mosquitto_passwd");
    assert!(status.success());
    let status = Command::new("mosquitto_passwd")
        .args(["-b"])
        .arg(&passwd)
        .args(["dashboard", "dash-secret"])
        .status()
        .unwrap();
    assert!(status.success());

    let port = free_port();
    let _broker = Mosquitto::start(
        d,
        port,
        &format!(
            "cafile {0}/ca.crt\ncertfile {0}/server.crt\nkeyfile {0}/server.key\n\
             password_file {1}\nallow_anonymous false\n",
            d.display(),
            passwd.display()
        ),
    );
    let prefix = "cspine/testsite/ct1/";
    let sub = Subscriber::start_with(
        port,
        &format!("{prefix}result"),
        SubOptions {
            ca: Some(&d.join("ca.crt")),
            login: Some(("dashboard", "dash-secret")),
            ..SubOptions::default()
        },
    );

    let mut config = config(d, Some(format!("mqtts://127.0.0.1:{port}")));
    config.ca_file = Some(d.join("ca.crt"));
    config.username = Some("cspine".into());
    std::fs::write(d.join("password"), "wrong-secret\n").unwrap();
    config.password_file = Some(d.join("password"));

    let mut wrong = ChildAlerts::start(d, &config, &["tls-1"]);
    wrong.wait_stdout("COMMITTED tls-1");
    wrong.wait_stderr_contains("CONNACK refused");
    let log = wrong.stderr.lock().unwrap().join("\n");
    assert!(
        log.contains("bad username or password") || log.contains("not authorized"),
        "the log must say why: {log}"
    );
    wrong.kill_9();
    assert!(sub.messages().is_empty());
    assert_eq!(
        entries_on_disk(&config.outbox_dir),
        1,
        "the result waits in the outbox"
    );

    // Fixed password: the waiting result is delivered.
    std::fs::write(d.join("password"), "right-secret\n").unwrap();
    let _right = ChildAlerts::start(d, &config, &[]);
    sub.wait_for("the result over TLS", |m| !m.is_empty());
    let v = json(&sub.messages()[0].payload);
    assert_eq!(v["id"], "tls-1");
    validate_against_schema(d, &sub.messages()[0].payload);
    wait_until("the outbox to empty", TIMEOUT, || {
        entries_on_disk(&config.outbox_dir) == 0
    });
}

#[test]
fn embedded_broker_when_no_url_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut config = config(dir.path(), None);
    config.embedded_broker_port = port;
    let alerts = InProcess::start(config.clone());
    let prefix = "cspine/testsite/ct1/";
    let sub = Subscriber::start(port, &format!("{prefix}result"));
    alerts.commit(message("embedded-1", Status::Negative, None));
    sub.wait_for("the result via the embedded broker", |m| !m.is_empty());
    assert_eq!(json(&sub.messages()[0].payload)["id"], "embedded-1");
    wait_until("the outbox to empty", TIMEOUT, || {
        entries_on_disk(&config.outbox_dir) == 0
    });
    alerts.finish();
}

#[test]
fn mqtt5_content_types_expiry_and_refused_publish_stays_in_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let prefix = "cspine/testsite/ct1/";
    // The ACL lets this device publish everything but `alert`: the broker refuses that
    // publish with PUBACK reason "not authorized", which only MQTT 5 can report.
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        format!(
            "topic read #\n\
             topic write {prefix}result\ntopic write {prefix}status\ntopic write {prefix}keyimage/#\n"
        ),
    )
    .unwrap();
    let _broker = Mosquitto::start(dir.path(), port, &format!("acl_file {}\n", acl.display()));
    let sub = Subscriber::start_with(
        port,
        &format!("{prefix}#"),
        SubOptions {
            v5: true,
            ..SubOptions::default()
        },
    );
    let mut config = config(dir.path(), Some(format!("mqtt://127.0.0.1:{port}")));
    config.protocol = cspine_triage::alert::MqttProtocol::V5;
    config.message_expiry_secs = Some(3600);
    let mut child = ChildAlerts::start(dir.path(), &config, &["v5-1"]);
    child.wait_stdout("COMMITTED v5-1");
    sub.wait_for("result and key image over MQTT 5", |m| {
        m.iter().any(|x| x.topic == format!("{prefix}result"))
            && m.iter()
                .any(|x| x.topic == format!("{prefix}keyimage/v5-1"))
    });
    let result = &sub.on(&format!("{prefix}result"))[0];
    assert_eq!(result.content_type.as_deref(), Some("application/json"));
    let expiry = result.expiry.expect("message expiry set");
    assert!(expiry > 3500 && expiry <= 3600, "expiry {expiry}");
    validate_against_schema(dir.path(), &result.payload);
    let key = &sub.on(&format!("{prefix}keyimage/v5-1"))[0];
    assert_eq!(key.content_type.as_deref(), Some("image/png"));
    let status = &sub.on(&format!("{prefix}status"))[0];
    assert_eq!(status.content_type.as_deref(), Some("application/json"));
    assert_eq!(status.expiry, None, "the retained status never expires");

    // The refused `alert` publish: logged, and the result is not counted as delivered.
    child.wait_stderr_contains("the broker refused a publish of outbox entry 1");
    assert!(sub.on(&format!("{prefix}alert")).is_empty());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        entries_on_disk(&config.outbox_dir),
        1,
        "kept for a later retry"
    );
    child.kill_9();
}

#[test]
fn mqtt5_more_in_flight_than_the_broker_receive_maximum() {
    // mosquitto announces receive maximum 20: rumqttc then reuses packet ids modulo 20,
    // while the outbox keeps up to 32 publishes in flight.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut broker = Mosquitto::start(dir.path(), port, "max_inflight_messages 20\n");
    let prefix = "cspine/testsite/ct1/";
    let sub = Subscriber::start_with(
        port,
        &format!("{prefix}result"),
        SubOptions {
            client_id: "many-subscriber",
            persistent: true,
            ..SubOptions::default()
        },
    );
    let mut config = config(dir.path(), Some(format!("mqtt://127.0.0.1:{port}")));
    config.protocol = cspine_triage::alert::MqttProtocol::V5;
    // Commit all while the broker is down, so the reconnect replays 40 entries at once.
    broker.stop();
    let alerts = InProcess::start(config.clone());
    let ids: Vec<String> = (0..40).map(|i| format!("many-{i:02}")).collect();
    for id in &ids {
        alerts.commit(message(id, Status::Negative, Some(&[7u8; 4096])));
    }
    broker.restart();
    sub.wait_for("all 40 results", |m| {
        let ids: std::collections::HashSet<_> =
            m.iter().map(|x| json(&x.payload)["id"].clone()).collect();
        ids.len() == 40
    });
    assert_eq!(result_ids_in_order(&sub.messages()), ids);
    wait_until("the outbox to empty", TIMEOUT, || {
        entries_on_disk(&config.outbox_dir) == 0
    });
    alerts.finish();
}

#[test]
fn full_outbox_holds_back_upstream_until_the_broker_acknowledges() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut broker = Mosquitto::start(dir.path(), port, "");
    let prefix = "cspine/testsite/ct1/";
    let sub = Subscriber::start_with(
        port,
        &format!("{prefix}result"),
        SubOptions {
            client_id: "full-subscriber",
            persistent: true,
            ..SubOptions::default()
        },
    );
    broker.stop();
    let mut config = config(dir.path(), Some(format!("mqtt://127.0.0.1:{port}")));
    config.outbox_max_entries = 2;
    let alerts = InProcess::start(config.clone());
    alerts.commit(message("full-1", Status::Negative, None));
    alerts.commit(message("full-2", Status::Negative, None));
    // The third is accepted by the channel but not committed: the outbox is full.
    let tx = alerts.tx.as_ref().unwrap();
    tx.blocking_send(message("full-3", Status::Positive, None))
        .unwrap();
    assert!(
        alerts
            .committed
            .recv_timeout(Duration::from_millis(1500))
            .is_err(),
        "a full outbox must not take more results"
    );
    assert_eq!(entries_on_disk(&config.outbox_dir), 2);

    broker.restart();
    let third = alerts
        .committed
        .recv_timeout(TIMEOUT)
        .expect("committed once there is room");
    assert_eq!(third.id, "full-3");
    sub.wait_for("all three results", |m| {
        let ids: std::collections::HashSet<_> =
            m.iter().map(|x| json(&x.payload)["id"].clone()).collect();
        ids.len() == 3
    });
    assert_eq!(
        result_ids_in_order(&sub.messages()),
        ["full-1", "full-2", "full-3"]
    );
    alerts.finish();
}

// ---------------------------------------------------------------- identifier publication

/// Publishes one positive result (with key slices) through mosquitto with the given
/// `[alert.identifiers]`, checks it against `docs/alert.schema.json` and returns the
/// received document, the result as sent, and the site key file.
fn publish_with_identifiers(
    identifiers: cspine_triage::alert::IdentifierConfig,
) -> (serde_json::Value, TriageResult, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = Mosquitto::start(dir.path(), port, "");
    let prefix = "cspine/testsite/ct1/";
    let sub = Subscriber::start(port, &format!("{prefix}result"));
    let mut config = config(dir.path(), Some(format!("mqtt://127.0.0.1:{port}")));
    config.identifiers = identifiers;
    let alerts = InProcess::start(config);
    let sent = message("ident-1", Status::Positive, None);
    let result = sent.result.clone();
    let committed = alerts.commit(sent);
    // What the spool and the assembler get back is never hashed or omitted.
    assert_eq!(committed.study_instance_uid, result.study_instance_uid);
    assert_eq!(committed.series_instance_uid, result.series_instance_uid);
    sub.wait_for("the result", |m| !m.is_empty());
    let payload = sub.messages()[0].payload.clone();
    validate_against_schema(dir.path(), &payload);
    alerts.finish();
    (json(&payload), result, dir)
}

fn identifiers_all(
    mode: cspine_triage::alert::Publication,
) -> cspine_triage::alert::IdentifierConfig {
    cspine_triage::alert::IdentifierConfig {
        accession_number: mode,
        study_instance_uid: mode,
        series_instance_uid: mode,
        sop_instance_uid: mode,
    }
}

#[test]
fn identifiers_clear_are_published_as_received() {
    let (doc, sent, _dir) =
        publish_with_identifiers(identifiers_all(cspine_triage::alert::Publication::Clear));
    assert_eq!(doc["accession_number"], sent.accession_number);
    assert_eq!(doc["study_instance_uid"], sent.study_instance_uid);
    assert_eq!(doc["series_instance_uid"], sent.series_instance_uid);
    let sop = &sent.key_slice.as_ref().unwrap().sop_instance_uid;
    assert_eq!(doc["key_slice"]["sop_instance_uid"], *sop);
    assert_eq!(
        doc["vertebrae"]["C2"]["key_slice"]["sop_instance_uid"],
        *sop
    );
}

#[test]
fn identifiers_hmac_are_published_as_keyed_hashes() {
    let (doc, sent, dir) =
        publish_with_identifiers(identifiers_all(cspine_triage::alert::Publication::Hmac));
    // The site key generated next to the outbox, as for patient_ref.
    let key_file = dir.path().join("patient-ref.key");
    let key = cspine_triage::alert::HmacKey::load(Some(&key_file), &key_file).unwrap();
    let sop = &sent.key_slice.as_ref().unwrap().sop_instance_uid;
    for (field, clear) in [
        (&doc["accession_number"], &sent.accession_number),
        (&doc["study_instance_uid"], &sent.study_instance_uid),
        (&doc["series_instance_uid"], &sent.series_instance_uid),
        (&doc["key_slice"]["sop_instance_uid"], sop),
        (
            &doc["vertebrae"]["C2"]["key_slice"]["sop_instance_uid"],
            sop,
        ),
    ] {
        assert_eq!(*field, key.hex_digest(clear), "{clear}");
        assert_ne!(field, clear);
    }
    // patient_ref uses the same key and form.
    assert_eq!(doc["patient_ref"], key.hex_digest("PAT-0042"));
}

#[test]
fn identifiers_omit_are_left_out() {
    let (doc, _sent, _dir) =
        publish_with_identifiers(identifiers_all(cspine_triage::alert::Publication::Omit));
    for field in [
        "accession_number",
        "study_instance_uid",
        "series_instance_uid",
    ] {
        assert!(doc.get(field).is_none(), "{field} is published: {doc:#}");
    }
    assert_eq!(doc["key_slice"], serde_json::json!({ "z_mm": -78.25 }));
    assert_eq!(
        doc["vertebrae"]["C2"]["key_slice"],
        serde_json::json!({ "z_mm": -78.25 })
    );
    assert_eq!(doc["id"], "ident-1");
    assert_eq!(doc["instances"], 120);
}
