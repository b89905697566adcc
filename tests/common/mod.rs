//! Helpers shared by the integration tests: free ports, real peers (mosquitto, DCMTK,
//! python3) and the daemon binary as a child process that is killed on drop.
#![allow(dead_code)]

pub mod events;
pub mod orthanc;
pub mod pki;

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cspine-triage");

/// How long a subscriber waits for its SUBACK, and [`Subscriber::wait_for`]'s default.
pub const SUB_TIMEOUT: Duration = Duration::from_secs(30);

/// Repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A loopback port that was free a moment ago, never handed out twice by this process.
///
/// Taken below the kernel's ephemeral range (32768 and up), from a window that depends on
/// the process id: a port the kernel chose (`bind(0)`, or the source port of any client
/// connection) can be handed to the next caller the moment it is closed, so two daemons,
/// brokers or PACS of tests running in parallel could be given the same port, and a test
/// would then talk to another test's peer.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(613);
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + base.wrapping_add(n) % COUNT) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT);
}

/// Fails the test with a clear message when a peer tool is missing (CI installs them all).
pub fn require_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    if let Ok(out) = Command::new("which").arg(name).output() {
        if out.status.success() {
            return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        }
    }
    panic!("required test tool `{name}` is not installed: run `bash .ci/run` once to install the test dependencies");
}

/// DCMTK's tool, not a same-named pyenv shim or pynetdicom app earlier on PATH
/// (`$DCMTK_BIN`, then /usr/bin, then PATH: the first directory whose `echoscu` is DCMTK's).
pub fn dcmtk(tool: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let mut dirs: Vec<PathBuf> = std::env::var_os("DCMTK_BIN")
            .map(PathBuf::from)
            .into_iter()
            .collect();
        dirs.push("/usr/bin".into());
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        dirs.into_iter()
            .find(|d| {
                Command::new(d.join("echoscu"))
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .to_lowercase()
                            .contains("dcmtk")
                    })
            })
            .expect("DCMTK not found: install it (apt-get install dcmtk) or set DCMTK_BIN")
    });
    dir.join(tool)
}

/// Waits until something accepts TCP connections on 127.0.0.1:port.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Polls `done` every 50 ms; fails the test with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (SIGKILL) when dropped, with its stderr captured for assertions.
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn child process");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Proc {
            child,
            log,
            reader: Some(reader),
        }
    }

    /// Waits for the process to exit and for its stderr to be read to the end, so that
    /// [`Proc::log`] is complete. `None` (the process is killed) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for child process") {
                break Some(status);
            }
            if Instant::now() >= deadline {
                self.kill9();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        status
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the captured stderr contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A real mosquitto broker on a free loopback port, anonymous access. Its persistence
/// database lives in its temp dir, so [`Mosquitto::stop`] then [`Mosquitto::restart`] keeps
/// persistent sessions and the QoS 1 messages queued for them.
pub struct Mosquitto {
    pub port: u16,
    pub proc: Proc,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        // Started as root, mosquitto switches to user "mosquitto", which cannot write the
        // test's private temp dir: stay who we are.
        let me = Command::new("id").arg("-un").output().expect("run id -un");
        let me = String::from_utf8_lossy(&me.stdout).trim().to_owned();
        std::fs::write(
            &conf,
            format!(
                "user {me}\nlistener {port} 127.0.0.1\nallow_anonymous true\n\
                 persistence true\npersistence_location {}/\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let proc = Self::spawn(&conf, port);
        Mosquitto {
            port,
            proc,
            conf,
            _dir: dir,
        }
    }

    fn spawn(conf: &Path, port: u16) -> Proc {
        let mut cmd = Command::new(require_tool("mosquitto"));
        cmd.arg("-c").arg(conf);
        let proc = Proc::spawn(cmd);
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "mosquitto did not start on port {port}: {}",
            proc.log()
        );
        proc
    }

    /// SIGTERM (mosquitto saves its persistence database) and wait for the exit.
    pub fn stop(&mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.proc.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM mosquitto");
        assert!(
            self.proc.wait_exit(Duration::from_secs(10)).is_some(),
            "mosquitto did not stop on SIGTERM"
        );
    }

    /// Starts it again on the same port from its saved database.
    pub fn restart(&mut self) {
        assert!(
            self.proc.child.try_wait().unwrap().is_some(),
            "mosquitto is still running"
        );
        self.proc = Self::spawn(&self.conf, self.port);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// Runs `cspine-triage synth` and returns the study directories it wrote
/// (`OUT/train_images/<StudyInstanceUID>`).
pub fn synth(out: &Path, seed: u64, fracture: &str, extra: &[&str]) -> Vec<PathBuf> {
    let status = Command::new(BIN)
        .arg("synth")
        .arg(out)
        .args([
            "--count",
            "1",
            "--seed",
            &seed.to_string(),
            "--fracture",
            fracture,
        ])
        .args(extra)
        .status()
        .expect("run cspine-triage synth");
    assert!(status.success(), "cspine-triage synth failed");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out.join("train_images"))
        .expect("synth wrote train_images/")
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    dirs
}

/// A synthetic study's files in Instance Number order (synth numbers them along z), as a
/// scanner sends them.
pub fn files_in_z_order(study: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(study)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort_by_key(|p| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    });
    files
}

/// A `serve` config for tests: loopback DICOM port, temp spool and outbox under `dir`, the
/// repository's model, the given broker, a 1 s quiet period, site "testsite" and device
/// "box1" (topics under `cspine/testsite/box1/`). `extra` is appended (further tables).
pub fn serve_config(dir: &Path, dicom_port: u16, mqtt_url: &str, extra: &str) -> PathBuf {
    serve_config_with(dir, dicom_port, mqtt_url, "", extra)
}

/// [`serve_config`] with extra keys for the `[dicom]` table too (e.g.
/// `min_free_space_mb = 0`); `alert_extra` goes into `[alert]`, as `extra` does there.
pub fn serve_config_with(
    dir: &Path,
    dicom_port: u16,
    mqtt_url: &str,
    dicom_extra: &str,
    alert_extra: &str,
) -> PathBuf {
    serve_config_full(dir, dicom_port, mqtt_url, dicom_extra, "", alert_extra)
}

/// [`serve_config_with`] with extra keys for the `[series]` table too (e.g.
/// `completed_retention_secs = 2`).
pub fn serve_config_full(
    dir: &Path,
    dicom_port: u16,
    mqtt_url: &str,
    dicom_extra: &str,
    series_extra: &str,
    alert_extra: &str,
) -> PathBuf {
    let model = repo_root().join("models/model.json");
    assert!(model.exists(), "{} missing", model.display());
    // No free-space floor unless the test sets one: with the default (1 GB, and analysed
    // studies released early below twice that), how full the machine's disk happens to be
    // would decide what a test sees.
    let floor = if dicom_extra.contains("min_free_space_mb") {
        ""
    } else {
        "min_free_space_mb = 0"
    };
    let config = format!(
        r#"
[dicom]
{floor}
ae_title = "CSPINE"
bind = "127.0.0.1"
port = {dicom_port}
spool_dir = "{spool}"
{dicom_extra}

[series]
quiet_period_secs = 1.0
{series_extra}

[inference]
model = "{model}"

[alert]
mqtt_url = "{mqtt_url}"
site = "testsite"
device = "box1"
outbox_dir = "{outbox}"
{alert_extra}
"#,
        spool = dir.join("spool").display(),
        outbox = dir.join("outbox").display(),
        model = model.display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// `cspine-triage serve --config CONFIG ARGS...`
pub fn serve_command(config: &Path, args: &[&str]) -> Command {
    let mut serve = Command::new(BIN);
    serve.arg("serve").arg("--config").arg(config).args(args);
    serve
}

/// Starts `cspine-triage serve --config CONFIG ARGS...` and waits (60 s at most) until its
/// DICOM port accepts connections, which it opens last, once model, outbox and spool are
/// ready.
pub fn spawn_serve(config: &Path, dicom_port: u16, args: &[&str]) -> Proc {
    let daemon = Proc::spawn(serve_command(config, args));
    assert!(
        wait_for_port(dicom_port, Duration::from_secs(60)),
        "daemon did not open its DICOM port: {}",
        daemon.log()
    );
    daemon
}

#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub retain: bool,
    pub payload: Vec<u8>,
    /// MQTT 5 subscribers only.
    pub content_type: Option<String>,
    pub expiry: Option<u64>,
}

/// A paho-mqtt subscriber process (`tests/python/alert_sub.py`) collecting every message it
/// gets, re-deliveries included.
pub struct Subscriber {
    child: Child,
    messages: Arc<Mutex<Vec<Message>>>,
}

#[derive(Default)]
pub struct SubOptions<'a> {
    pub v5: bool,
    pub client_id: &'a str,
    /// Clean session off: the broker queues QoS 1 messages while we are away.
    pub persistent: bool,
    pub ca: Option<&'a Path>,
    /// Client certificate and key.
    pub cert: Option<(&'a Path, &'a Path)>,
    pub login: Option<(&'a str, &'a str)>,
}

impl Subscriber {
    pub fn start(port: u16, topic: &str) -> Subscriber {
        Subscriber::start_with(port, topic, SubOptions::default())
    }

    pub fn start_with(port: u16, topic: &str, opts: SubOptions) -> Subscriber {
        require_tool("python3");
        let mut cmd = Command::new("python3");
        cmd.arg(repo_root().join("tests/python/alert_sub.py"))
            .args(["--port", &port.to_string(), "--topic", topic]);
        if !opts.client_id.is_empty() {
            cmd.args(["--client-id", opts.client_id]);
        }
        if opts.persistent {
            cmd.arg("--persistent");
        }
        if opts.v5 {
            cmd.arg("--v5");
        }
        if let Some(ca) = opts.ca {
            cmd.arg("--ca").arg(ca);
        }
        if let Some((cert, key)) = opts.cert {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
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
                            content_type: v["content_type"].as_str().map(str::to_owned),
                            expiry: v["expiry"].as_u64(),
                        }),
                        _ => eprintln!("subscriber: {line}"),
                    }
                }
            });
        }
        subscribed_rx
            .recv_timeout(SUB_TIMEOUT)
            .expect("subscriber did not get its SUBACK (is python3-paho-mqtt installed?)");
        Subscriber { child, messages }
    }

    pub fn messages(&self) -> Vec<Message> {
        self.messages.lock().unwrap().clone()
    }

    pub fn on(&self, topic: &str) -> Vec<Message> {
        self.messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    pub fn wait_for(&self, what: &str, pred: impl FnMut(&[Message]) -> bool) {
        self.wait_for_within(what, SUB_TIMEOUT, pred);
    }

    /// Like [`Subscriber::wait_for`] with a timeout of its own (whole-daemon tests).
    pub fn wait_for_within(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[Message]) -> bool,
    ) {
        wait_until(what, timeout, || pred(&self.messages()));
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
