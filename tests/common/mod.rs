//! Helpers shared by the integration tests: free ports, real peers (mosquitto, DCMTK,
//! python3) and the daemon binary as a child process that is killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cspine-triage");

/// Repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral loopback port")
        .local_addr()
        .unwrap()
        .port()
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

/// A child process killed (SIGKILL) when dropped, with its stderr captured for assertions.
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn child process");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Proc { child, log }
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

/// A real mosquitto broker on a free loopback port, anonymous access.
pub struct Mosquitto {
    pub port: u16,
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Mosquitto {
        let bin = require_tool("mosquitto");
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf);
        let proc = Proc::spawn(cmd);
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "mosquitto did not start on port {port}: {}",
            proc.log()
        );
        Mosquitto {
            port,
            proc,
            _dir: dir,
        }
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

/// A `serve` config for tests: loopback DICOM port, temp spool and outbox under `dir`, the
/// repository's model, the given broker, a 1 s quiet period, site "testsite" and device
/// "box1" (topics under `cspine/testsite/box1/`). `extra` is appended (further tables).
pub fn serve_config(dir: &Path, dicom_port: u16, mqtt_url: &str, extra: &str) -> PathBuf {
    let model = repo_root().join("models/model.json");
    assert!(model.exists(), "{} missing", model.display());
    let config = format!(
        r#"
[dicom]
ae_title = "CSPINE"
bind = "127.0.0.1"
port = {dicom_port}
spool_dir = "{spool}"

[series]
quiet_period_secs = 1.0

[inference]
model = "{model}"

[alert]
mqtt_url = "{mqtt_url}"
site = "testsite"
device = "box1"
outbox_dir = "{outbox}"
{extra}
"#,
        spool = dir.join("spool").display(),
        outbox = dir.join("outbox").display(),
        model = model.display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config).unwrap();
    path
}
