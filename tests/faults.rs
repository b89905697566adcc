//! Fault tolerance through the whole daemon, as a site suffers it: the real
//! `cspine-triage serve` process, DCMTK `storescu` as the scanner, a real mosquitto broker
//! and a paho-mqtt subscriber as the dashboard. Studies come from `cspine-triage synth`.
//!
//! What each test proves, and what it measured, is in docs/RELIABILITY.md. These tests
//! assert delivery, ids and instance counts, not the clinical status (that is checked in
//! tests/inference.rs and tests/end_to_end.rs). They run one at a time (they kill processes and time things on a
//! small machine): see [`one_at_a_time`]. `--nocapture` shows the measurements.
//!
//! What the daemon did is read from its event file (`[service] events_path`,
//! docs/events.schema.json), from the spool and outbox directories and from what the
//! dashboard received, never from the wording of its log; the log is printed when a test
//! fails ([`site::Site`]).
//!
//! Where things are (`tests/faults/`): `site.rs` (the daemon under test: config, starts,
//! events, logs), `studies.rs` (generated studies and the spool), `results.rs` (result ids,
//! the outbox, what the dashboard got), `scu.rs` (the scanner), `tmpfs.rs` (a small file
//! system to fill up); one file per group of tests: `kill_stream.rs`, `kill_analysis.rs`
//! (with `stages.rs`, where a kill landed), `outage.rs` (broker down, commit before mark),
//! `fallback.rs`, `spool_space.rs`, `outbox_full.rs`.

mod common;

#[path = "faults/fallback.rs"]
mod fallback;
#[path = "faults/kill_analysis.rs"]
mod kill_analysis;
#[path = "faults/kill_stream.rs"]
mod kill_stream;
#[path = "faults/outage.rs"]
mod outage;
#[path = "faults/outbox_full.rs"]
mod outbox_full;
#[path = "faults/results.rs"]
mod results;
#[path = "faults/scu.rs"]
mod scu;
#[path = "faults/site.rs"]
mod site;
#[path = "faults/spool_space.rs"]
mod spool_space;
#[path = "faults/stages.rs"]
mod stages;
#[path = "faults/studies.rs"]
mod studies;
#[path = "faults/tmpfs.rs"]
mod tmpfs;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

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
