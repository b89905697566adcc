//! Fault tolerance through the whole daemon, as a site suffers it: the real
//! `cspine-triage serve` process, DCMTK `storescu` as the scanner, a real mosquitto broker
//! and a paho-mqtt subscriber as the dashboard. Studies come from `cspine-triage synth`.
//!
//! What each test proves, and what it measured, is in docs/RELIABILITY.md. These tests
//! assert delivery, ids and instance counts, not the clinical status (that is checked in
//! tests/inference.rs and tests/end_to_end.rs). They run one at a time (they kill processes and time things on a
//! small machine): see [`one_at_a_time`]. `--nocapture` shows the measurements.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

const TOPICS: &str = "cspine/testsite/box1/#";
const RESULT_TOPIC: &str = "cspine/testsite/box1/result";
const ALERT_TOPIC: &str = "cspine/testsite/box1/alert";
/// Series quiet period (seconds) of the daemons here: longer than any gap these tests put
/// into the arrival of a series (a restart, a disk clean-up), so that every series is
/// analysed once, whole. A gap longer than this gives a partial result first, then a
/// revision under another id (the known "late instances" gap of docs/RELIABILITY.md),
/// which these tests would report.
const QUIET_PERIOD: &str = "8";
/// `[series]` key for the tests that want the spool to end empty: an analysed series is
/// kept in the spool until its study is forgotten, 2 s after its last instance here (one
/// hour by default) once its result is committed.
const RETENTION_2S: &str = "completed_retention_secs = 2.0";
/// For results and outbox drains: generous, the machine may be busy.
const RESULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The tests of this file run one after the other.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------- studies and the spool

/// One synthetic study: 256x256 slices `slice_mm` apart (0.6 mm: ~300 slices, 1.5 mm:
/// ~128), explicit VR little endian (no deflate work on either side).
fn study(out: &Path, seed: u64, fracture: &str, slice_mm: &str) -> Vec<PathBuf> {
    let args = [
        "--matrix",
        "256",
        "--transfer-syntax",
        "explicit",
        "--slice-thickness",
        slice_mm,
    ];
    synth(out, seed, fracture, &args)
}

/// One generated instance as the scanner holds it.
#[derive(Debug, Clone)]
struct Source {
    path: PathBuf,
    sop: String,
    series: String,
}

fn uid(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.element(tag)
        .unwrap_or_else(|e| panic!("{tag}: {e}"))
        .to_str()
        .unwrap()
        .trim_end_matches(['\0', ' '])
        .to_string()
}

/// Every instance of the given study directories, in Instance Number order per study.
fn sources(study_dirs: &[PathBuf]) -> Vec<Source> {
    let mut out = Vec::new();
    for dir in study_dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let number = |p: &PathBuf| -> u64 {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok())
                .unwrap_or(u64::MAX)
        };
        files.sort_by_key(number);
        for path in files {
            let obj = OpenFileOptions::new()
                .read_until(tags::PIXEL_DATA)
                .open_file(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push(Source {
                sop: uid(&obj, tags::SOP_INSTANCE_UID),
                series: uid(&obj, tags::SERIES_INSTANCE_UID),
                path,
            });
        }
    }
    out
}

/// Study Instance UID of a generated instance (synth writes `train_images/<study>/<n>.dcm`).
fn study_of(source: &Source) -> String {
    source
        .path
        .parent()
        .and_then(|d| d.file_name())
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Series Instance UID -> number of instances.
fn series_sizes(all: &[Source]) -> BTreeMap<String, usize> {
    let mut sizes = BTreeMap::new();
    for s in all {
        *sizes.entry(s.series.clone()).or_insert(0) += 1;
    }
    sizes
}

/// SOP Instance UID -> file, for every finished instance in the spool
/// (`<spool>/<study>/<series>/<sop>.dcm`; `.tmp/` and other dot entries are not finished).
fn spooled(spool: &Path) -> BTreeMap<String, PathBuf> {
    let dirs = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| e.unwrap().path())
                    .filter(|p| {
                        p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.')
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = BTreeMap::new();
    for study in dirs(spool) {
        for series in dirs(&study) {
            for entry in std::fs::read_dir(&series).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().and_then(|e| e.to_str()) == Some("dcm") {
                    let sop = path.file_stem().unwrap().to_string_lossy().to_string();
                    out.insert(sop, path);
                }
            }
        }
    }
    out
}

/// Files left in `<spool>/.tmp` (receives in progress or interrupted).
fn spool_tmp_files(spool: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(spool.join(".tmp"))
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// Files the re-index moved to `<spool>/.rejected` (unreadable).
fn spool_rejected(spool: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(spool.join(".rejected"))
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// The spool copy is the instance that was sent: same SOP Instance UID, same pixel data.
fn assert_intact(source: &Source, in_spool: &Path) {
    let open = |p: &Path| {
        OpenFileOptions::new()
            .open_file(p)
            .unwrap_or_else(|e| panic!("cannot parse {}: {e}", p.display()))
    };
    let (a, b) = (open(&source.path), open(in_spool));
    assert_eq!(uid(&b, tags::SOP_INSTANCE_UID), source.sop);
    let pixels = |o: &dicom_object::DefaultDicomObject| {
        o.element(tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap()
            .into_owned()
    };
    assert!(
        pixels(&a) == pixels(&b),
        "pixel data of {} differs from what was sent ({})",
        in_spool.display(),
        source.path.display()
    );
}

// ---------------------------------------------------------------- results and the outbox

fn model_sha256() -> String {
    let text = std::fs::read_to_string(repo_root().join("models/model.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["sha256"].as_str().unwrap().to_string()
}

/// The result id docs/ALERTS.md documents for an analysis of exactly the instances
/// `sources` (one series) that reached `status`: hex sha256 of
/// "<Series Instance UID>\n<model sha256>\n<status>\n<sorted SOP Instance UIDs, \n-joined>".
fn documented_id(sources: &[Source], status: &str) -> String {
    let series = &sources[0].series;
    assert!(sources.iter().all(|s| &s.series == series), "one series");
    let mut sops: Vec<&str> = sources.iter().map(|s| s.sop.as_str()).collect();
    sops.sort_unstable();
    sops.dedup();
    hex::encode(Sha256::digest(
        format!(
            "{series}\n{}\n{status}\n{}",
            model_sha256(),
            sops.join("\n")
        )
        .as_bytes(),
    ))
}

/// The ids an analysis of every instance of `sources` (one series) can have, one per
/// status: these tests check delivery, not the model's verdict.
fn complete_ids(sources: &[Source]) -> BTreeSet<String> {
    ["positive", "negative", "indeterminate", "failed"]
        .iter()
        .map(|status| documented_id(sources, status))
        .collect()
}

/// The instances of `series` among `all`.
fn of_series(all: &[Source], series: &str) -> Vec<Source> {
    all.iter().filter(|s| s.series == series).cloned().collect()
}

/// The one id of `candidates` in `ids`, if any.
fn one_of(ids: &BTreeSet<String>, candidates: &BTreeSet<String>) -> Option<String> {
    let mut found = ids.intersection(candidates);
    let id = found.next().cloned();
    assert!(found.next().is_none(), "two results for one analysis");
    id
}

/// The delivered result is under the id documented for its status and instances.
fn assert_documented_id(result: &serde_json::Value, sources: &[Source]) {
    let status = result["status"].as_str().unwrap();
    assert_eq!(
        result["id"],
        documented_id(sources, status).as_str(),
        "{result}"
    );
    assert_eq!(result["instances"], sources.len(), "{result}");
}

/// Ids of the entries in the outbox directory, in sequence order (each entry file starts
/// with a JSON header line that names its id).
fn outbox_ids(outbox: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(outbox)
        .map(|rd| {
            rd.map(|e| e.unwrap().path())
                .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("entry"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter_map(|p| {
            let bytes = std::fs::read(p).ok()?;
            let line = bytes.split(|&b| b == b'\n').next()?;
            let header: serde_json::Value = serde_json::from_slice(line).ok()?;
            Some(header["id"].as_str()?.to_string())
        })
        .collect()
}

/// What the daemon logs say about `series`: how many instances each result committed for
/// it analysed (one entry per result, logged when the spool marks the series analysed).
fn analyses(logs: &str, series: &str) -> Vec<usize> {
    let head = format!("series {series} (result ");
    logs.lines()
        .filter_map(|l| {
            let rest = &l[l.find(&head)?..];
            let n = rest.split("): ").nth(1)?.split(' ').next()?;
            rest.contains("analysed instances marked in the spool")
                .then(|| n.parse().ok())?
        })
        .collect()
}

/// How many instances each release of `series` from the spool removed once its study was
/// forgotten (`series.completed_retention_secs` after its last instance, its results
/// committed).
fn releases(logs: &str, series: &str) -> Vec<usize> {
    let head = format!("series {series} (study forgotten): ");
    logs.lines()
        .filter_map(|l| {
            let rest = &l[l.find(&head)? + head.len()..];
            rest.contains("instances removed from the spool")
                .then(|| rest.split(' ').next()?.parse().ok())?
        })
        .collect()
}

/// How often a result for `id` was committed to the outbox.
fn commits(logs: &str, id: &str) -> usize {
    let needle = format!("result {id} (");
    logs.lines()
        .filter(|l| l.contains(&needle) && l.contains("committed to the outbox"))
        .count()
}

/// The result of `id` as the dashboard got it, after checking the documented delivery
/// contract: at least one copy on `result`, every copy byte-identical (re-deliveries are),
/// and on `alert` the same bytes if and only if the result is positive. Returns the result
/// and the number of copies received.
fn delivered(sub: &Subscriber, id: &str) -> (serde_json::Value, usize) {
    let parse = |m: &Message| serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap();
    let copies: Vec<Message> = sub
        .on(RESULT_TOPIC)
        .into_iter()
        .filter(|m| parse(m)["id"] == id)
        .collect();
    assert!(!copies.is_empty(), "no result with id {id}");
    assert!(
        copies.iter().all(|m| m.payload == copies[0].payload),
        "{} results with id {id} differ: a re-delivery must be byte-identical\n{}",
        copies.len(),
        copies
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let result = parse(&copies[0]);
    let alerts: Vec<Message> = sub
        .on(ALERT_TOPIC)
        .into_iter()
        .filter(|m| parse(m)["id"] == id)
        .collect();
    if result["status"] == "positive" {
        assert!(!alerts.is_empty(), "positive result {id} without an alert");
        assert!(alerts.iter().all(|m| m.payload == copies[0].payload));
    } else {
        assert!(
            alerts.is_empty(),
            "alert published for a {} result",
            result["status"]
        );
    }
    (result, copies.len())
}

fn ids_on(sub: &Subscriber, topic: &str) -> BTreeSet<String> {
    sub.on(topic)
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            v["id"].as_str().unwrap().to_string()
        })
        .collect()
}

// ---------------------------------------------------------------- the scanner

/// One DCMTK `storescu` run (the scanner), its log read as it goes.
struct Scu {
    proc: Proc,
}

/// What storescu reported, file by file.
struct ScuReport {
    status: ExitStatus,
    /// Files answered Success, in order (an instance already in the spool is answered
    /// Success too).
    acked: Vec<PathBuf>,
    /// Files answered with another status, and the status as storescu prints it.
    refused: Vec<(PathBuf, String)>,
    log: String,
}

impl Scu {
    fn start(port: u16, files: &[&Path]) -> Scu {
        let mut cmd = Command::new(dcmtk("storescu"));
        cmd.args(["-v", "-aec", "CSPINE", "-aet", "CTSCANNER", "127.0.0.1"])
            .arg(port.to_string())
            .args(files);
        Scu {
            proc: Proc::spawn(cmd),
        }
    }

    /// Success responses so far.
    fn successes(&self) -> usize {
        self.proc
            .log()
            .matches("Received Store Response (Success)")
            .count()
    }

    fn exited(&mut self) -> bool {
        self.proc.child.try_wait().unwrap().is_some()
    }

    fn finish(mut self) -> ScuReport {
        let status = self
            .proc
            .wait_exit(Duration::from_secs(120))
            .unwrap_or_else(|| panic!("storescu hung:\n{}", self.proc.log()));
        let log = self.proc.log();
        let (mut acked, mut refused) = (Vec::new(), Vec::new());
        let mut current: Option<PathBuf> = None;
        for line in log.lines() {
            if let Some(file) = line.strip_prefix("I: Sending file: ") {
                current = Some(PathBuf::from(file));
            } else if let Some(rsp) = line.strip_prefix("I: Received Store Response (") {
                let file = current.take().expect("a response follows a file");
                match rsp.trim_end_matches(')') {
                    "Success" => acked.push(file),
                    other => refused.push((file, other.to_string())),
                }
            }
        }
        ScuReport {
            status,
            acked,
            refused,
            log,
        }
    }
}

/// Sends `files` and returns storescu's report.
fn store(port: u16, files: &[&Path]) -> ScuReport {
    Scu::start(port, files).finish()
}

fn paths<'a>(sources: impl IntoIterator<Item = &'a Source>) -> Vec<&'a Path> {
    sources.into_iter().map(|s| s.path.as_path()).collect()
}

// ---------------------------------------------------------------- kill -9

/// kill -9 at random moments while a stream of two studies is sent: every instance the
/// scanner was told Success for is on disk after every crash; after the final restart
/// each series is analysed once, whole, and its result reaches the dashboard with the
/// documented id (repeats byte-identical).
#[test]
fn kill_9_during_a_stream_of_studies_loses_no_acknowledged_instance() {
    const KILLS: usize = 20;
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);

    // Two studies of ~300 slices (0.6 mm), one with a fracture.
    let mut studies = study(&tmp.path().join("a"), 7101, "C2", "0.6");
    studies.extend(study(&tmp.path().join("b"), 7102, "none", "0.6"));
    let all = sources(&studies);
    let sizes = series_sizes(&all);
    let series_of: HashMap<PathBuf, Source> =
        all.iter().map(|s| (s.path.clone(), s.clone())).collect();
    let spool = tmp.path().join("spool");
    let port = free_port();
    // A short retention: the analysed series leave the spool soon after their results, so
    // that the test sees the spool end empty.
    let config = serve_config_full(tmp.path(), port, &broker.url(), "", RETENTION_2S, "");
    let serve_args = ["--quiet-period", QUIET_PERIOD];

    let seed: u64 = std::env::var("FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("kill -9 test: FAULTS_SEED={seed} (set it to replay the same kill moments)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // At most this many Success responses before a kill, so that all the kills fall inside
    // the stream with room to spare.
    let max_k = all.len() * 2 / (3 * KILLS);

    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut stored_unanswered: BTreeSet<String> = BTreeSet::new();
    let mut logs = String::new();
    let storm = Instant::now();
    for kill in 1..=KILLS {
        let remaining = paths(all.iter().filter(|s| !acked.contains(&s.sop)));
        // A random moment. One kill in ten: while the daemon starts (re-indexing the spool,
        // loading the model, opening its port), the scanner retrying meanwhile. Otherwise
        // after k responses of this association (k = 0: within 100 ms of the scanner's
        // start), plus a random fraction of the next instance (receive, parse-back, fsync,
        // link, answer take ~10 ms here).
        let moment;
        let (mut daemon, scu) = if rng.gen_range(0..10) == 0 {
            let daemon = Proc::spawn(serve_command(&config, &serve_args));
            let scu = Scu::start(port, &remaining);
            let ms = rng.gen_range(0..400);
            std::thread::sleep(Duration::from_millis(ms));
            moment = format!("{ms} ms after start-up began");
            (daemon, scu)
        } else {
            let daemon = spawn_serve(&config, port, &serve_args);
            let mut scu = Scu::start(port, &remaining);
            let k = rng.gen_range(0..=max_k);
            if k == 0 {
                let ms = rng.gen_range(0..100);
                std::thread::sleep(Duration::from_millis(ms));
                moment = format!("{ms} ms after the scanner started");
            } else {
                let deadline = Instant::now() + Duration::from_secs(60);
                while scu.successes() < k && !scu.exited() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let us = rng.gen_range(0..12_000);
                std::thread::sleep(Duration::from_micros(us));
                moment = format!("{:.1} ms after response {k}", us as f64 / 1000.0);
            }
            (daemon, scu)
        };
        daemon.kill9();
        logs.push_str(&daemon.log());
        let report = scu.finish();
        assert!(
            !report.status.success(),
            "kill {kill} ({moment}): storescu finished the stream before the kill; the kills \
             must fall inside the stream\n{}",
            report.log
        );
        assert!(
            report.refused.is_empty(),
            "kill {kill}: {:?}",
            report.refused
        );
        acked.extend(report.acked.iter().map(|p| series_of[p].sop.clone()));

        // The crash state: every instance acknowledged so far is in the spool, intact
        // (unless its series was already analysed and forgotten: not expected here).
        let on_disk = spooled(&spool);
        for sop in &acked {
            let source = all.iter().find(|s| &s.sop == sop).unwrap();
            match on_disk.get(sop) {
                Some(file) => {
                    if report.acked.contains(&source.path) {
                        assert_intact(source, file);
                    }
                }
                None => assert!(
                    !releases(&logs, &source.series).is_empty(),
                    "kill {kill}: instance {sop} was acknowledged but is not in the spool"
                ),
            }
        }
        // An instance stored but not yet answered: storescu sends it again, the daemon
        // answers Success without storing it twice.
        stored_unanswered.extend(on_disk.keys().filter(|s| !acked.contains(*s)).cloned());
        eprintln!(
            "kill {kill:2} ({moment}): {:3} acknowledged in this association, {:3}/{} in total",
            report.acked.len(),
            acked.len(),
            all.len()
        );
    }
    let storm = storm.elapsed();
    assert!(acked.len() < all.len(), "the stream ended during the kills");
    for series in sizes.keys() {
        assert!(
            analyses(&logs, series).is_empty(),
            "series {series} was analysed during the kills (a restart gap longer than the \
             {QUIET_PERIOD} s quiet period?): a partial result"
        );
    }

    // Final start: the re-index keeps every acknowledged instance (none was rejected as
    // unreadable), and the scanner sends what it still has no Success for.
    let daemon = spawn_serve(&config, port, &serve_args);
    // (A series already analysed and forgotten has its instances in its result instead:
    // checked below against the instance count of the analysis.)
    let in_spool = |acked: &BTreeSet<String>, log: &dyn Fn() -> String| {
        let on_disk = spooled(&spool);
        let missing: Vec<&Source> = all
            .iter()
            .filter(|s| acked.contains(&s.sop) && !on_disk.contains_key(&s.sop))
            .collect();
        // A release in progress while the spool was listed logs once it is done.
        let deadline = Instant::now() + Duration::from_secs(10);
        for s in missing {
            while releases(&log(), &s.series).is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "acknowledged, not in the spool: {}",
                    s.sop
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    in_spool(&acked, &|| daemon.log());
    let remaining = paths(all.iter().filter(|s| !acked.contains(&s.sop)));
    let report = store(port, &remaining);
    assert!(report.status.success(), "final send: {}", report.log);
    let last_response = Instant::now();
    acked.extend(report.acked.iter().map(|p| series_of[p].sop.clone()));
    assert_eq!(acked.len(), all.len(), "every instance acknowledged");
    in_spool(&acked, &|| daemon.log());

    let candidates: BTreeMap<String, BTreeSet<String>> = sizes
        .keys()
        .map(|s| (s.clone(), complete_ids(&of_series(&all, s))))
        .collect();
    sub.wait_for_within("a result for each series", RESULT_TIMEOUT, |_| {
        let got = ids_on(&sub, RESULT_TOPIC);
        candidates.values().all(|c| one_of(&got, c).is_some())
    });
    let got = ids_on(&sub, RESULT_TOPIC);
    let ids: BTreeMap<String, String> = candidates
        .iter()
        .map(|(series, c)| (series.clone(), one_of(&got, c).unwrap()))
        .collect();
    let time_to_results = last_response.elapsed();
    wait_until("the outbox to drain", RESULT_TIMEOUT, || {
        outbox_ids(&tmp.path().join("outbox")).is_empty()
    });
    // The analysed series stay in the spool until their study is forgotten (2 s after its
    // last instance here, once its result is committed). The release is logged after its
    // files are gone (and its directories removed and fsynced): wait for the log line
    // too, or the check below races with it.
    wait_until("the spool to be released", RESULT_TIMEOUT, || {
        spooled(&spool).is_empty()
            && sizes
                .keys()
                .all(|series| !releases(&daemon.log(), series).is_empty())
    });
    logs.push_str(&daemon.log());
    assert!(
        spool_rejected(&spool).is_empty(),
        "the re-index rejected files: {:?}",
        spool_rejected(&spool)
    );

    // Each series analysed once, with every instance, committed once, kept in the spool
    // until its study was forgotten, then released whole; delivered as one result
    // (byte-identical copies allowed) under its documented id; nothing else.
    assert_eq!(
        ids_on(&sub, RESULT_TOPIC),
        ids.values().cloned().collect::<BTreeSet<_>>()
    );
    let mut copies = Vec::new();
    for (series, id) in &ids {
        assert_eq!(
            analyses(&logs, series),
            vec![sizes[series]],
            "series {series}: one analysis of all {} instances",
            sizes[series]
        );
        assert_eq!(
            releases(&logs, series),
            vec![sizes[series]],
            "series {series}: one release of all {} instances",
            sizes[series]
        );
        assert_eq!(commits(&logs, id), 1, "result {id} committed once");
        let (result, n) = delivered(&sub, id);
        assert_eq!(result["series_instance_uid"], series.as_str());
        assert_documented_id(&result, &of_series(&all, series));
        assert_ne!(result["status"], "failed", "{result}");
        copies.push(n);
    }
    eprintln!(
        "kill -9 x {KILLS} in {:.1} s: {} instances in {} series, {} instances were found \
         stored but unanswered at a kill ({} re-sent instances answered from the spool); \
         results {:.1} s after the last response (quiet period {QUIET_PERIOD} s), copies \
         received {:?}",
        storm.as_secs_f64(),
        all.len(),
        sizes.len(),
        stored_unanswered.len(),
        logs.matches("is already in the spool").count(),
        time_to_results.as_secs_f64(),
        copies
    );
}

// ---------------------------------------------------------------- broker down

/// The broker is down from before the daemon starts: two studies arrive, one before and
/// one after a kill -9 of the daemon, their results wait in the outbox (the spool keeps
/// the analysed series, marked analysed), and both reach a dashboard with a persistent
/// session once the broker is up, in order, under their documented ids, the first one
/// exactly as committed before the restart: the restarted daemon finds the first series
/// marked analysed in the spool and does not analyse it again.
#[test]
fn broker_down_results_wait_in_the_outbox_across_a_restart_then_arrive() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    // The dashboard subscribes while the broker is still up, with a persistent session:
    // the broker keeps its subscription and queues QoS 1 messages for it (docs/ALERTS.md).
    let mut broker = Mosquitto::start();
    let sub = Subscriber::start_with(
        broker.port,
        TOPICS,
        SubOptions {
            client_id: "faults-dashboard",
            persistent: true,
            ..SubOptions::default()
        },
    );
    broker.stop();
    let down = Instant::now();

    let first = sources(&study(&tmp.path().join("a"), 7201, "C3", "1.5"));
    let second = sources(&study(&tmp.path().join("b"), 7202, "none", "1.5"));
    let (ids1, ids2) = (complete_ids(&first), complete_ids(&second));
    // The single outbox entry, once it is one of `candidates`.
    let queued = |candidates: &BTreeSet<String>| {
        let ids = outbox_ids(&tmp.path().join("outbox"));
        match &ids[..] {
            [id] if candidates.contains(id) => Some(id.clone()),
            _ => None,
        }
    };
    let port = free_port();
    // Retry the broker every second at most, so the test does not wait out a long backoff.
    let config = serve_config(tmp.path(), port, &broker.url(), "reconnect_max_secs = 1.0");
    let outbox = tmp.path().join("outbox");
    let spool = tmp.path().join("spool");
    let serve_args = ["--quiet-period", "2"];

    let mut daemon = spawn_serve(&config, port, &serve_args);
    let report = store(port, &paths(&first));
    assert!(report.status.success(), "{}", report.log);
    wait_until("the first result in the outbox", RESULT_TIMEOUT, || {
        queued(&ids1).is_some()
    });
    let id1 = queued(&ids1).unwrap();
    wait_until(
        "the first series marked analysed in the spool",
        RESULT_TIMEOUT,
        || !analyses(&daemon.log(), &first[0].series).is_empty(),
    );
    assert_eq!(
        spooled(&spool).len(),
        first.len(),
        "the analysed series stays in the spool while its study is remembered"
    );
    assert!(
        daemon.wait_for_log("cannot connect to MQTT broker", RESULT_TIMEOUT),
        "{}",
        daemon.log()
    );
    let mut logs = daemon.log();

    // Power cut while the broker is still down; the outbox is all there is of result 1.
    daemon.kill9();
    let restarted_at = time::OffsetDateTime::now_utc();
    let daemon = spawn_serve(&config, port, &serve_args);
    assert_eq!(
        outbox_ids(&outbox),
        std::slice::from_ref(&id1),
        "the outbox survives kill -9"
    );
    // The spool's analysed mark survives it too: the series is remembered, not analysed
    // again (checked below: result 1 committed once).
    assert!(
        daemon.wait_for_log(
            &format!(
                "series {} of study {}: {} instance(s) already analysed",
                first[0].series,
                study_of(&first[0]),
                first.len()
            ),
            RESULT_TIMEOUT
        ),
        "{}",
        daemon.log()
    );
    let report = store(port, &paths(&second));
    assert!(report.status.success(), "{}", report.log);
    wait_until("both results in the outbox", RESULT_TIMEOUT, || {
        let ids = outbox_ids(&outbox);
        ids.len() == 2 && ids[0] == id1 && ids2.contains(&ids[1])
    });
    let id2 = outbox_ids(&outbox)[1].clone();
    // Still nothing delivered, and the daemon is trying.
    let failures = |log: &str| log.matches("cannot connect to MQTT broker").count();
    wait_until(
        "reconnect attempts after the restart",
        RESULT_TIMEOUT,
        || failures(&daemon.log()) >= 2,
    );
    assert_eq!(
        outbox_ids(&outbox).len(),
        2,
        "nothing leaves unacknowledged"
    );
    let outage = down.elapsed();

    broker.restart();
    let up = Instant::now();
    sub.wait_for_within("both results after the outage", RESULT_TIMEOUT, |_| {
        let ids = ids_on(&sub, RESULT_TOPIC);
        ids.contains(&id1) && ids.contains(&id2)
    });
    let delivery = up.elapsed();
    wait_until("the outbox to drain", RESULT_TIMEOUT, || {
        outbox_ids(&outbox).is_empty()
    });
    logs.push_str(&daemon.log());

    // In commit order, under the documented ids, nothing else.
    let order: Vec<String> = sub
        .on(RESULT_TOPIC)
        .iter()
        .map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()["id"].clone())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut distinct = order.clone();
    distinct.dedup();
    assert_eq!(distinct, [id1.clone(), id2.clone()], "order: {order:?}");
    let (r1, n1) = delivered(&sub, &id1);
    let (r2, n2) = delivered(&sub, &id2);
    assert_eq!(r1["series_instance_uid"], first[0].series.as_str());
    assert_eq!(r2["series_instance_uid"], second[0].series.as_str());
    assert_documented_id(&r1, &first);
    assert_documented_id(&r2, &second);
    // Result 1 is the one committed before the kill, replayed from the outbox: not
    // analysed again by the second daemon (its spool copy is marked analysed).
    let published = |r: &serde_json::Value| {
        time::OffsetDateTime::parse(
            r["timings"]["published"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert!(published(&r1) < restarted_at, "{r1}");
    assert!(published(&r2) > restarted_at, "{r2}");
    assert_eq!(commits(&logs, &id1), 1);
    assert_eq!(commits(&logs, &id2), 1);
    assert_eq!(analyses(&logs, &first[0].series), vec![first.len()]);
    assert_eq!(analyses(&logs, &second[0].series), vec![second.len()]);
    assert_eq!(
        spooled(&spool).len(),
        first.len() + second.len(),
        "both analysed series are kept while their studies are remembered"
    );
    eprintln!(
        "broker down {:.1} s (daemon killed and restarted meanwhile, {} failed connects after \
         the restart); both results delivered {:.2} s after the broker came up, copies {n1} \
         and {n2}",
        outage.as_secs_f64(),
        failures(&daemon.log()),
        delivery.as_secs_f64()
    );
}

// ---------------------------------------------------------------- disk full

/// A tmpfs mounted on the spool directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// `Err(why)` where this process cannot mount (not root, no CAP_SYS_ADMIN, a container
    /// without mount rights).
    fn mount(dir: &Path, mib: u64) -> Result<Tmpfs, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not running as root".into());
        }
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    fn free_bytes(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.dir).unwrap();
        st.blocks_available() as u64 * st.fragment_size() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Checks shared by the disk-full tests after the refusal: storescu got exactly one A700
/// and stopped (its default), what it was told Success for is in the spool and intact, the
/// refused instance is not, and no temp file is left behind.
fn assert_refused_with_a700(report: &ScuReport, all: &[Source], spool: &Path) {
    assert!(!report.status.success(), "{}", report.log);
    assert_eq!(report.refused.len(), 1, "{}", report.log);
    let (refused, status) = &report.refused[0];
    assert_eq!(
        status, "Refused: OutOfResources",
        "A700 as storescu prints it"
    );
    let on_disk = spooled(spool);
    for path in &report.acked {
        let source = all.iter().find(|s| &s.path == path).unwrap();
        let file = on_disk
            .get(&source.sop)
            .unwrap_or_else(|| panic!("{} was acknowledged but is not in the spool", source.sop));
        assert_intact(source, file);
    }
    let refused = all.iter().find(|s| &s.path == refused).unwrap();
    assert!(!on_disk.contains_key(&refused.sop), "refused but stored");
    assert_eq!(
        spool_tmp_files(spool),
        Vec::<PathBuf>::new(),
        "temp files left"
    );
}

/// After the refusal is over: the rest of the study is sent again, and the series is
/// analysed once with every instance and delivered under its id. Returns seconds from the
/// last response to the result.
fn assert_recovers(
    port: u16,
    acked: &[PathBuf],
    all: &[Source],
    sub: &Subscriber,
    logs: &dyn Fn() -> String,
) -> f64 {
    let rest = paths(all.iter().filter(|s| !acked.contains(&s.path)));
    let report = store(port, &rest);
    assert!(report.status.success(), "{}", report.log);
    let last = Instant::now();
    let series = &all[0].series;
    let candidates = complete_ids(all);
    sub.wait_for_within("the result", RESULT_TIMEOUT, |_| {
        one_of(&ids_on(sub, RESULT_TOPIC), &candidates).is_some()
    });
    let id = one_of(&ids_on(sub, RESULT_TOPIC), &candidates).unwrap();
    let took = last.elapsed().as_secs_f64();
    // Released once its study is forgotten (a short retention in these tests).
    wait_until("the series to be released", RESULT_TIMEOUT, || {
        !releases(&logs(), series).is_empty()
    });
    assert_eq!(
        analyses(&logs(), series),
        vec![all.len()],
        "one analysis, every instance"
    );
    assert_eq!(releases(&logs(), series), vec![all.len()]);
    let (result, _) = delivered(sub, &id);
    assert_eq!(result["series_instance_uid"], series.as_str());
    assert_documented_id(&result, all);
    took
}

/// A real ENOSPC: the spool is a 24 MiB tmpfs, filled by another file to ~6 MiB free; a
/// 128-slice study (16.5 MB) gets A700 once the disk is full, everything acknowledged
/// before is intact, and once the filler is deleted the same daemon takes the rest and
/// delivers the result. Skipped, with the reason printed, where tmpfs cannot be mounted
/// (the free-space floor test below runs everywhere).
#[test]
fn disk_full_on_a_tmpfs_spool_answers_a700_and_recovers_when_space_returns() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let mount = match Tmpfs::mount(&spool, 24) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED disk full on a tmpfs spool: {why}");
            return;
        }
    };
    let all = sources(&study(&tmp.path().join("a"), 7301, "C6", "1.5"));
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);
    let port = free_port();
    // No floor: the write itself must fail. A short retention: the spool ends empty.
    let config = serve_config_full(
        tmp.path(),
        port,
        &broker.url(),
        "min_free_space_mb = 0",
        RETENTION_2S,
        "",
    );
    let daemon = spawn_serve(&config, port, &["--quiet-period", QUIET_PERIOD]);

    // Another writer leaves ~6 MiB.
    let filler = spool.join(".filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0x5a_u8; 1 << 20];
        while mount.free_bytes() > (6 << 20) + (1 << 20) {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let free_before = mount.free_bytes();

    let report = store(port, &paths(&all));
    assert_refused_with_a700(&report, &all, &spool);
    assert!(
        daemon.wait_for_log("No space left on device", Duration::from_secs(10)),
        "the refusal comes from a real ENOSPC: {}",
        daemon.log()
    );
    assert!(report.acked.len() >= 10, "{}", report.log);

    // Space returns: the same daemon, no restart.
    std::fs::remove_file(&filler).unwrap();
    let took = assert_recovers(port, &report.acked, &all, &sub, &|| daemon.log());
    wait_until("the spool to be empty", RESULT_TIMEOUT, || {
        spooled(&spool).is_empty()
    });
    eprintln!(
        "tmpfs spool: {:.1} MiB free, {} of {} instances acknowledged, then A700 (ENOSPC); \
         after the clean-up the rest was taken and the result arrived {took:.1} s after the \
         last response (quiet period {QUIET_PERIOD} s)",
        free_before as f64 / (1 << 20) as f64,
        report.acked.len(),
        all.len()
    );
    drop(daemon);
}

/// The configured floor (`dicom.min_free_space_mb`) through the whole daemon, runnable
/// anywhere: half a study is acknowledged, the daemon restarts with a floor above the free
/// space and answers A700 to the rest while the first half stays intact in the spool, then
/// restarts with the floor lowered, takes the rest and delivers one result for the whole
/// series.
#[test]
fn below_the_free_space_floor_a700_keeps_what_was_acknowledged_and_recovers() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let all = sources(&study(&tmp.path().join("a"), 7401, "C4", "1.5"));
    let (half, _) = all.split_at(all.len() / 2);
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);
    let port = free_port();
    let spool = tmp.path().join("spool");
    let serve_args = ["--quiet-period", QUIET_PERIOD];
    let floor = |mb: u64| {
        serve_config_full(
            tmp.path(),
            port,
            &broker.url(),
            &format!("min_free_space_mb = {mb}"),
            RETENTION_2S,
            "",
        )
    };

    let mut daemon = spawn_serve(&floor(0), port, &serve_args);
    let report = store(port, &paths(half));
    assert!(report.status.success(), "{}", report.log);
    let mut acked = report.acked;
    daemon.kill9();

    // More than any disk has free.
    let mut daemon = spawn_serve(&floor(1 << 40), port, &serve_args);
    let report = store(
        port,
        &paths(all.iter().filter(|s| !acked.contains(&s.path))),
    );
    assert!(report.acked.is_empty(), "{}", report.log);
    assert_refused_with_a700(&report, &all, &spool);
    let on_disk = spooled(&spool);
    for s in half {
        assert_intact(s, &on_disk[&s.sop]);
    }
    assert!(
        daemon.log().contains("min_free_space_mb"),
        "{}",
        daemon.log()
    );
    daemon.kill9();
    acked.extend(report.acked);

    let daemon = spawn_serve(&floor(0), port, &serve_args);
    let took = assert_recovers(port, &acked, &all, &sub, &|| daemon.log());
    eprintln!(
        "free-space floor: {} acknowledged, A700 while the floor was above the free space, \
         result {took:.1} s after the last response once it was lowered",
        half.len()
    );
}
