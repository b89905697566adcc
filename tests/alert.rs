//! Alert delivery against a real broker: mosquitto (`/usr/sbin/mosquitto`) started by each
//! test on a free loopback port, subscribers in python paho-mqtt
//! (`tests/python/alert_sub.py`), schema checks with python jsonschema
//! (`tests/python/alert_validate.py`).
//!
//! The library API is driven in-process where that is enough. Where a process must die
//! (kill -9, Last Will) or its log must be read, this test binary re-runs itself as a child
//! running only the ignored test `child_alert_process`, configured through environment
//! variables: the real library code in a real separate process, no extra binary.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cspine_triage::alert::result::{
    KeySlice, ModelInfo, PatientResult, Status, Timings, VertebraResult, SCHEMA_V1,
};
use cspine_triage::alert::{
    AlertConfig, Alerts, Committed, ResultMessage, StatusInfo, TriageResult,
};
use time::OffsetDateTime;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\npersistence true\npersistence_location {}/\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n{auth}\
                 listener {port} 127.0.0.1\n{extra}\n",
                data.display()
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

#[derive(Debug, Clone)]
struct Message {
    topic: String,
    retain: bool,
    payload: Vec<u8>,
}

/// A paho-mqtt subscriber process collecting every message it gets.
struct Subscriber {
    child: Child,
    messages: Arc<Mutex<Vec<Message>>>,
}

struct SubOptions<'a> {
    client_id: &'a str,
    persistent: bool,
    ca: Option<&'a Path>,
    login: Option<(&'a str, &'a str)>,
}

impl Subscriber {
    fn start(port: u16, topic: &str) -> Subscriber {
        Subscriber::start_with(
            port,
            topic,
            SubOptions {
                client_id: "",
                persistent: false,
                ca: None,
                login: None,
            },
        )
    }

    fn start_with(port: u16, topic: &str, opts: SubOptions) -> Subscriber {
        require("python3");
        let mut cmd = Command::new("python3");
        cmd.arg(repo().join("tests/python/alert_sub.py")).args([
            "--port",
            &port.to_string(),
            "--topic",
            topic,
        ]);
        if !opts.client_id.is_empty() {
            cmd.args(["--client-id", opts.client_id]);
        }
        if opts.persistent {
            cmd.arg("--persistent");
        }
        if let Some(ca) = opts.ca {
            cmd.arg("--ca").arg(ca);
        }
        if let Some((user, pass)) = opts.login {
            cmd.args(["--username", user, "--password", pass]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("start tests/python/alert_sub.py");
        let stdout = child.stdout.take().unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
        {
            let messages = messages.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    match v["event"].as_str() {
                        Some("subscribed") => {
                            let _ = subscribed_tx.send(());
                        }
                        Some("message") => messages.lock().unwrap().push(Message {
                            topic: v["topic"].as_str().unwrap().to_owned(),
                            retain: v["retain"].as_bool().unwrap(),
                            payload: hex::decode(v["payload_hex"].as_str().unwrap()).unwrap(),
                        }),
                        _ => eprintln!("subscriber: {line}"),
                    }
                }
            });
        }
        subscribed_rx
            .recv_timeout(TIMEOUT)
            .expect("subscriber did not get its SUBACK (is python3-paho-mqtt installed?)");
        Subscriber { child, messages }
    }

    fn messages(&self) -> Vec<Message> {
        self.messages.lock().unwrap().clone()
    }

    fn on(&self, topic: &str) -> Vec<Message> {
        self.messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    fn wait_for(&self, what: &str, mut pred: impl FnMut(&[Message]) -> bool) {
        wait_until(what, TIMEOUT, || pred(&self.messages()));
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        accession_number: "ACC0001".into(),
        patient_ref: String::new(),
        vertebrae,
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
    }
}

fn message(id: &str, status: Status, png: Option<&[u8]>) -> ResultMessage {
    ResultMessage {
        result: full_result(id, status),
        patient_id: "PAT-0042".into(),
        key_image_png: png.map(<[u8]>::to_vec),
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
                    .run(StatusInfo::new(Some(model)), rx, Some(ctx_async))
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
        let run = tokio::spawn(alerts.run(StatusInfo::new(None), rx, Some(ctx)));
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
        wait_until(&format!("child to print {line:?}"), TIMEOUT, || {
            self.stdout.lock().unwrap().iter().any(|l| l == line)
        });
    }

    fn wait_stderr_contains(&self, needle: &str) {
        wait_until(&format!("child to log {needle:?}"), TIMEOUT, || {
            self.stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
        });
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
