//! DICOM TLS through the real binary and real peers: the SCP's TLS port with DCMTK
//! `echoscu`/`storescu` (`+tls`) and `cspine-triage echo`, mutual TLS refusing a client
//! certificate from another CA, `cspine-triage echo` against DCMTK `storescp` (plain and
//! `+tls`), and `check-config` on broken TLS files.
//!
//! Certificates are made at test time with the `openssl` command (a CA, a server and a
//! client certificate it signs, and a client certificate of another CA). Needs (CI
//! installs them): openssl, DCMTK built with OpenSSL (Debian's is), python3 with pydicom.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::pki::Pki;
use common::{dcmtk, free_port, wait_for_port, Proc};

const BIN: &str = env!("CARGO_BIN_EXE_cspine-triage");

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .expect("cannot run peer tool")
}

/// python3 from PATH (the one with pydicom, as in tests/dicom_scp.rs).
fn python() -> &'static str {
    "python3"
}

/// pydicom's CT_small.dcm and its SOP Instance UID.
fn ct_small() -> (String, String) {
    let out = run(Command::new(python()).args([
        "-c",
        "from pydicom.data import get_testdata_file as g; import pydicom; \
         p = g('CT_small.dcm'); print(p); print(pydicom.dcmread(p).SOPInstanceUID)",
    ]));
    assert!(out.status.success(), "pydicom: {}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = s.lines();
    (
        lines.next().unwrap().to_string(),
        lines.next().unwrap().to_string(),
    )
}

/// `cspine-triage echo ARGS...`
fn echo(args: &[&str]) -> Output {
    run(Command::new(BIN).arg("echo").args(args))
}

/// The daemon with a plain and a TLS port; `tls_extra` is appended to `[dicom.tls]`.
struct Daemon {
    _proc: Proc,
    port: u16,
    tls_port: u16,
    spool: PathBuf,
}

fn write_config(dir: &Path, pki: &Pki, port: u16, tls_port: u16, tls_extra: &str) -> PathBuf {
    let broker_port = free_port();
    let config = dir.join("cspine.toml");
    std::fs::write(
        &config,
        format!(
            "[dicom]\nbind = \"127.0.0.1\"\nport = {port}\nspool_dir = \"{spool}\"\n\
             min_free_space_mb = 0\n\
             \n[dicom.tls]\nport = {tls_port}\ncertificate = \"{cert}\"\n\
             private_key = \"{key}\"\nca = \"{ca}\"\n{tls_extra}\n\
             \n[series]\nquiet_period_secs = 3600.0\nmax_wait_secs = 7200.0\n\
             \n[inference]\nmodel = \"{model}\"\n\
             \n[alert]\noutbox_dir = \"{outbox}\"\nembedded_broker_port = {broker_port}\n",
            spool = dir.join("spool").display(),
            cert = pki.path("server.pem"),
            key = pki.path("server.key"),
            ca = pki.path("ca.pem"),
            model = common::repo_root().join("models/model.json").display(),
            outbox = dir.join("outbox").display(),
        ),
    )
    .unwrap();
    config
}

impl Daemon {
    fn start(dir: &Path, pki: &Pki, tls_extra: &str) -> Daemon {
        let (port, tls_port) = (free_port(), free_port());
        let config = write_config(dir, pki, port, tls_port, tls_extra);
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info,rumqttd=off");
        let proc = Proc::spawn(cmd);
        for p in [tls_port, port] {
            assert!(
                wait_for_port(p, Duration::from_secs(60)),
                "daemon did not open port {p}: {}",
                proc.log()
            );
        }
        Daemon {
            _proc: proc,
            port,
            tls_port,
            spool: dir.join("spool"),
        }
    }

    fn plain(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn tls(&self) -> String {
        format!("127.0.0.1:{}", self.tls_port)
    }

    /// Spool files named after `sop_instance` (`<study>/<series>/<sop>.dcm`).
    fn stored(&self, sop_instance: &str) -> Vec<PathBuf> {
        fn walk(dir: &Path, name: &str, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, name, out);
                } else if p.file_name().is_some_and(|n| n == name) {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.spool, &format!("{sop_instance}.dcm"), &mut out);
        out
    }
}

/// DCMTK's TLS options for a client identity and the CA it trusts.
fn dcmtk_tls(pki: &Pki, identity: &str) -> Vec<String> {
    vec![
        "+tls".into(),
        pki.path(&format!("{identity}.key")),
        pki.path(&format!("{identity}.pem")),
        "+cf".into(),
        pki.path("ca.pem"),
    ]
}

#[test]
fn tls_port_serves_dcmtk_and_echo_and_refuses_client_certificates_of_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(dir.path());
    let d = Daemon::start(dir.path(), &pki, "verify_client = true");
    let port = d.tls_port.to_string();

    // DCMTK over TLS with a client certificate of the configured CA.
    let ok = run(Command::new(dcmtk("echoscu"))
        .args(dcmtk_tls(&pki, "client"))
        .args(["-aec", "CSPINE", "127.0.0.1", &port]));
    assert!(ok.status.success(), "echoscu +tls: {}", text(&ok));
    let (file, sop) = ct_small();
    let stored = run(Command::new(dcmtk("storescu"))
        .args(dcmtk_tls(&pki, "client"))
        .args(["-aec", "CSPINE", "127.0.0.1", &port, &file]));
    assert!(stored.status.success(), "storescu +tls: {}", text(&stored));
    assert_eq!(d.stored(&sop).len(), 1, "the instance is in the spool");

    // A client certificate from another CA, or none: no association.
    let stranger = run(Command::new(dcmtk("echoscu"))
        .args(dcmtk_tls(&pki, "stranger"))
        .args(["-aec", "CSPINE", "127.0.0.1", &port]));
    assert!(!stranger.status.success(), "{}", text(&stranger));
    let ca = pki.path("ca.pem");
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let (scert, skey) = (pki.path("stranger.pem"), pki.path("stranger.key"));
    let refused = echo(&[
        "--tls-ca",
        &ca,
        "--tls-cert",
        &scert,
        "--tls-key",
        &skey,
        &d.tls(),
    ]);
    assert!(!refused.status.success(), "{}", text(&refused));
    let anonymous = echo(&["--tls-ca", &ca, &d.tls()]);
    assert!(!anonymous.status.success(), "{}", text(&anonymous));

    // cspine-triage echo: TLS with the good identity, plain on the plain port.
    let tls = echo(&[
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        &d.tls(),
    ]);
    assert!(tls.status.success(), "echo over TLS: {}", text(&tls));
    let plain = echo(&[&d.plain()]);
    assert!(plain.status.success(), "plain echo: {}", text(&plain));
    // TLS towards the plain port, and plain towards the TLS port, fail.
    let crossed = echo(&[
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        &d.plain(),
    ]);
    assert!(!crossed.status.success(), "{}", text(&crossed));
    let crossed = echo(&["--timeout", "5", &d.tls()]);
    assert!(!crossed.status.success(), "{}", text(&crossed));
    // The daemon still serves after all of it.
    let again = echo(&[
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        &d.tls(),
    ]);
    assert!(again.status.success(), "{}", text(&again));
}

#[test]
fn tls_port_without_client_verification_and_plain_port_off() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(dir.path());
    let d = Daemon::start(dir.path(), &pki, "");
    let ca = pki.path("ca.pem");
    let anonymous = echo(&["--tls-ca", &ca, &d.tls()]);
    assert!(anonymous.status.success(), "{}", text(&anonymous));
    // A CA that did not sign the server: the client refuses the server.
    let other = echo(&["--tls-ca", &pki.path("otherca.pem"), &d.tls()]);
    assert!(!other.status.success(), "{}", text(&other));
    drop(d);

    let (port, tls_port) = (free_port(), free_port());
    let dir2 = tempfile::tempdir().unwrap();
    let config = write_config(dir2.path(), &pki, port, tls_port, "plain = false");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config"]).arg(&config);
    let proc = Proc::spawn(cmd);
    assert!(
        wait_for_port(tls_port, Duration::from_secs(60)),
        "{}",
        proc.log()
    );
    let tls = echo(&["--tls-ca", &ca, &format!("127.0.0.1:{tls_port}")]);
    assert!(tls.status.success(), "{}", text(&tls));
    let plain = echo(&[&format!("127.0.0.1:{port}")]);
    assert!(
        !plain.status.success(),
        "the plain port is closed: {}",
        text(&plain)
    );
}

#[test]
fn echo_reaches_dcmtk_storescp_plain_and_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(dir.path());
    let (plain_port, tls_port) = (free_port(), free_port());
    let storescp = dcmtk("echoscu").with_file_name("storescp");
    let out = dir.path().join("received");
    std::fs::create_dir_all(&out).unwrap();
    let mut plain = Command::new(&storescp);
    plain
        .args(["-aet", "PACS", "-od"])
        .arg(&out)
        .arg(plain_port.to_string());
    let _plain = Proc::spawn(plain);
    let mut tls = Command::new(&storescp);
    tls.args(["-aet", "PACS", "+tls"])
        .args([pki.path("server.key"), pki.path("server.pem")])
        .args(["+cf", &pki.path("ca.pem"), "-od"])
        .arg(&out)
        .arg(tls_port.to_string());
    let _tls = Proc::spawn(tls);
    for p in [plain_port, tls_port] {
        assert!(wait_for_port(p, Duration::from_secs(20)));
    }

    let ok = echo(&["--called-ae", "PACS", &format!("127.0.0.1:{plain_port}")]);
    assert!(ok.status.success(), "{}", text(&ok));
    let tls_addr = format!("127.0.0.1:{tls_port}");
    let ca = pki.path("ca.pem");
    // storescp requires a client certificate by default (-rc).
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let ok = echo(&[
        "--called-ae",
        "PACS",
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        &tls_addr,
    ]);
    assert!(ok.status.success(), "{}", text(&ok));
    let (scert, skey) = (pki.path("stranger.pem"), pki.path("stranger.key"));
    let refused = echo(&[
        "--called-ae",
        "PACS",
        "--tls-ca",
        &ca,
        "--tls-cert",
        &scert,
        "--tls-key",
        &skey,
        &tls_addr,
    ]);
    assert!(!refused.status.success(), "{}", text(&refused));
    // Nobody listening: a clear failure, not a hang.
    let nobody = echo(&[&format!("127.0.0.1:{}", free_port())]);
    assert!(!nobody.status.success(), "{}", text(&nobody));
}

#[test]
fn check_config_rejects_a_missing_key_and_a_key_of_another_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(dir.path());
    let check = |tls_extra: &str, key: &str| {
        let sub = tempfile::tempdir_in(dir.path()).unwrap();
        let config = write_config(sub.path(), &pki, 11112, 2762, tls_extra);
        // Point private_key elsewhere.
        let text_ = std::fs::read_to_string(&config)
            .unwrap()
            .replace(&pki.path("server.key"), key);
        std::fs::write(&config, text_).unwrap();
        run(Command::new(BIN).arg("check-config").arg(&config))
    };
    let good = check("", &pki.path("server.key"));
    assert!(good.status.success(), "{}", text(&good));
    let missing_path = dir.path().join("no-such.key").display().to_string();
    let missing = check("", &missing_path);
    assert!(!missing.status.success(), "{}", text(&missing));
    assert!(text(&missing).contains(&missing_path), "{}", text(&missing));
    let other = check("", &pki.path("client.key"));
    assert!(!other.status.success(), "{}", text(&other));
    assert!(
        text(&other).contains(&pki.path("client.key")),
        "{}",
        text(&other)
    );
}

#[test]
fn a_study_sent_over_tls_is_analysed_like_a_plain_one() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(dir.path());
    let broker = common::Mosquitto::start();
    let study = common::synth(&dir.path().join("study"), 9201, "none", &[]);
    let (port, tls_port) = (free_port(), free_port());
    let tls = format!(
        "[dicom.tls]\nport = {tls_port}\ncertificate = \"{}\"\nprivate_key = \"{}\"\n\
         ca = \"{}\"\nverify_client = true\n",
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let config = common::serve_config_with(dir.path(), port, &broker.url(), &tls, "");
    let daemon = common::spawn_serve(&config, port, &[]);
    assert!(wait_for_port(tls_port, Duration::from_secs(30)));
    let watcher = Command::new(BIN)
        .args([
            "watch",
            "--mqtt",
            &broker.url(),
            "--prefix",
            "cspine/testsite/box1/",
        ])
        .args(["--count", "1", "--timeout", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let sent = run(Command::new(dcmtk("storescu"))
        .args(dcmtk_tls(&pki, "client"))
        .args([
            "-aec",
            "CSPINE",
            "-aet",
            "CTSCANNER",
            "+sd",
            "+r",
            "127.0.0.1",
        ])
        .arg(tls_port.to_string())
        .arg(&study[0]));
    assert!(sent.status.success(), "storescu +tls: {}", text(&sent));
    let out = watcher.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "no result: {}\n{}",
        text(&out),
        daemon.log()
    );
    let result: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    let study_uid = study[0].file_name().unwrap().to_string_lossy().to_string();
    assert_eq!(result["study_instance_uid"], study_uid.as_str());
    let files = common::files_in_z_order(&study[0]).len();
    assert_eq!(
        result["instances"], files,
        "every instance sent over TLS analysed"
    );
    assert!(
        ["positive", "negative"].contains(&result["status"].as_str().unwrap()),
        "analysed with a model answer: {result}"
    );
}
