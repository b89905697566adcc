//! Appliance packaging checks: the systemd unit and its drop-ins, sysusers/tmpfiles,
//! the default config, and the Yocto layer (crate list, oelint-adv).
//!
//! Needs: systemd (systemd-analyze, systemd-sysusers, systemd-tmpfiles), python3 >= 3.11,
//! oelint-adv (`pip install oelint-adv`). A missing tool fails the test with the install
//! command, never skips it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_cspine-triage");
const UNIT: &str = "cspine-triage.service";
const DROP_INS: [&str; 2] = ["cuda.conf", "port104.conf"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a tool, failing the test with `install` when it is missing.
fn run(program: &str, args: &[&str], install: &str) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program} ({err}): install it with `{install}`"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A throw-away file-system root holding what `systemd-analyze --root` needs: the host's
/// stock units (targets the unit refers to), our binary at the unit's ExecStart path,
/// the unit and the given drop-ins.
fn unit_root(drop_ins: &[&str]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let stock = Path::new("/usr/lib/systemd/system");
    assert!(
        stock.is_dir(),
        "{} missing: apt-get install systemd",
        stock.display()
    );
    copy_dir(stock, &r.join("usr/lib/systemd/system"));
    fs::create_dir_all(r.join("usr/bin")).unwrap();
    fs::copy(BIN, r.join("usr/bin/cspine-triage")).unwrap();
    let units = r.join("etc/systemd/system");
    fs::create_dir_all(units.join(format!("{UNIT}.d"))).unwrap();
    fs::copy(repo().join("systemd").join(UNIT), units.join(UNIT)).unwrap();
    for drop_in in drop_ins {
        fs::copy(
            repo().join("systemd").join(drop_in),
            units.join(format!("{UNIT}.d")).join(drop_in),
        )
        .unwrap();
    }
    root
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn unit_and_drop_ins_pass_systemd_analyze_verify() {
    let root = unit_root(&DROP_INS);
    let root_arg = format!("--root={}", root.path().display());
    let out = run(
        "systemd-analyze",
        &["verify", "--man=no", "--generators=no", &root_arg, UNIT],
        "apt-get install systemd",
    );
    // verify exits 0 on unknown keys and bad values (it only warns): any output fails.
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-analyze verify of {UNIT} with {DROP_INS:?}: {}\n{}",
        out.status,
        text(&out)
    );
}

/// Overall exposure from `systemd-analyze security --offline=yes` (0 = locked down, 10 = none).
fn exposure(drop_ins: &[&str]) -> f64 {
    let root = unit_root(drop_ins);
    let root_arg = format!("--root={}", root.path().display());
    let out = run(
        "systemd-analyze",
        &["security", "--offline=yes", &root_arg, UNIT],
        "apt-get install systemd",
    );
    let all = text(&out);
    let line = all
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{all}"));
    // "→ Overall exposure level for cspine-triage.service: 1.2 OK 🙂"
    line.split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse exposure from {line:?}"))
}

#[test]
fn security_exposure_is_at_most_2() {
    for drop_ins in [&[][..], &["port104.conf"], &["cuda.conf"]] {
        let level = exposure(drop_ins);
        eprintln!("exposure with drop-ins {drop_ins:?}: {level}");
        assert!(
            level <= 2.0,
            "systemd-analyze security exposure {level} > 2.0 with drop-ins {drop_ins:?}"
        );
    }
}

#[test]
fn sysusers_and_tmpfiles_create_the_service_directories() {
    use std::os::unix::fs::MetadataExt;
    let root = tempfile::tempdir().unwrap();
    assert_eq!(
        fs::metadata(root.path()).unwrap().uid(),
        0,
        "this test creates files owned by the service user in a temp root: run it as root"
    );
    let root_arg = format!("--root={}", root.path().display());
    fs::create_dir_all(root.path().join("etc")).unwrap();
    // Absolute paths: relative ones are resolved inside --root.
    let sysusers = repo().join("systemd/cspine-triage.sysusers");
    let tmpfiles = repo().join("systemd/cspine-triage.tmpfiles");
    let out = run(
        "systemd-sysusers",
        &[&root_arg, sysusers.to_str().unwrap()],
        "apt-get install systemd",
    );
    assert!(out.status.success(), "systemd-sysusers: {}", text(&out));
    let passwd = fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("cspine-triage:"))
        .unwrap_or_else(|| panic!("no cspine-triage user in {passwd}"));
    let uid: u32 = entry.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid != 0 && uid < 1000, "not a system user: {entry}");
    assert!(
        entry.ends_with(":/var/lib/cspine-triage:/usr/sbin/nologin"),
        "{entry}"
    );

    let out = run(
        "systemd-tmpfiles",
        &["--create", &root_arg, tmpfiles.to_str().unwrap()],
        "apt-get install systemd",
    );
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-tmpfiles: {}",
        text(&out)
    );
    for dir in [
        "var/lib/cspine-triage/spool",
        "var/lib/cspine-triage/outbox",
        "var/cache/cspine-triage",
        "var/log/cspine-triage",
    ] {
        let meta = fs::metadata(root.path().join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert!(meta.is_dir());
        assert_eq!(meta.uid(), uid, "{dir} owner");
        assert_eq!(meta.mode() & 0o777, 0o750, "{dir} mode");
    }
}

#[test]
fn default_config_passes_check_config_and_fits_the_unit() {
    let out = Command::new(BIN)
        .args(["check-config", "systemd/config.toml"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "check-config: {}", text(&out));

    let config = cspine_triage::config::Config::load(&repo().join("systemd/config.toml")).unwrap();
    // ProtectSystem=strict: only StateDirectory (and cache/logs) is writable.
    for (key, dir) in [
        ("dicom.spool_dir", &config.dicom.spool_dir),
        ("alert.outbox_dir", &config.alert.outbox_dir),
    ] {
        assert!(
            dir.starts_with("/var/lib/cspine-triage"),
            "{key} = {} is outside the unit's StateDirectory",
            dir.display()
        );
    }
    // Where the Yocto recipe installs the model.
    assert_eq!(
        config.inference.model,
        Path::new("/usr/share/cspine-triage/model/model.json")
    );
    // Ports below 1024 need port104.conf; the default must work without it.
    assert!(config.dicom.port >= 1024);
    let unit = fs::read_to_string(repo().join("systemd").join(UNIT)).unwrap();
    assert!(unit.contains(
        "ExecStart=/usr/bin/cspine-triage serve --config /etc/cspine-triage/config.toml"
    ));
}

#[test]
fn yocto_crates_inc_matches_cargo_lock() {
    let committed = repo()
        .join("yocto/meta-cspine-triage/recipes-medical/cspine-triage/cspine-triage-crates.inc");
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("crates.inc");
    let out = run(
        "python3",
        &[
            "scripts/gen-yocto-crates.py",
            "--out",
            fresh.to_str().unwrap(),
        ],
        "apt-get install python3 (3.11 or newer, for tomllib)",
    );
    assert!(out.status.success(), "gen-yocto-crates.py: {}", text(&out));
    let fresh = fs::read_to_string(&fresh).unwrap();
    let committed = fs::read_to_string(&committed).unwrap();
    assert!(
        fresh == committed,
        "{} is stale: run `python3 scripts/gen-yocto-crates.py` and commit the result",
        "cspine-triage-crates.inc"
    );
    // Every locked crates.io package is in it, with its checksum.
    let lock = fs::read_to_string(repo().join("Cargo.lock")).unwrap();
    let lock: toml::Value = toml::from_str(&lock).unwrap();
    let packages = lock["package"].as_array().unwrap();
    let mut registry = 0;
    for p in packages.iter().filter(|p| p.get("source").is_some()) {
        let (name, version) = (p["name"].as_str().unwrap(), p["version"].as_str().unwrap());
        let checksum = p["checksum"].as_str().unwrap();
        assert!(committed.contains(&format!("crate://crates.io/{name}/{version};")));
        assert!(committed.contains(&format!(
            "SRC_URI[{name}-{version}.sha256sum] = \"{checksum}\""
        )));
        registry += 1;
    }
    assert_eq!(committed.matches("crate://").count(), registry);
}

#[test]
fn oelint_adv_reports_no_errors_on_the_layer() {
    let out = run(
        "oelint-adv",
        &[
            "--quiet",
            "--release",
            "scarthgap",
            "yocto/meta-cspine-triage/recipes-medical/cspine-triage/cspine-triage_0.1.0.bb",
            "yocto/meta-cspine-triage/conf/layer.conf",
        ],
        "pip install oelint-adv",
    );
    let all = text(&out);
    let errors: Vec<&str> = all.lines().filter(|l| l.contains(":error:")).collect();
    // Exit status 1 means "findings", warnings included (an unreachable placeholder
    // HOMEPAGE, cargo_bin variables it does not know); anything else is a crash.
    assert!(
        matches!(out.status.code(), Some(0 | 1)) && errors.is_empty(),
        "oelint-adv errors ({}):\n{}",
        out.status,
        if errors.is_empty() {
            all.clone()
        } else {
            errors.join("\n")
        }
    );
}

// ---------------------------------------------------------------------------------------
// sd_notify protocol against the real daemon: NOTIFY_SOCKET is a real unix datagram
// socket owned by the test, as systemd's would be.

mod common;

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        // sun_path is limited to 108 bytes: keep it short.
        let dir = tempfile::Builder::new()
            .prefix("ntf")
            .tempdir_in("/tmp")
            .unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket {
            sock,
            path,
            _dir: dir,
        }
    }

    /// Next datagram (one `KEY=VALUE` per line) before `deadline`.
    fn recv_before(&self, deadline: Instant) -> Option<String> {
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    }

    /// All datagrams until `deadline`, with arrival times.
    fn collect_until(&self, deadline: Instant) -> Vec<(Instant, String)> {
        let mut got = Vec::new();
        while let Some(msg) = self.recv_before(deadline) {
            got.push((Instant::now(), msg));
        }
        got
    }
}

/// A `serve` config on loopback ports with temp spool/outbox and a real mosquitto, with
/// short stall limits so a stuck stage shows within the test.
fn serve_config(dir: &Path, dicom_port: u16, mqtt_url: &str, inference_stall: f64) -> PathBuf {
    common::serve_config(
        dir,
        dicom_port,
        mqtt_url,
        &format!(
            "\n[service.stall_secs]\ndicom = 2.0\nseries = 2.0\ninference = {inference_stall}\nalert = 2.0\n"
        ),
    )
}

fn spawn_serve(
    config: &Path,
    notify: &NotifySocket,
    watchdog_usec: u64,
    stall: &str,
) -> common::Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config"])
        .arg(config)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", watchdog_usec.to_string())
        .env_remove("WATCHDOG_PID")
        .env("RUST_LOG", "info");
    if stall.is_empty() {
        cmd.env_remove("CSPINE_FAULT_STALL");
    } else {
        cmd.env("CSPINE_FAULT_STALL", stall);
    }
    common::Proc::spawn(cmd)
}

/// Waits for READY=1 and returns when it arrived, checking that the DICOM port already
/// accepts connections at that moment.
fn wait_ready(notify: &NotifySocket, proc: &common::Proc, port: u16) -> Instant {
    // Loading and optimising the model in a debug build on a busy CI box can be slow.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let msg = notify
            .recv_before(deadline)
            .unwrap_or_else(|| panic!("no READY=1 within 300 s; daemon log:\n{}", proc.log()));
        if msg.lines().any(|l| l == "READY=1") {
            let at = Instant::now();
            let connected = TcpStream::connect(("127.0.0.1", port));
            assert!(
                connected.is_ok(),
                "READY=1 arrived but 127.0.0.1:{port} refuses connections: {:?}",
                connected.err()
            );
            return at;
        }
        // Before READY: nothing may claim the service is up.
        assert!(!msg.contains("READY=1"), "{msg}");
    }
}

#[test]
fn ready_after_the_port_accepts_then_watchdog_pings_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::Mosquitto::start();
    let port = common::free_port();
    let config = serve_config(dir.path(), port, &broker.url(), 5.0);
    let notify = NotifySocket::bind();
    let mut daemon = spawn_serve(&config, &notify, 1_000_000, "");

    wait_ready(&notify, &daemon, port);
    // Healthy and idle: pings every WatchdogSec/2 = 0.5 s, fed by idle heartbeats.
    let got = notify.collect_until(Instant::now() + Duration::from_secs(3));
    let pings = got
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!(
        pings >= 4,
        "expected >= 4 WATCHDOG=1 in 3 s with WATCHDOG_USEC=1s, got {pings}: {got:?}\n{}",
        daemon.log()
    );
    assert!(
        got.iter()
            .any(|(_, m)| m.contains("STATUS=") && m.contains("queued")),
        "no STATUS= line: {got:?}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let got = notify.collect_until(Instant::now() + Duration::from_secs(5));
    assert!(
        got.iter()
            .any(|(_, m)| m.lines().any(|l| l == "STOPPING=1")),
        "no STOPPING=1 after SIGTERM: {got:?}\n{}",
        daemon.log()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "daemon did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        daemon.log()
    );
}

#[test]
fn watchdog_pings_stop_while_a_stage_is_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::Mosquitto::start();
    let port = common::free_port();
    // Inference may go 1 s without a heartbeat; the fault hook hangs it for good.
    let config = serve_config(dir.path(), port, &broker.url(), 1.0);
    let notify = NotifySocket::bind();
    let daemon = spawn_serve(&config, &notify, 400_000, "inference");

    let ready = wait_ready(&notify, &daemon, port);
    let got = notify.collect_until(ready + Duration::from_secs(5));
    // Give the stage its 1 s allowance plus one ping period after READY (it may have been
    // stuck before READY already); after that, not a single ping.
    let late_pings: Vec<_> = got
        .iter()
        .filter(|(t, m)| {
            *t > ready + Duration::from_millis(1600) && m.lines().any(|l| l == "WATCHDOG=1")
        })
        .collect();
    assert!(
        late_pings.is_empty(),
        "WATCHDOG=1 kept coming while inference was stuck: {late_pings:?}\n{}",
        daemon.log()
    );
    assert!(
        got.iter()
            .any(|(_, m)| m.contains("STATUS=") && m.contains("STUCK: inference")),
        "STATUS= does not name the stuck stage: {got:?}"
    );
    assert!(
        daemon.log().contains("pipeline stage inference silent"),
        "no log line about the stuck stage:\n{}",
        daemon.log()
    );
    // The DICOM stage is unaffected: the port still answers.
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
}
