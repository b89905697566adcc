//! DICOM ingest through the real binary and real peers: DCMTK `echoscu`/`storescu`
//! and pynetdicom (tests/python/scp_client.py), files from pydicom / pydicom-data.
//!
//! Needs (CI installs them): DCMTK (`apt-get install dcmtk`), python3 with pydicom,
//! pydicom-data, pynetdicom and numpy. A missing tool fails the test with a message.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::dcmtk;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cspine-triage");
const HELPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/scp_client.py");

/// The daemon under test (`cspine-triage serve`), with its log captured.
struct Daemon {
    child: Child,
    port: u16,
    spool: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `serve` on a free loopback port; `extra` is appended to `[dicom]`.
    fn start(dir: &Path, extra: &str) -> Daemon {
        let spool = dir.join("spool");
        let config = dir.join("cspine.toml");
        let mut toml = format!(
            "[dicom]\nbind = \"127.0.0.1\"\nport = 0\nspool_dir = \"{}\"\n{extra}\n",
            spool.display()
        );
        if !extra.contains("min_free_space_mb") {
            // Shared CI disks may be nearly full; the floor has its own test.
            toml.push_str("min_free_space_mb = 0\n");
        }
        // The rest of the daemon runs too (model, outbox, embedded broker on a free port);
        // series never complete here, so the spool holds exactly what was acknowledged.
        let broker_port = common::free_port();
        toml.push_str(&format!(
            "\n[series]\nquiet_period_secs = 3600.0\nmax_wait_secs = 7200.0\n\
             \n[inference]\nmodel = \"{}\"\n\
             \n[alert]\noutbox_dir = \"{}\"\nembedded_broker_port = {broker_port}\n",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("models/model.json")
                .display(),
            dir.join("outbox").display(),
        ));
        std::fs::write(&config, toml).unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info,rumqttd=off")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start cspine-triage");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[daemon] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let mut daemon = Daemon {
            child,
            port: 0,
            spool,
            log,
        };
        let line = daemon
            .wait_log("DICOM SCP ", Duration::from_secs(60))
            .unwrap_or_else(|| panic!("daemon did not start listening:\n{}", daemon.log_text()));
        let addr = line.split("listening on ").nth(1).unwrap();
        let port = addr.split([' ', ':']).nth(1).unwrap();
        daemon.port = port.parse().unwrap();
        daemon
    }

    fn wait_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_log(&self, needle: &str) {
        if self.wait_log(needle, Duration::from_secs(10)).is_none() {
            panic!("daemon log lacks {needle:?}:\n{}", self.log_text());
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn port(&self) -> String {
        self.port.to_string()
    }

    fn path_of(&self, f: &Value) -> PathBuf {
        self.spool
            .join(f["study"].as_str().unwrap())
            .join(f["series"].as_str().unwrap())
            .join(format!("{}.dcm", f["sop_instance"].as_str().unwrap()))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn python() -> &'static str {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let ok = Command::new("python3")
            .args(["-c", "import pydicom, pynetdicom, numpy, data_store"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "python3 with pydicom, pydicom-data, pynetdicom and numpy is required \
             (pip install pydicom pydicom-data pynetdicom numpy)"
        );
    });
    "python3"
}

/// Runs the Python peer and parses its JSON answer.
fn helper(args: &[&str]) -> Value {
    let out = Command::new(python())
        .arg(HELPER)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scp_client.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("bad helper output {stdout:?}: {e}"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn echoscu(d: &Daemon, calling: &str, called: &str) -> Output {
    run(Command::new(dcmtk("echoscu"))
        .args(["-aet", calling, "-aec", called, "127.0.0.1"])
        .arg(d.port()))
}

fn storescu(d: &Daemon, files: &[&str], options: &[&str]) -> Output {
    run(Command::new(dcmtk("storescu"))
        .env("TCP_NODELAY", "1")
        // -R: propose only what the files need, so a refused syntax is not hidden by
        // one of the ~100 other proposed contexts.
        .args(["-R", "-aec", "CSPINE", "127.0.0.1"])
        .args(options)
        .arg(d.port())
        .args(files))
}

/// storescu -R proposes only uncompressed syntaxes for files it believes it could
/// decompress (deflate, RLE, JPEG), then fails to convert them: name the file's syntax.
/// `None`: storescu cannot propose it (JPEG process 14 .57), pynetdicom sends it.
fn storescu_proposal(ts: &str) -> Option<&'static [&'static str]> {
    Some(match ts {
        "1.2.840.10008.1.2.1.99" => &["-xd"],
        "1.2.840.10008.1.2.5" => &["-xr"],
        "1.2.840.10008.1.2.4.50" => &["-xy"],
        "1.2.840.10008.1.2.4.51" => &["-xx"],
        "1.2.840.10008.1.2.4.57" => return None,
        "1.2.840.10008.1.2.4.70" => &["-xs"],
        "1.2.840.10008.1.2.4.80" => &["-xt"],
        "1.2.840.10008.1.2.4.81" => &["-xu"],
        "1.2.840.10008.1.2.4.90" => &["-xv"],
        "1.2.840.10008.1.2.4.91" => &["-xw"],
        "1.2.840.10008.1.2.4.100" => &["-xm"],
        _ => &[],
    })
}

/// pynetdicom C-STORE proposing exactly the file's syntax; shaped like storescu's result.
fn pynetdicom_store(d: &Daemon, file: &str) -> Output {
    let out = run(Command::new(python()).args([
        HELPER,
        "store",
        &d.port(),
        file,
        "--calling",
        "STORESCU",
    ]));
    let ok = String::from_utf8_lossy(&out.stdout).contains("\"status\": 0,");
    // Borrow a real exit status with the right success value.
    let status = Command::new(if ok { "true" } else { "false" })
        .status()
        .unwrap();
    Output { status, ..out }
}

fn tmp_files(d: &Daemon) -> usize {
    std::fs::read_dir(d.spool.join(".tmp"))
        .map(|r| r.count())
        .unwrap_or(0)
}

#[test]
fn echo_and_every_transfer_syntax_stored_or_refused_at_negotiation() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "");
    let echo = echoscu(&d, "ECHOSCU", "CSPINE");
    assert!(echo.status.success(), "echoscu failed: {}", text(&echo));

    let files_dir = dir.path().join("files");
    let manifest = helper(&[
        "make-files",
        files_dir.to_str().unwrap(),
        "--dcmtk-bin",
        dcmtk("echoscu").parent().unwrap().to_str().unwrap(),
    ]);
    let files = manifest["files"].as_array().unwrap();
    let mut stored_syntaxes = std::collections::BTreeSet::new();
    let mut seen_sops = std::collections::BTreeSet::new();
    for f in files {
        let file = f["file"].as_str().unwrap();
        let ts = f["transfer_syntax"].as_str().unwrap();
        let expect = f["expect"].as_str().unwrap();
        let out = match storescu_proposal(ts) {
            Some(options) => storescu(&d, &[file], options),
            None => pynetdicom_store(&d, file),
        };
        let spooled = d.path_of(f);
        match expect {
            // pydicom's MR_small_* variants share one SOP Instance UID: the first one
            // is stored, the others are duplicates (Success, nothing rewritten).
            "stored" if !seen_sops.insert(f["sop_instance"].clone().to_string()) => {
                assert!(
                    out.status.success(),
                    "{file} ({ts}) duplicate refused: {}",
                    text(&out)
                );
                assert!(spooled.is_file());
            }
            "stored" | "fallback" => {
                assert!(
                    out.status.success(),
                    "{file} ({ts}) not stored: {}",
                    text(&out)
                );
                assert!(
                    spooled.is_file(),
                    "{file} ({ts}): {} missing",
                    spooled.display()
                );
                let cmp = helper(&["compare", file, spooled.to_str().unwrap()]);
                assert_eq!(
                    cmp["equal"], true,
                    "{file} ({ts}) stored differently: {cmp}"
                );
                assert_eq!(
                    cmp["source_ae"], "STORESCU",
                    "calling AE not recorded: {cmp}"
                );
                if expect == "stored" {
                    // Stored exactly in the syntax it was sent in: no re-encoding.
                    assert_eq!(cmp["stored_ts"], ts, "{file}: {cmp}");
                    stored_syntaxes.insert(ts.to_string());
                } else {
                    assert_ne!(
                        cmp["stored_ts"], ts,
                        "{file} should have been converted: {cmp}"
                    );
                }
            }
            "refused" => {
                assert!(
                    !out.status.success(),
                    "{file} ({ts}) was accepted: {}",
                    text(&out)
                );
                assert!(
                    text(&out).contains("No Acceptable Presentation Contexts"),
                    "storescu should report it cannot send {file}: {}",
                    text(&out)
                );
                d.assert_log("refused: none of its transfer syntaxes can be decoded here");
                assert!(!spooled.exists(), "{file} ({ts}) must not be in the spool");
            }
            other => panic!("unknown expectation {other}"),
        }
    }
    // Every syntax we promise to decode was exercised with a real file.
    for (ts, name) in cspine_triage::dicom::syntax::ACCEPTED_TRANSFER_SYNTAXES {
        assert!(
            stored_syntaxes.contains(*ts),
            "no test file stored in {name} ({ts})"
        );
    }

    // Undecodable syntaxes, each proposed alone: refused with "transfer syntaxes not
    // supported" (result 4), so the SCU knows to fall back; explicit LE as control.
    let neg = helper(&[
        "negotiate",
        &d.port(),
        "1.2.840.10008.1.2.4.201", // HTJ2K lossless
        "1.2.840.10008.1.2.4.110", // JPEG XL lossless
        "1.2.840.10008.1.2.4.100", // MPEG2 MP@ML
        "1.2.840.10008.1.2.2",     // explicit VR big endian (retired)
        "1.2.840.10008.1.2.4.51",  // JPEG Extended: 12-bit DCT is not decodable here
        "1.2.840.10008.1.2.1",
    ]);
    let contexts = neg["contexts"].as_array().unwrap();
    assert_eq!(contexts.len(), 6, "{neg}");
    let accepted: Vec<_> = contexts.iter().filter(|c| c["accepted"] == true).collect();
    assert_eq!(accepted.len(), 1, "{neg}");
    assert_eq!(accepted[0]["transfer_syntax"], "1.2.840.10008.1.2.1");
    assert!(
        contexts
            .iter()
            .filter(|c| c["accepted"] == false)
            .all(|c| c["result"] == 4),
        "refusals must say 'transfer syntaxes not supported': {neg}"
    );

    // The same instance twice: Success both times, one file.
    let ct = files
        .iter()
        .find(|f| f["file"].as_str().unwrap().ends_with("CT_small.dcm"))
        .unwrap();
    let series_dir = d.path_of(ct).parent().unwrap().to_path_buf();
    let count = || std::fs::read_dir(&series_dir).unwrap().count();
    let before = (count(), std::fs::read(d.path_of(ct)).unwrap());
    let again = storescu(&d, &[ct["file"].as_str().unwrap()], &[]);
    assert!(again.status.success(), "{}", text(&again));
    d.assert_log("is already in the spool");
    assert_eq!((count(), std::fs::read(d.path_of(ct)).unwrap()), before);
    assert_eq!(tmp_files(&d), 0, "temp files left behind");
}

#[test]
fn malformed_input_gets_an_error_status_or_abort_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "");
    let r = helper(&["bad-stores", &d.port()]);
    assert_eq!(r["wrong_sop_class"]["status"], 0x0122, "{r}");
    assert_eq!(r["truncated"]["status"], 0xC000, "{r}");
    assert_eq!(r["uid_mismatch"]["status"], 0xA900, "{r}");
    assert_eq!(r["garbage"]["status"], 0xC000, "{r}");
    // Same association, still usable.
    assert_eq!(r["good"]["status"], 0, "{r}");
    assert_eq!(r["echo"], 0, "{r}");
    d.assert_log("failed with C000");

    for when in ["before", "after"] {
        let g = helper(&["garbage", &d.port(), when]);
        assert_eq!(
            g["reply_type"], 0x07,
            "garbage {when} association: expected A-ABORT, got {g}"
        );
    }
    d.assert_log("unrecognized PDU");
    // Command set fragments that never end: aborted at 64 KiB, not collected forever.
    let g = helper(&["garbage", &d.port(), "big-command"]);
    assert_eq!(
        g["reply_type"], 0x07,
        "endless command set: expected A-ABORT, got {g}"
    );
    d.assert_log("command set of more than 65536 bytes");
    // A C-ECHO whose UID decodes outside ASCII (it declares UTF-8) used to panic the
    // association task (no answer); now it gets its C-ECHO-RSP (P-DATA-TF).
    let g = helper(&["garbage", &d.port(), "non-ascii-echo"]);
    assert_eq!(
        g["reply_type"], 0x04,
        "non-ASCII C-ECHO: expected P-DATA-TF, got {g}"
    );
    let echo = echoscu(&d, "ECHOSCU", "CSPINE");
    assert!(
        echo.status.success(),
        "daemon stopped serving: {}",
        text(&echo)
    );
    assert_eq!(
        tmp_files(&d),
        0,
        "temp files of refused instances left behind"
    );
}

/// Regression (tests/reliability/fuzz_network.py, docs/RELIABILITY.md): a C-STORE whose Pixel Data
/// declares gigabytes but carries 32 KiB made the SCP allocate and zero-fill the declared
/// length first (about 4 s per 2 GB on an idle machine, minutes on a loaded one). Now:
/// C000 at once, a log line naming the element and its offset, nothing spooled, and the
/// association and the daemon keep working.
#[test]
fn a_declared_length_beyond_the_data_gets_c000_at_once_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "");
    let r = helper(&["lying-length", &d.port()]);
    let stores = r["stores"].as_array().unwrap();
    assert_eq!(stores.len(), 3, "{r}");
    for s in stores {
        assert_eq!(s["status"], 0xC000, "{s}");
        let secs = s["seconds"].as_f64().unwrap();
        assert!(secs < 2.0, "refusal took {secs:.1} s: {s}");
        d.assert_log(&format!(
            "element (7FE0,0010) OW at offset {} of the data set declares {} bytes, but only",
            s["pixel_data_offset"], s["declared"]
        ));
    }
    assert_eq!(
        r["echo"], 0,
        "association not usable after the refusals: {r}"
    );
    assert_eq!(
        tmp_files(&d),
        0,
        "temp files of refused instances left behind"
    );
    assert!(
        cspine_triage::dicom::spool::reindex(&d.spool)
            .unwrap()
            .is_empty(),
        "a refused instance is in the spool"
    );
    // A valid store on a new association still succeeds.
    let good = helper(&["store", &d.port(), &ct_small()]);
    assert_eq!(good["status"], 0, "{good}");
    assert_eq!(
        cspine_triage::dicom::spool::reindex(&d.spool)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn unknown_calling_ae_and_wrong_called_ae_are_rejected_with_their_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        "allowed_calling_aes = [\"CTSCANNER@127.0.0.1\", \"PACS@127.0.0.2\"]",
    );
    let ok = echoscu(&d, "CTSCANNER", "CSPINE");
    assert!(ok.status.success(), "allowed AE refused: {}", text(&ok));

    let intruder = echoscu(&d, "INTRUDER", "CSPINE");
    assert!(!intruder.status.success());
    assert!(
        text(&intruder).contains("Calling AE Title Not Recognized"),
        "{}",
        text(&intruder)
    );
    d.assert_log("\"INTRUDER\" is not in dicom.allowed_calling_aes");

    // Known AE, wrong address.
    let pacs = echoscu(&d, "PACS", "CSPINE");
    assert!(!pacs.status.success());
    d.assert_log("\"PACS\" is allowed, but not from address 127.0.0.1");

    let wrong_called = echoscu(&d, "CTSCANNER", "NOTUS");
    assert!(!wrong_called.status.success());
    assert!(
        text(&wrong_called).contains("Called AE Title Not Recognized"),
        "{}",
        text(&wrong_called)
    );
    d.assert_log("called AE \"NOTUS\" is not ours");
}

/// A pynetdicom association that stored one file and is held open until dropped.
struct HeldAssociation {
    child: Child,
    stdin: Option<ChildStdin>,
    answer: Value,
}

impl HeldAssociation {
    fn store(d: &Daemon, file: &str) -> HeldAssociation {
        let mut child = Command::new(python())
            .args([HELPER, "store", &d.port(), file, "--hold"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let answer = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("bad helper output {line:?}: {e}"));
        HeldAssociation {
            child,
            stdin,
            answer,
        }
    }
}

impl Drop for HeldAssociation {
    fn drop(&mut self) {
        // Closing stdin makes the helper abort its association and exit.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

fn ct_small() -> String {
    let out = Command::new(python())
        .args([
            "-c",
            "from pydicom.data import get_testdata_file as g; print(g('CT_small.dcm'))",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn too_many_associations_get_a_transient_reject() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "max_associations = 1");
    let held = HeldAssociation::store(&d, &ct_small());
    assert_eq!(held.answer["status"], 0, "{}", held.answer);
    let busy = echoscu(&d, "ECHOSCU", "CSPINE");
    assert!(!busy.status.success());
    let t = text(&busy);
    assert!(
        t.contains("Rejected Transient") && t.contains("Local Limit Exceeded"),
        "{t}"
    );
    d.assert_log("dicom.max_associations");
    drop(held);
    // The slot is free again once the held association is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = echoscu(&d, "ECHOSCU", "CSPINE");
        if ok.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed: {}", text(&ok));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kill_9_right_after_success_keeps_the_instance_and_restart_reindexes_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = ct_small();
    let mut d = Daemon::start(dir.path(), "");
    let held = HeldAssociation::store(&d, &file);
    assert_eq!(held.answer["status"], 0, "{}", held.answer);
    // Success was answered: kill -9 now, association still open.
    d.kill9();
    drop(held);
    // An interrupted receive leaves a temp file; the restart must drop it.
    std::fs::write(d.spool.join(".tmp").join("999-1.part"), b"half an instance").unwrap();
    let spool = d.spool.clone();
    drop(d);

    let d = Daemon::start(dir.path(), "");
    let line = d
        .wait_log("recovered from spool", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("nothing recovered:\n{}", d.log_text()));
    assert!(line.contains("from PYSCU"), "calling AE lost: {line}");
    let recovered = cspine_triage::dicom::spool::reindex(&spool).unwrap();
    assert_eq!(recovered.len(), 1);
    assert!(recovered[0].path.is_file());
    assert_eq!(recovered[0].calling_ae, "PYSCU");
    assert_eq!(tmp_files(&d), 0, "leftover temp file not removed");
    let cmp = helper(&["compare", &file, recovered[0].path.to_str().unwrap()]);
    assert_eq!(cmp["equal"], true, "{cmp}");
    // Sending it again after the restart is idempotent.
    let again = helper(&["store", &d.port(), &file]);
    assert_eq!(again["status"], 0, "{again}");
    d.assert_log("is already in the spool");
}

/// A spool file damaged while the daemon was down (cut short in its pixel data) fails the
/// start-up re-check: logged as an error, moved to `.rejected/` (kept, not analysed), and
/// the same instance sent again is stored anew, not answered as a duplicate of the bad
/// copy.
#[test]
fn restart_quarantines_a_spool_file_cut_short_and_the_instance_can_be_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let file = ct_small();
    let mut d = Daemon::start(dir.path(), "");
    let first = helper(&["store", &d.port(), &file]);
    assert_eq!(first["status"], 0, "{first}");
    d.kill9();
    let spool = d.spool.clone();
    drop(d);
    let stored = cspine_triage::dicom::spool::reindex(&spool).unwrap();
    assert_eq!(stored.len(), 1);
    let path = stored[0].path.clone();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 100)
        .unwrap();

    let d = Daemon::start(dir.path(), "");
    let line = d
        .wait_log("failed its re-check", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no re-check error logged:\n{}", d.log_text()));
    assert!(
        line.contains("ERROR") && line.contains(".rejected"),
        "{line}"
    );
    let rejected: Vec<_> = std::fs::read_dir(spool.join(".rejected"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(std::fs::metadata(&rejected[0]).unwrap().len(), len - 100);
    assert!(!path.exists());
    let again = helper(&["store", &d.port(), &file]);
    assert_eq!(again["status"], 0, "{again}");
    assert!(
        !d.log_text().contains("is already in the spool"),
        "{}",
        d.log_text()
    );
    let cmp = helper(&["compare", &file, path.to_str().unwrap()]);
    assert_eq!(cmp["equal"], true, "{cmp}");
}

#[test]
fn below_the_free_space_floor_instances_are_refused_with_a700() {
    let dir = tempfile::tempdir().unwrap();
    // 1 EB floor: no disk has that much free.
    let d = Daemon::start(dir.path(), "min_free_space_mb = 1000000000000");
    let r = helper(&["store", &d.port(), &ct_small()]);
    assert_eq!(r["status"], 0xA700, "{r}");
    d.assert_log("min_free_space_mb");
    assert!(
        cspine_triage::dicom::spool::reindex(&d.spool)
            .unwrap()
            .is_empty(),
        "nothing may be stored below the floor"
    );
}

#[test]
fn silent_peers_are_dropped_by_the_artim_and_idle_timers() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "artim_timeout_secs = 1\nidle_timeout_secs = 1");
    let started = Instant::now();
    let idle = helper(&["garbage", &d.port(), "idle"]);
    assert_eq!(
        idle["reply_type"], 0x07,
        "idle association not aborted: {idle}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    d.assert_log("dicom.idle_timeout_secs");
    // Connected but no A-ASSOCIATE-RQ: closed by the ARTIM timer.
    let _silent = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    d.assert_log("no A-ASSOCIATE-RQ within 1 s");
}

/// A Python peer (tests/python/scp_client.py) that reports one JSON line, then holds its
/// connections until its stdin is closed ([`HeldPeer::finish`] or drop).
struct HeldPeer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
    first: Value,
}

impl HeldPeer {
    fn start(args: &[&str]) -> HeldPeer {
        let mut child = Command::new(python())
            .arg(HELPER)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let first = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("scp_client.py {args:?}: bad output {line:?}: {e}"));
        HeldPeer {
            child,
            stdin,
            stdout,
            first,
        }
    }

    /// Closes stdin and returns the peer's second JSON line (its final report).
    fn finish(mut self) -> Value {
        drop(self.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad final output {line:?}: {e}"))
    }
}

impl Drop for HeldPeer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Retries echoscu until it succeeds; fails the test after `within`.
fn echo_succeeds_within(d: &Daemon, calling: &str, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        let ok = echoscu(d, calling, "CSPINE");
        if ok.status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {}", text(&ok));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A peer that sends requests but never reads the responses fills the socket buffers and
/// leaves the SCP blocked in a send. That send is bounded by dicom.send_timeout_secs:
/// the connection is closed and its slot (here the only one) serves the next SCU.
#[test]
fn a_peer_that_never_reads_responses_loses_its_slot_after_the_send_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        "max_associations = 1\nsend_timeout_secs = 1\nidle_timeout_secs = 600",
    );
    let stuck = HeldPeer::start(&["no-read", &d.port()]);
    assert_ne!(
        stuck.first["outcome"], "never blocked",
        "the SCP kept reading: {}",
        stuck.first
    );
    // Without a send timeout the stuck association holds the slot for as long as the
    // peer keeps the socket open (the idle timer does not run while the SCP sends).
    echo_succeeds_within(
        &d,
        "ECHOSCU",
        Duration::from_secs(60),
        "slot still held by the peer that does not read",
    );
    drop(stuck);
}

/// With every allow-list entry pinned to an address, connections from other addresses
/// are closed at accept and take no slot: silent connections from 127.0.0.2 neither lock
/// the allowed scanner out nor stay open until the ARTIM timer.
#[test]
fn connections_from_addresses_that_can_never_associate_take_no_slot() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        "allowed_calling_aes = [\"CTSCANNER@127.0.0.1\"]\nmax_associations = 2\n\
         artim_timeout_secs = 600",
    );
    let squatters =
        HeldPeer::start(&["silent", &d.port(), "--source", "127.0.0.2", "--count", "6"]);
    assert_eq!(squatters.first["opened"], 6, "{}", squatters.first);
    let ok = echoscu(&d, "CTSCANNER", "CSPINE");
    assert!(
        ok.status.success(),
        "allowed scanner locked out by silent connections: {}",
        text(&ok)
    );
    // They were closed at once (the ARTIM timer is 10 minutes here). The echo above ran
    // after all of them were accepted, so the closes have happened by now.
    let report = squatters.finish();
    assert_eq!(report["closed_by_scp"], 6, "{report}");
}

/// One address cannot take every slot: over dicom.max_associations_per_address it gets
/// the same transient reject as over the global cap, while another address is served.
#[test]
fn one_address_is_capped_below_the_global_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        "max_associations = 8\nmax_associations_per_address = 2",
    );
    let ct = ct_small();
    let held: Vec<_> = (0..2).map(|_| HeldAssociation::store(&d, &ct)).collect();
    for h in &held {
        assert_eq!(h.answer["status"], 0, "{}", h.answer);
    }
    let busy = echoscu(&d, "ECHOSCU", "CSPINE");
    assert!(
        !busy.status.success(),
        "third association from one address accepted"
    );
    let t = text(&busy);
    assert!(
        t.contains("Rejected Transient") && t.contains("Local Limit Exceeded"),
        "{t}"
    );
    // Another address still has slots.
    let other = helper(&["store", &d.port(), &ct, "--source", "127.0.0.2"]);
    assert_eq!(other["status"], 0, "{other}");
    drop(held);
    echo_succeeds_within(&d, "ECHOSCU", Duration::from_secs(10), "slot never freed");
}

/// Connections over the limit are refused without buffering their requests, and only
/// MAX_REFUSALS_AT_ONCE at a time: 48 connections that each send 1 MiB of a request
/// that never completes neither grow the daemon by their size nor all stay open.
#[test]
fn refusals_read_requests_in_chunks_and_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "max_associations = 1\nartim_timeout_secs = 600");
    let held = HeldAssociation::store(&d, &ct_small());
    assert_eq!(held.answer["status"], 0, "{}", held.answer);
    let rss_kib = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let before = rss_kib();
    let flood = HeldPeer::start(&["refusal-flood", &d.port(), "--count", "48"]);
    assert_eq!(flood.first["connections"], 48, "{}", flood.first);
    // Give the refusal tasks time to read what was sent (no assertion on the time).
    let mut peak = before;
    for _ in 0..20 {
        peak = peak.max(rss_kib());
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = flood.finish();
    let grown_mib = peak.saturating_sub(before) / 1024;
    assert!(
        grown_mib < 16,
        "daemon grew by {grown_mib} MiB for 48 MiB of refused requests"
    );
    let closed = report["closed_by_scp"].as_u64().unwrap();
    assert!(
        closed >= 48 - cspine_triage::dicom::limits::MAX_REFUSALS_AT_ONCE as u64,
        "only {closed} of 48 refused connections closed: {report}"
    );
    // The daemon still serves once the slot is free.
    drop(held);
    echo_succeeds_within(&d, "ECHOSCU", Duration::from_secs(10), "slot never freed");
}

/// Peer-supplied strings (calling AE, UIDs, comments) cannot forge log lines: a newline
/// in them is escaped, so no line of the daemon's log starts with the injected text.
#[test]
fn newlines_in_peer_strings_do_not_forge_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "");
    let r = helper(&["forge-log", &d.port(), "--marker", "FORGED"]);
    assert_eq!(r["status"], 0x0122, "{r}");
    assert_eq!(r["release_reply_type"], 0x06, "{r}");
    // The association is over (released); its log lines were written before the
    // A-RELEASE-RP. Wait until the instance UID's marker reached the log at all.
    assert!(
        d.wait_log("FORGED_UID", Duration::from_secs(10)).is_some(),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    let forged: Vec<_> = log
        .lines()
        .filter(|l| l.trim_start().starts_with("FORGED"))
        .collect();
    assert!(forged.is_empty(), "forged log lines: {forged:?}\n{log}");
}
