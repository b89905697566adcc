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

/// `FAULTS_SEED` when set (to replay a run's random draws), else a fresh one.
fn faults_seed() -> u64 {
    std::env::var("FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
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

    let seed = faults_seed();
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

// ---------------------------------------------------------------- kill -9 through analysis

/// Where a kill can land, in pipeline order (what [`stages_at_kill`] reports).
const STAGES: [&str; 8] = [
    "start-up",
    "receiving",
    "quiet period",
    "volume building",
    "inference",
    "outbox commit",
    "spool mark",
    "publish",
];

/// What a kill aims at: a moment relative to the daemon's start, the scanner's responses,
/// the end of a study's stream or a line of the daemon's log.
#[derive(Debug, Clone, Copy)]
enum Aim {
    /// `ms` after the daemon was started (re-index, model, port), no scanner.
    StartUp { ms: u64 },
    /// `us` after the k-th Success response of this run (k = 0: after the scanner started).
    Response { k: usize, us: u64 },
    /// `us` after a study's stream ended in this run, or after "ready" when a complete series
    /// waits for its analysis: the quiet period.
    QuietPeriod { us: u64 },
    /// `us` after the first line of this run's log that contains `needle`.
    Log { needle: &'static str, us: u64 },
}

impl Aim {
    /// Draws one aim. Every kill draws the same numbers in the same order, so a seed replays
    /// the same draws (where they land depends on timing, as in the other kill test).
    /// Without `work_left` (every series' whole result is out) only start-up is left.
    fn draw(
        rng: &mut rand_chacha::ChaCha8Rng,
        max_k: usize,
        stream_left: bool,
        work_left: bool,
    ) -> Aim {
        let roll = rng.gen_range(0..100u32);
        let k = rng.gen_range(0..=max_k);
        let frac: f64 = rng.gen();
        let within = |max_us: f64| (frac * max_us) as u64;
        // When every instance is acknowledged, the draws meant for the stream go to the
        // later stages.
        let roll = if !work_left {
            0
        } else if !stream_left && (10..40).contains(&roll) {
            40 + (roll - 10) * 2
        } else {
            roll
        };
        match roll {
            0..=9 => Aim::StartUp {
                ms: within(400_000.0) / 1000,
            },
            10..=39 => Aim::Response {
                k,
                us: if k == 0 {
                    within(100_000.0)
                } else {
                    within(12_000.0)
                },
            },
            40..=49 => Aim::QuietPeriod {
                us: within(900_000.0),
            },
            // The series is complete: its volume is being built.
            50..=61 => Aim::Log {
                needle: ": analysing series ",
                us: within(150_000.0),
            },
            62..=75 => Aim::Log {
                needle: " inference starts",
                us: within(700_000.0),
            },
            // Inference has ended: verdict, key image, outbox commit.
            76..=85 => Aim::Log {
                needle: " model slices, ",
                us: within(10_000.0),
            },
            // The result is in the outbox: spool mark, publish, PUBACK, removal (a few ms
            // in all here).
            _ => Aim::Log {
                needle: " committed to the outbox as entry ",
                us: within(3_000.0),
            },
        }
    }
}

/// Whether the daemon has logged `needle` (without copying its log).
fn log_contains(daemon: &Proc, needle: &str) -> bool {
    daemon.log.lock().unwrap().contains(needle)
}

/// The message of a daemon log line (after env_logger's `[time LEVEL module] `).
fn message(line: &str) -> &str {
    line.split_once("] ").map_or(line, |(_, m)| m)
}

/// The first word (a UID) of `text` after `pat`, if `text` contains `pat`.
fn uid_after<'a>(text: &'a str, pat: &str) -> Option<&'a str> {
    let rest = &text[text.find(pat)? + pat.len()..];
    rest.split([' ', ':', ')', '(']).next()
}

/// The stages a daemon was in when it was killed, read from what it logged in that run
/// (`log`), with the series each concerns: `receiving` (the scanner's association was
/// sending) and `quiet` (series that had every instance in the spool, not yet analysed
/// whole, and not yet complete in this run) come from the test.
fn stages_at_kill(log: &str, receiving: bool, quiet: &[String]) -> Vec<(&'static str, String)> {
    let mut ready = false;
    // Series -> the stage its last line put it in.
    let mut state: BTreeMap<String, &'static str> = BTreeMap::new();
    let mut marks_pending: BTreeMap<String, i64> = BTreeMap::new();
    // Id -> series of results committed in this run and not yet delivered.
    let mut unpublished: BTreeMap<String, String> = BTreeMap::new();
    let mut from_before: i64 = 0;
    let mut completed: BTreeSet<String> = BTreeSet::new();
    for line in log.lines() {
        let msg = message(line);
        if msg == "ready" {
            ready = true;
        } else if msg.starts_with("series ") && msg.contains(" complete (") {
            let s = uid_after(msg, "series ").unwrap().to_string();
            completed.insert(s.clone());
            state.insert(s, "volume building");
        } else if let Some(s) = uid_after(msg, " for complete series ") {
            // Late instances (after a partial analysis): the series waits for a quiet period
            // again, while that analysis goes on.
            completed.remove(s);
        } else if let Some(s) = uid_after(msg, ": analysing series ") {
            completed.insert(s.to_string());
            state.insert(s.to_string(), "volume building");
        } else if msg.contains(" inference starts") {
            state.insert(uid_after(msg, "series ").unwrap().into(), "inference");
        } else if msg.contains(" model slices, ") {
            state.insert(uid_after(msg, "series ").unwrap().into(), "outbox commit");
        } else if msg.contains(" committed to the outbox as entry ") {
            let s = uid_after(msg, ", series ").unwrap().to_string();
            let id = uid_after(msg, "result ").unwrap().to_string();
            state.remove(&s);
            *marks_pending.entry(s.clone()).or_default() += 1;
            unpublished.insert(id, s);
        } else if msg.contains(" is already waiting in the outbox") {
            let s = uid_after(msg, "(series ").unwrap().to_string();
            state.remove(&s);
            *marks_pending.entry(s).or_default() += 1;
        } else if msg.starts_with("series ") && msg.contains(" is in the outbox): ") {
            *marks_pending
                .entry(uid_after(msg, "series ").unwrap().into())
                .or_default() -= 1;
        } else if let Some(s) = uid_after(msg, "cannot mark series ") {
            *marks_pending.entry(s.into()).or_default() -= 1;
        } else if msg.contains(" delivered: the broker acknowledged ") {
            let id = uid_after(msg, "result ").unwrap();
            if unpublished.remove(id).is_none() {
                from_before -= 1;
            }
        } else if msg.contains(" result(s) from a previous run still to publish") {
            from_before = uid_after(msg, ": ").unwrap().parse().unwrap();
        }
    }
    let mut stages = Vec::new();
    if !ready {
        // Nothing runs before the daemon is ready (the outbox is replayed, the recovered
        // series assembled, the port opened only then).
        stages.push(("start-up", String::new()));
        return stages;
    }
    if receiving {
        stages.push(("receiving", String::new()));
    }
    for s in quiet.iter().filter(|s| !completed.contains(*s)) {
        stages.push(("quiet period", s.clone()));
    }
    for (s, stage) in state {
        stages.push((stage, s));
    }
    for (s, n) in marks_pending {
        if n > 0 {
            stages.push(("spool mark", s));
        }
    }
    for s in unpublished.into_values() {
        stages.push(("publish", s));
    }
    if from_before > 0 {
        stages.push(("publish", "(from the outbox)".into()));
    }
    stages.sort_by_key(|(stage, _)| STAGES.iter().position(|s| s == stage));
    stages.dedup();
    stages
}

/// Distinct payloads per result id on `topic`, in order of arrival.
fn payloads_by_id(sub: &Subscriber, topic: &str) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut out: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for m in sub.on(topic) {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let copies = out
            .entry(v["id"].as_str().unwrap().to_string())
            .or_default();
        if !copies.contains(&m.payload) {
            copies.push(m.payload);
        }
    }
    out
}

fn published_at(result: &serde_json::Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(
        result["timings"]["published"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

/// The analysed mark of `series` in the spool (`<study>/<series>/.analysed.json`).
fn analysed_mark(spool: &Path, source: &Source) -> Option<serde_json::Value> {
    let path = spool
        .join(study_of(source))
        .join(&source.series)
        .join(".analysed.json");
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// kill -9 at 20 random moments while five studies are sent one after another, with a 1 s
/// quiet period, so that kills land in every stage a series goes through: receiving, the
/// quiet period, volume building, inference, the outbox commit, the spool's analysed mark
/// and the MQTT publish. Some kills are drawn relative to the scanner's responses, others
/// relative to lines the daemon logs as a series moves on (analysing, inference starts,
/// model slices, committed to the outbox), and the stage each kill landed in is read back
/// from the log. After each kill the daemon is restarted and the scanner re-sends what it
/// got no Success for.
///
/// What docs/ALERTS.md promises, and so what is asserted:
/// - every instance the scanner was told Success for is in the spool after every kill,
///   intact; at the end every instance is there (the default retention keeps them), none
///   rejected, and each series' analysed mark names its whole series and its full result;
/// - for every series a result of **all** its instances arrives, under the id the
///   documented formula gives for that instance set, and not `failed`; it is the series'
///   result with the latest `timings.published` (the one a dashboard shows);
/// - any other id that arrives is a revised-away earlier result of one of these series
///   with fewer instances: a restart gap longer than the quiet period completes a series
///   early. Allowed (a revision follows under a new id), counted and printed;
/// - copies of one id are byte-identical re-deliveries, or the same analysis done again
///   (a kill after the outbox commit and before the spool mark analyses the series again
///   after the restart: same instances, model and status, so the same id; only `timings`
///   differs). ALERTS.md allows both; the second is counted and printed, and must not
///   differ in anything but `timings`;
/// - `alert` carries exactly the `result` payloads of positive ids, nothing else;
/// - the outbox drains.
#[test]
fn kill_9_during_analysis_and_publishing_every_series_result_arrives() {
    const KILLS: usize = 20;
    const STUDIES: u64 = 5;
    /// How long a kill waits for its aim before it kills anyway.
    const AIM_TIMEOUT: Duration = Duration::from_secs(8);
    let _serial = one_at_a_time();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);

    // Five studies of ~110 slices (1.5 mm), every other one with a fracture.
    let fractures = ["C2", "none", "C5", "none", "C7"];
    let studies: Vec<Vec<Source>> = (0..STUDIES)
        .map(|i| {
            let dirs = study(
                &tmp.path().join(format!("s{i}")),
                7601 + i,
                fractures[i as usize % fractures.len()],
                "1.5",
            );
            sources(&dirs)
        })
        .collect();
    let all: Vec<Source> = studies.iter().flatten().cloned().collect();
    let sizes = series_sizes(&all);
    let source_of: HashMap<PathBuf, Source> =
        all.iter().map(|s| (s.path.clone(), s.clone())).collect();
    let label: HashMap<String, String> = studies
        .iter()
        .enumerate()
        .map(|(i, s)| (s[0].series.clone(), format!("s{}", i + 1)))
        .collect();
    let spool = tmp.path().join("spool");
    let outbox = tmp.path().join("outbox");
    let port = free_port();
    // The default retention (an hour): nothing leaves the spool during the test, so every
    // acknowledged instance must be found there after every kill.
    let config = serve_config_full(
        tmp.path(),
        port,
        &broker.url(),
        "",
        "completed_retention_secs = 3600.0",
        "",
    );
    let serve_args = ["--quiet-period", "1"];

    let seed = faults_seed();
    eprintln!("kill -9 through analysis: FAULTS_SEED={seed} (set it to replay the same aims)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let max_k = studies[0].len() / 6;

    let mut acked: BTreeSet<String> = BTreeSet::new();
    // Studies whose stream has begun: the scanner resumes those at once after a restart.
    let mut begun: BTreeSet<usize> = BTreeSet::new();
    let candidates: BTreeMap<String, BTreeSet<String>> = sizes
        .keys()
        .map(|s| (s.clone(), complete_ids(&of_series(&all, s))))
        .collect();
    let mut logs = String::new();
    let mut hits: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut stored_unanswered: BTreeSet<String> = BTreeSet::new();
    let storm = Instant::now();
    for kill in 1..=KILLS {
        let delivered_whole: BTreeSet<String> = {
            let got = ids_on(&sub, RESULT_TOPIC);
            candidates
                .iter()
                .filter(|(_, c)| one_of(&got, c).is_some())
                .map(|(series, _)| series.clone())
                .collect()
        };
        let stream_left = acked.len() < all.len();
        let work_left = stream_left || delivered_whole.len() < sizes.len();
        let aim = Aim::draw(&mut rng, max_k, stream_left, work_left);
        // The scanner's pause between two studies in this run, counted from the moment the
        // earlier study is complete in the daemon (its quiet period over): short ones make
        // the next stream overlap the analysis.
        let pause = Duration::from_millis(rng.gen_range(0..1500));
        let mut next_study_at: Option<Instant> = None;
        let spawned = Instant::now();
        let mut daemon = match aim {
            Aim::StartUp { .. } => Proc::spawn(serve_command(&config, &serve_args)),
            _ => spawn_serve(&config, port, &serve_args),
        };
        // Series acknowledged whole and not yet analysed whole when this run starts: their
        // quiet period runs again after the restart.
        let waiting_at_start = sizes.iter().any(|(series, &n)| {
            let of = of_series(&all, series);
            of.iter().all(|s| acked.contains(&s.sop))
                && analysed_mark(&spool, &of[0])
                    .is_none_or(|m| m["sop_instance_uids"].as_array().map(Vec::len) != Some(n))
        });
        let mut scu: Option<(usize, Scu)> = None;
        let mut run_acked: Vec<PathBuf> = Vec::new();
        let mut responses_before = 0; // Success responses of finished associations
        let mut scanner_started: Option<Instant> = None;
        let mut stream_ended: Option<Instant> = None;
        let mut trigger: Option<(Instant, String)> = None;
        let (moment, receiving);
        loop {
            let now = Instant::now();
            // The scanner: one association per study, the studies in order; an interrupted
            // study is resumed at once, a new one starts `pause` after the one before is
            // complete in this run (or its whole result was out before the run), so that
            // the stream does not run far ahead of the analyses.
            if let Some((i, s)) = &mut scu {
                if s.exited() {
                    let i = *i;
                    let report = scu.take().unwrap().1.finish();
                    assert!(report.refused.is_empty(), "{:?}", report.refused);
                    assert!(report.status.success(), "study {i}: {}", report.log);
                    responses_before += report.acked.len();
                    acked.extend(report.acked.iter().map(|p| source_of[p].sop.clone()));
                    run_acked.extend(report.acked);
                    stream_ended.get_or_insert(now);
                }
            }
            if scu.is_none() && !matches!(aim, Aim::StartUp { .. }) {
                let next = studies
                    .iter()
                    .position(|st| st.iter().any(|s| !acked.contains(&s.sop)));
                if let Some(i) = next {
                    if next_study_at.is_none() && !begun.contains(&i) {
                        let before = i.checked_sub(1).map(|b| &studies[b][0]);
                        let gate_open = before.is_none_or(|b| {
                            delivered_whole.contains(&b.series)
                                || log_contains(
                                    &daemon,
                                    &format!(
                                        "series {} of study {} complete (",
                                        b.series,
                                        study_of(b)
                                    ),
                                )
                        });
                        if gate_open {
                            next_study_at = Some(now + pause);
                        }
                    }
                    if begun.contains(&i) || next_study_at.is_some_and(|t| now >= t) {
                        begun.insert(i);
                        next_study_at = None;
                        let files = paths(studies[i].iter().filter(|s| !acked.contains(&s.sop)));
                        scu = Some((i, Scu::start(port, &files)));
                        scanner_started.get_or_insert(now);
                    }
                }
            }
            // The aim.
            if trigger.is_none() {
                trigger = match aim {
                    Aim::StartUp { ms } => Some((
                        spawned + Duration::from_millis(ms),
                        format!("{ms} ms after start-up began"),
                    )),
                    Aim::Response { k: 0, us } => scanner_started.map(|t| {
                        (
                            t + Duration::from_micros(us),
                            format!("{:.1} ms after the scanner started", us as f64 / 1e3),
                        )
                    }),
                    Aim::Response { k, us } => {
                        let n = responses_before + scu.as_ref().map_or(0, |(_, s)| s.successes());
                        // Fewer than k left: after the last one.
                        (n >= k || acked.len() == all.len()).then(|| {
                            (
                                now + Duration::from_micros(us),
                                format!("{:.1} ms after response {k}", us as f64 / 1e3),
                            )
                        })
                    }
                    Aim::QuietPeriod { us } => {
                        let ready = waiting_at_start && log_contains(&daemon, "] ready");
                        stream_ended.or(ready.then_some(now)).map(|t| {
                            (
                                t + Duration::from_micros(us),
                                format!(
                                    "{:.0} ms after a study's last instance or the restart",
                                    us as f64 / 1e3
                                ),
                            )
                        })
                    }
                    Aim::Log { needle, us } => log_contains(&daemon, needle).then(|| {
                        (
                            now + Duration::from_micros(us),
                            format!("{:.1} ms after \"{}\"", us as f64 / 1e3, needle.trim()),
                        )
                    }),
                };
                if trigger.is_none() && now.duration_since(spawned) > AIM_TIMEOUT {
                    trigger = Some((now, format!("{aim:?} not reached in {AIM_TIMEOUT:?}")));
                }
            }
            if let Some((at, what)) = &trigger {
                if now >= *at {
                    moment = what.clone();
                    receiving = scu.as_mut().is_some_and(|(_, s)| !s.exited());
                    break;
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        daemon.kill9();
        daemon.wait_exit(Duration::from_secs(10));
        let log = daemon.log();
        logs.push_str(&log);
        if let Some((_, s)) = scu.take() {
            let report = s.finish();
            assert!(
                report.refused.is_empty(),
                "kill {kill}: {:?}",
                report.refused
            );
            acked.extend(report.acked.iter().map(|p| source_of[p].sop.clone()));
            run_acked.extend(report.acked);
        }

        // Every instance acknowledged so far is in the spool; those of this run intact.
        let on_disk = spooled(&spool);
        for sop in &acked {
            assert!(
                on_disk.contains_key(sop),
                "kill {kill} ({moment}): instance {sop} was acknowledged but is not in the spool"
            );
        }
        for path in &run_acked {
            let source = &source_of[path];
            assert_intact(source, &on_disk[&source.sop]);
        }
        stored_unanswered.extend(on_disk.keys().filter(|s| !acked.contains(*s)).cloned());

        // Where it landed.
        let quiet: Vec<String> = sizes
            .iter()
            .filter(|(series, &n)| {
                let of = of_series(&all, series);
                of.iter().filter(|s| on_disk.contains_key(&s.sop)).count() == n
                    && analysed_mark(&spool, &of[0])
                        .is_none_or(|m| m["sop_instance_uids"].as_array().map(Vec::len) != Some(n))
            })
            .map(|(series, _)| series.clone())
            .collect();
        let stages = stages_at_kill(&log, receiving, &quiet);
        let mut landed: Vec<&str> = stages.iter().map(|(stage, _)| *stage).collect();
        landed.dedup();
        for stage in &landed {
            *hits.entry(stage).or_default() += 1;
        }
        let described: Vec<String> = stages
            .iter()
            .map(|(stage, series)| match label.get(series) {
                Some(l) => format!("{stage} {l}"),
                None if series.is_empty() => stage.to_string(),
                None => format!("{stage} {series}"),
            })
            .collect();
        eprintln!(
            "kill {kill:2} ({moment}): {}; {} acknowledged in this run, {}/{} in total",
            if described.is_empty() {
                "nothing in progress".to_string()
            } else {
                described.join(", ")
            },
            run_acked.len(),
            acked.len(),
            all.len()
        );
    }
    let storm = storm.elapsed();

    // Final start: the scanner sends what it has no Success for, study by study.
    let final_start = Instant::now();
    let daemon = spawn_serve(&config, port, &serve_args);
    let mut sent_at_the_end = 0;
    for study in &studies {
        let rest = paths(study.iter().filter(|s| !acked.contains(&s.sop)));
        if rest.is_empty() {
            continue;
        }
        let report = store(port, &rest);
        assert!(report.status.success(), "final send: {}", report.log);
        acked.extend(report.acked.iter().map(|p| source_of[p].sop.clone()));
        sent_at_the_end += report.acked.len();
    }
    assert_eq!(acked.len(), all.len(), "every instance acknowledged");

    sub.wait_for_within(
        "a whole-series result for each series",
        RESULT_TIMEOUT,
        |_| {
            let got = ids_on(&sub, RESULT_TOPIC);
            candidates.values().all(|c| one_of(&got, c).is_some())
        },
    );
    let time_to_results = final_start.elapsed();
    wait_until("the outbox to drain", RESULT_TIMEOUT, || {
        outbox_ids(&outbox).is_empty()
    });
    // The mark of the last series is written after its commit: wait for it too.
    wait_until("every series marked analysed whole", RESULT_TIMEOUT, || {
        studies.iter().all(|st| {
            analysed_mark(&spool, &st[0])
                .and_then(|m| m["sop_instance_uids"].as_array().map(Vec::len))
                == Some(st.len())
        })
    });
    logs.push_str(&daemon.log());
    let total = started.elapsed();

    // The spool: everything, nothing rejected, each series marked with its full result.
    let on_disk = spooled(&spool);
    assert_eq!(on_disk.len(), all.len(), "every instance is in the spool");
    assert!(
        spool_rejected(&spool).is_empty(),
        "the re-index rejected files: {:?}",
        spool_rejected(&spool)
    );

    // The results.
    let results = payloads_by_id(&sub, RESULT_TOPIC);
    let alerts = payloads_by_id(&sub, ALERT_TOPIC);
    let parse = |p: &[u8]| serde_json::from_slice::<serde_json::Value>(p).unwrap();
    let mut full: BTreeMap<String, String> = BTreeMap::new(); // series -> id
    let mut partial: Vec<(String, u64)> = Vec::new(); // (series label, instances)
    let mut analysed_again = 0;
    let mut latest: BTreeMap<String, (time::OffsetDateTime, String)> = BTreeMap::new();
    for (id, copies) in &results {
        let first = parse(&copies[0]);
        let series = first["series_instance_uid"].as_str().unwrap().to_string();
        assert!(
            sizes.contains_key(&series),
            "a result for no series sent: {first}"
        );
        if candidates[&series].contains(id) {
            assert_documented_id(&first, &of_series(&all, &series));
            assert_ne!(first["status"], "failed", "{first}");
            full.insert(series.clone(), id.clone());
        } else {
            let n = first["instances"].as_u64().unwrap();
            assert!(
                n < sizes[&series] as u64,
                "result {id} is neither the whole series' nor an earlier partial one: {first}"
            );
            partial.push((label[&series].clone(), n));
        }
        if copies.len() > 1 {
            let mut bare: Vec<serde_json::Value> = copies.iter().map(|c| parse(c)).collect();
            for v in &mut bare {
                v.as_object_mut().unwrap().remove("timings");
            }
            assert!(
                bare.iter().all(|v| v == &bare[0]),
                "copies of result {id} differ in more than their timings:\n{}",
                copies
                    .iter()
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            analysed_again += 1;
        }
        for copy in copies {
            let at = published_at(&parse(copy));
            let entry = latest.entry(series.clone()).or_insert((at, id.clone()));
            if at > entry.0 {
                *entry = (at, id.clone());
            }
        }
        if first["status"] == "positive" {
            assert_eq!(
                alerts.get(id),
                Some(copies),
                "alert copies of positive {id}"
            );
        } else {
            assert!(
                !alerts.contains_key(id),
                "alert for a {} result",
                first["status"]
            );
        }
    }
    assert!(
        alerts.keys().all(|id| results.contains_key(id)),
        "an alert without its result"
    );
    for (series, id) in &full {
        assert_eq!(
            &latest[series].1, id,
            "series {series}: the whole-series result is the latest published"
        );
        let mark = analysed_mark(&spool, &of_series(&all, series)[0]).unwrap();
        assert_eq!(mark["result_id"], id.as_str(), "{mark}");
    }
    assert_eq!(full.len(), sizes.len());

    // The kills did reach past the stream (the aims make about half of them wait for a
    // series' analysis).
    let later: usize = STAGES[3..]
        .iter()
        .map(|s| hits.get(s).copied().unwrap_or(0))
        .sum();
    assert!(
        later >= 3,
        "only {later} kills landed after a series was complete: {hits:?}"
    );
    let hits_line: Vec<String> = STAGES
        .iter()
        .map(|s| format!("{s} {}", hits.get(s).copied().unwrap_or(0)))
        .collect();
    eprintln!(
        "kill -9 x {KILLS} through analysis in {:.1} s: {} instances in {} series, 0 \
         acknowledged instances missing after any kill ({} stored but unanswered at a kill, {} \
         re-sent instances answered from the spool); kills per stage: {}; final start: {} \
         instances sent, every series' whole result out {:.1} s after it; {} earlier partial \
         result(s) (series, instances) {:?}; {} id(s) delivered again from a second analysis \
         (same id, other timings), {} found theirs still in the outbox; {} commits in all; \
         test {:.1} s",
        storm.as_secs_f64(),
        all.len(),
        sizes.len(),
        stored_unanswered.len(),
        logs.matches("is already in the spool").count(),
        hits_line.join(", "),
        sent_at_the_end,
        time_to_results.as_secs_f64(),
        partial.len(),
        partial,
        analysed_again,
        logs.matches(" is already waiting in the outbox").count(),
        logs.matches(" committed to the outbox as entry ").count(),
        total.as_secs_f64()
    );
}

// ---------------------------------------------------------------- broker down

/// A dashboard subscribed while the broker was still up, with a persistent session (the
/// broker keeps its subscription and queues QoS 1 messages for it, docs/ALERTS.md), then
/// the broker stopped: `broker.restart()` brings it back on the same port.
fn dashboard_then_broker_down(client_id: &'static str) -> (Mosquitto, Subscriber) {
    let mut broker = Mosquitto::start();
    let sub = Subscriber::start_with(
        broker.port,
        TOPICS,
        SubOptions {
            client_id,
            persistent: true,
            ..SubOptions::default()
        },
    );
    broker.stop();
    (broker, sub)
}

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
    let (mut broker, sub) = dashboard_then_broker_down("faults-dashboard");
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
    // FAULTS_OUTAGE_SECS=180 holds the broker down for minutes (the issue's outage; not
    // the default, to keep the test short: nothing in the daemon depends on the length
    // beyond the reconnect backoff cap).
    if let Some(secs) = std::env::var("FAULTS_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
    {
        let hold = Duration::from_secs_f64(secs);
        while down.elapsed() < hold {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            outbox_ids(&outbox),
            [id1.clone(), id2.clone()],
            "still queued"
        );
    }
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

// ---------------------------------------------------------------- commit before mark

/// A crash between the outbox commit of a result and the spool's analysed mark of its
/// series (the window the kill test through analysis hits about once in 20 kills). Made
/// deterministic here: the broker is down, so the result waits in the outbox; the daemon
/// is killed after the mark and the mark is deleted, as if the kill had come before it.
/// The restart finds the waiting result, marks the series from it and does not analyse it
/// again: one commit, one analysis, and the subscriber gets byte-identical copies of one
/// payload (before, the series was analysed again and a second copy of the id went out
/// with other `timings`).
#[test]
fn a_result_committed_before_its_series_was_marked_is_not_analysed_again() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let (mut broker, sub) = dashboard_then_broker_down("faults-commit-mark");
    let all = sources(&study(&tmp.path().join("a"), 7501, "C5", "1.5"));
    let ids = complete_ids(&all);
    let outbox = tmp.path().join("outbox");
    let spool = tmp.path().join("spool");
    let port = free_port();
    let config = serve_config(tmp.path(), port, &broker.url(), "reconnect_max_secs = 1.0");
    let serve_args = ["--quiet-period", "2"];
    let mut daemon = spawn_serve(&config, port, &serve_args);
    let report = store(port, &paths(&all));
    assert!(report.status.success(), "{}", report.log);
    let series = &all[0].series;
    wait_until("the series marked analysed", RESULT_TIMEOUT, || {
        !analyses(&daemon.log(), series).is_empty()
    });
    let id = outbox_ids(&outbox)
        .into_iter()
        .find(|i| ids.contains(i))
        .expect("the result waits in the outbox");
    let mut logs = daemon.log();
    daemon.kill9();
    let mark = spool
        .join(study_of(&all[0]))
        .join(series)
        .join(".analysed.json");
    std::fs::remove_file(&mark).unwrap_or_else(|e| panic!("{}: {e}", mark.display()));

    let daemon = spawn_serve(&config, port, &serve_args);
    assert!(
        daemon.wait_for_log(
            &format!("result {id} waits in the outbox but the series was not marked"),
            RESULT_TIMEOUT
        ),
        "{}",
        daemon.log()
    );
    broker.restart();
    sub.wait_for_within("the result", RESULT_TIMEOUT, |_| {
        ids_on(&sub, RESULT_TOPIC).contains(&id)
    });
    wait_until("the outbox to drain", RESULT_TIMEOUT, || {
        outbox_ids(&outbox).is_empty()
    });
    // Longer than the quiet period: an analysis after the restart would have come by now.
    std::thread::sleep(Duration::from_secs(5));
    logs.push_str(&daemon.log());
    assert_eq!(commits(&logs, &id), 1, "committed once");
    assert_eq!(analyses(&logs, series), vec![all.len()], "analysed once");
    assert!(
        !daemon.log().contains("inference starts"),
        "{}",
        daemon.log()
    );
    assert_eq!(
        ids_on(&sub, RESULT_TOPIC),
        [id.clone()].into_iter().collect()
    );
    let (result, copies) = delivered(&sub, &id);
    assert_documented_id(&result, &all);
    eprintln!("commit before mark: mark restored from the outbox; {copies} identical copies");
}

// ---------------------------------------------------------------- fallback series

/// Rewrites a generated study as two series of one study, in `out/soft` and `out/bone`:
/// the original with a soft-tissue kernel, and a copy (new series and SOP Instance UIDs)
/// with a bone kernel, which ranks first, missing a slice in the middle, so that it
/// cannot be built and the soft series is analysed as its fallback.
fn soft_and_broken_bone(study_dir: &Path, out: &Path) -> (Vec<Source>, Vec<Source>) {
    let script = r#"
import sys, pathlib, pydicom
from pydicom.uid import generate_uid
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
files = sorted(src.glob("*.dcm"), key=lambda p: int(p.stem))
(out / "soft").mkdir(parents=True); (out / "bone").mkdir()
bone_series = generate_uid()
for k, f in enumerate(files):
    ds = pydicom.dcmread(f)
    ds.ConvolutionKernel = "STANDARD"
    ds.save_as(out / "soft" / f.name)
    if k == len(files) // 2:
        continue
    ds.ConvolutionKernel = "BONE"
    ds.SeriesInstanceUID = bone_series
    ds.SeriesNumber = int(ds.get("SeriesNumber", 1)) + 1
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out / "bone" / f.name)
"#;
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(study_dir)
        .arg(out)
        .status()
        .expect("python3 with pydicom");
    assert!(status.success());
    (sources(&[out.join("soft")]), sources(&[out.join("bone")]))
}

/// The best series of a study (bone kernel) cannot be built (a missing slice) and its
/// fallback (soft kernel) is analysed: its result marks both series in the spool, so
/// that a restart within the retention neither analyses the soft series again nor tries
/// the broken bone series on its own (which used to publish its `failed` result as a new
/// revision of the study).
#[test]
fn after_a_restart_a_series_its_fallback_stood_in_for_is_not_tried_again() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let generated = study(&tmp.path().join("gen"), 7401, "none", "1.5");
    let (soft, bone) = soft_and_broken_bone(&generated[0], &tmp.path().join("two"));
    // The copies lie outside synth's `train_images/<study>/`: the study from the original.
    let study_uid = study_of(&sources(&generated)[0]);
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);
    let port = free_port();
    let config = serve_config(tmp.path(), port, &broker.url(), "");
    let serve_args = ["--quiet-period", "2"];
    let mut daemon = spawn_serve(&config, port, &serve_args);
    let report = store(port, &paths(soft.iter().chain(&bone)));
    assert!(report.status.success(), "{}", report.log);
    let soft_ids = complete_ids(&soft);
    sub.wait_for_within("the fallback's result", RESULT_TIMEOUT, |_| {
        one_of(&ids_on(&sub, RESULT_TOPIC), &soft_ids).is_some()
    });
    assert!(
        daemon.wait_for_log(
            &format!("series {} (could not be built", bone[0].series),
            RESULT_TIMEOUT
        ),
        "the broken series is marked with the fallback's result: {}",
        daemon.log()
    );
    let first_log = daemon.log();
    assert!(
        first_log.contains("analysing fallback series"),
        "{first_log}"
    );

    // Restart within the retention (an hour by default).
    daemon.kill9();
    let daemon = spawn_serve(&config, port, &serve_args);
    for series in [&soft[0].series, &bone[0].series] {
        assert!(
            daemon.wait_for_log(
                &format!("series {series} of study {study_uid}"),
                RESULT_TIMEOUT
            ),
            "{}",
            daemon.log()
        );
    }
    // Quiet period, study quiet period and a build would be over by now.
    std::thread::sleep(Duration::from_secs(8));
    let ids = ids_on(&sub, RESULT_TOPIC);
    assert_eq!(ids.len(), 1, "one result in all, the fallback's: {ids:?}");
    let log = daemon.log();
    assert!(
        log.matches("already analysed").count() >= 2,
        "both series remembered as analysed: {log}"
    );
    assert!(!log.contains("analysing fallback series"), "{log}");
    eprintln!(
        "fallback: {} bone instances (one missing) and {} soft; one result before the \
         restart, none after",
        bone.len(),
        soft.len()
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

    /// [`Tmpfs::mount`], or `None` after printing `SKIPPED <what>: <why>` (the test then
    /// returns: it needs a tmpfs).
    fn mount_or_skip(dir: &Path, mib: u64, what: &str) -> Option<Tmpfs> {
        Tmpfs::mount(dir, mib)
            .inspect_err(|why| eprintln!("SKIPPED {what}: {why}"))
            .ok()
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
    let Some(mount) = Tmpfs::mount_or_skip(&spool, 24, "disk full on a tmpfs spool") else {
        return;
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

/// A spool short of space (below twice `min_free_space_mb`, above the floor itself): an
/// analysed study is released as soon as its result is committed, not an hour later
/// (`completed_retention_secs = 3600`), so that the next study is not refused. A tmpfs 8
/// MiB larger than the study, floor 5 MiB: the study is accepted whole and leaves about
/// 7.5 MiB, below 10. Skipped, with the reason printed, where tmpfs cannot be mounted.
#[test]
fn short_of_space_an_analysed_study_is_released_before_its_retention() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let all = sources(&study(&tmp.path().join("a"), 7302, "C4", "1.5"));
    let study_bytes: u64 = all
        .iter()
        .map(|s| std::fs::metadata(&s.path).unwrap().len())
        .sum();
    // The study plus 8 MiB: it leaves about 7.5 MiB once spooled.
    let Some(mount) = Tmpfs::mount_or_skip(
        &spool,
        study_bytes.div_ceil(1 << 20) + 8,
        "spool short of space on a tmpfs",
    ) else {
        return;
    };
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);
    let port = free_port();
    let config = serve_config_full(
        tmp.path(),
        port,
        &broker.url(),
        "min_free_space_mb = 5",
        "completed_retention_secs = 3600.0",
        "",
    );
    let daemon = spawn_serve(&config, port, &[]);
    let free_before = mount.free_bytes();
    assert!(
        free_before > 10 << 20,
        "{free_before} bytes free before the study"
    );

    let report = store(port, &paths(&all));
    assert!(report.status.success(), "{}", report.log);
    assert_eq!(report.acked.len(), all.len(), "{}", report.log);
    let free_after = mount.free_bytes();
    assert!(
        (5 << 20..10 << 20).contains(&free_after),
        "the study must leave the spool between the floor and twice it: {free_after} bytes"
    );
    let last = Instant::now();
    let candidates = complete_ids(&all);
    sub.wait_for_within("the result", RESULT_TIMEOUT, |_| {
        one_of(&ids_on(&sub, RESULT_TOPIC), &candidates).is_some()
    });
    wait_until("the spool to be empty", Duration::from_secs(60), || {
        spooled(&spool).is_empty()
    });
    let released = last.elapsed().as_secs_f64();
    let log = daemon.log();
    assert!(log.contains("spool short of space"), "{log}");
    let series = &all[0].series;
    assert_eq!(analyses(&log, series), vec![all.len()], "one analysis");
    assert_eq!(
        releases(&log, series),
        vec![all.len()],
        "released whole, once"
    );
    assert!(mount.free_bytes() > 10 << 20, "the space came back");
    eprintln!(
        "spool short of space: {:.1} MiB free after {} instances (floor 5 MiB); result \
         committed and the study released {released:.1} s after the last response, \
         retention 3600 s",
        free_after as f64 / (1 << 20) as f64,
        all.len()
    );
    drop(daemon);
}

/// Fills the file system of `dir` (a small tmpfs) with `dir/.filler` until a write fails
/// with ENOSPC: not one page is left for anyone else.
fn fill_up(dir: &Path) -> PathBuf {
    use std::io::Write;
    let filler = dir.join(".filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    for size in [1 << 16, 1 << 12, 1] {
        let chunk = vec![0x5a_u8; size];
        loop {
            match f.write(&chunk) {
                Ok(n) if n == chunk.len() => {}
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", dir.display()),
            }
        }
    }
    filler
}

/// Lines of `log` from byte `from` on that contain `needle`.
fn lines_with<'a>(log: &'a str, from: usize, needle: &str) -> Vec<&'a str> {
    log[from..].lines().filter(|l| l.contains(needle)).collect()
}

/// The result id in an outbox write failure line ("cannot write result <id> to the outbox").
fn failed_id(line: &str) -> String {
    uid_after(line, "cannot write result ").unwrap().to_string()
}

/// A real ENOSPC under the outbox: the outbox directory is a 1 MiB tmpfs (mounted when the
/// test runs as root and `mount -t tmpfs` works, otherwise it prints `SKIPPED ...` and
/// returns), filled to the last page by another file, so that committing a result fails.
///
/// First without a restart: the commit failure is logged with the id and the ENOSPC and
/// retried (every 5 s), nothing is published, the series is neither marked analysed nor
/// released from the spool (its 2 s retention passes meanwhile), and the outbox holds no
/// entry or temp file; once the filler is deleted the same daemon commits the result
/// (`timings.published` is after the space returned), marks the series, delivers the
/// result under its documented id and releases the series.
///
/// Then a second study while the disk is full again, and kill -9 while its commit fails;
/// a restart while the disk is still full (the daemon starts, analyses the series again
/// from the spool and logs the same failure), kill -9 again; space returns, a restart:
/// the result arrives, committed once, under its documented id; the first study is
/// neither analysed nor delivered again.
#[test]
fn disk_full_under_the_outbox_holds_the_result_until_space_returns_even_across_kills() {
    let _serial = one_at_a_time();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let outbox = tmp.path().join("outbox");
    let Some(mount) = Tmpfs::mount_or_skip(&outbox, 1, "disk full under the outbox") else {
        return;
    };
    let first = sources(&study(&tmp.path().join("a"), 7701, "C3", "1.5"));
    let second = sources(&study(&tmp.path().join("b"), 7702, "none", "1.5"));
    let (ids1, ids2) = (complete_ids(&first), complete_ids(&second));
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);
    let port = free_port();
    let spool = tmp.path().join("spool");
    // A short retention: a series whose result is committed leaves the spool 2 s after
    // its last instance; one whose result is not committed must stay.
    let config = serve_config_full(tmp.path(), port, &broker.url(), "", RETENTION_2S, "");
    let serve_args = ["--quiet-period", "1"];
    let failure = "cannot write result ";
    let mut logs = String::new();

    // 1. Full, then space returns; the same daemon.
    let mut daemon = spawn_serve(&config, port, &serve_args);
    let filler = fill_up(&outbox);
    assert_eq!(mount.free_bytes(), 0);
    let report = store(port, &paths(&first));
    assert!(report.status.success(), "{}", report.log);
    let full_at = Instant::now();
    // Two failed attempts: logged, and retried.
    wait_until("two failed commits", RESULT_TIMEOUT, || {
        daemon.log().matches(failure).count() >= 2
    });
    let log = daemon.log();
    let failures = lines_with(&log, 0, failure);
    for line in &failures {
        assert!(line.contains("No space left on device"), "{line}");
        assert!(line.contains("retrying in 5 s"), "{line}");
        assert!(ids1.contains(&failed_id(line)), "{line}");
    }
    let id1 = failed_id(failures[0]);
    let example = message(failures[0]).to_string();
    // Nothing committed, published, marked or released; the spool holds the series.
    assert!(!log.contains(" committed to the outbox"), "{log}");
    assert_eq!(outbox_ids(&outbox), Vec::<String>::new());
    let leftovers: Vec<String> = std::fs::read_dir(&outbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".lock" && n != ".filler")
        .collect();
    assert!(leftovers.is_empty(), "outbox files: {leftovers:?}");
    assert!(
        analysed_mark(&spool, &first[0]).is_none(),
        "marked before its commit"
    );
    assert!(analyses(&log, &first[0].series).is_empty());
    assert!(
        releases(&log, &first[0].series).is_empty(),
        "released before its commit"
    );
    assert_eq!(spooled(&spool).len(), first.len());
    assert!(sub.on(RESULT_TOPIC).is_empty());
    let waited = full_at.elapsed();

    std::fs::remove_file(&filler).unwrap();
    let space_back = time::OffsetDateTime::now_utc();
    let space_back_at = Instant::now();
    sub.wait_for_within("the first result", RESULT_TIMEOUT, |_| {
        ids_on(&sub, RESULT_TOPIC).contains(&id1)
    });
    let took1 = space_back_at.elapsed();
    wait_until("the first series released", RESULT_TIMEOUT, || {
        !releases(&daemon.log(), &first[0].series).is_empty()
    });
    wait_until("the outbox to drain", RESULT_TIMEOUT, || {
        outbox_ids(&outbox).is_empty()
    });
    let log = daemon.log();
    let (r1, n1) = delivered(&sub, &id1);
    assert_documented_id(&r1, &first);
    assert!(
        published_at(&r1) > space_back,
        "published is the commit: {r1}"
    );
    assert_eq!(commits(&log, &id1), 1);
    assert_eq!(analyses(&log, &first[0].series), vec![first.len()]);
    assert_eq!(releases(&log, &first[0].series), vec![first.len()]);
    // In that order: the failures, the commit, the mark, the release.
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle}: {log}"))
    };
    assert!(at(failure) < at(" committed to the outbox"));
    assert!(at(" committed to the outbox") < at("analysed instances marked in the spool"));
    assert!(at("analysed instances marked in the spool") < at("(study forgotten)"));
    let failed_attempts1 = log.matches(failure).count();

    // 2. Full again: kill -9 while the second result cannot be committed.
    let filler = fill_up(&outbox);
    let from = daemon.log().len();
    let report = store(port, &paths(&second));
    assert!(report.status.success(), "{}", report.log);
    wait_until("the second result's commit to fail", RESULT_TIMEOUT, || {
        !lines_with(&daemon.log(), from, failure).is_empty()
    });
    let id2 = failed_id(lines_with(&daemon.log(), from, failure)[0]);
    assert!(ids2.contains(&id2));
    daemon.kill9();
    logs.push_str(&daemon.log());
    assert_eq!(outbox_ids(&outbox), Vec::<String>::new());
    assert!(analysed_mark(&spool, &second[0]).is_none());
    assert_eq!(
        spooled(&spool).len(),
        second.len(),
        "the second series waits in the spool"
    );

    // Restarted while the disk is still full: it starts, analyses the series again from
    // the spool, and cannot commit it either.
    let mut daemon = spawn_serve(&config, port, &serve_args);
    wait_until(
        "the commit to fail after the restart",
        RESULT_TIMEOUT,
        || {
            lines_with(&daemon.log(), 0, failure)
                .iter()
                .any(|l| failed_id(l) == id2 && l.contains("No space left on device"))
        },
    );
    daemon.kill9();
    logs.push_str(&daemon.log());
    assert_eq!(outbox_ids(&outbox), Vec::<String>::new());

    // Space returns, then a restart.
    std::fs::remove_file(&filler).unwrap();
    let restart = Instant::now();
    let daemon = spawn_serve(&config, port, &serve_args);
    sub.wait_for_within("the second result", RESULT_TIMEOUT, |_| {
        ids_on(&sub, RESULT_TOPIC).contains(&id2)
    });
    let took2 = restart.elapsed();
    wait_until("the outbox to drain", RESULT_TIMEOUT, || {
        outbox_ids(&outbox).is_empty()
    });
    wait_until("the spool to be empty", RESULT_TIMEOUT, || {
        spooled(&spool).is_empty() && !releases(&daemon.log(), &second[0].series).is_empty()
    });
    logs.push_str(&daemon.log());
    let (r2, n2) = delivered(&sub, &id2);
    assert_documented_id(&r2, &second);
    assert_eq!(
        ids_on(&sub, RESULT_TOPIC),
        BTreeSet::from([id1.clone(), id2.clone()]),
        "nothing else"
    );
    assert_eq!(
        delivered(&sub, &id1).1,
        n1,
        "the first result is not delivered again"
    );
    assert_eq!(commits(&logs, &id2), 1, "committed once");
    assert_eq!(
        commits(&logs, &id1),
        1,
        "the first series is not analysed again"
    );
    assert_eq!(analyses(&logs, &first[0].series), vec![first.len()]);
    assert_eq!(analyses(&logs, &second[0].series), vec![second.len()]);
    assert_eq!(releases(&logs, &second[0].series), vec![second.len()]);
    eprintln!(
        "outbox on a full 1 MiB tmpfs: {failed_attempts1} failed commits of the first result in \
         {:.1} s (ENOSPC, logged, retried every 5 s; series neither marked nor released), \
         result delivered {:.1} s after the space returned, without a restart, {n1} cop(y/ies); \
         second result: {} failed commits across two runs killed with SIGKILL (one started on \
         the full disk), delivered {:.1} s after the restart that followed the clean-up, {n2} \
         cop(y/ies), committed once; test {:.1} s; the log said: {example}",
        waited.as_secs_f64(),
        took1.as_secs_f64(),
        logs.matches(failure).count() - failed_attempts1,
        took2.as_secs_f64(),
        started.elapsed().as_secs_f64(),
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
