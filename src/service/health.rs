//! Pipeline liveness: the systemd watchdog is fed by the stages' own progress, not by
//! a free-running timer.
//!
//! Each stage registers once and gets a [`Heartbeat`] (cheap to clone; defined in
//! [`crate::heartbeat`], below the stages). It beats when it finishes an item and while
//! it idle-waits for input ([`Heartbeat::recv`] does both).
//! A stage that has not beaten for longer than its allowed stall time is *stuck*.
//! [`run_watchdog`] sends `WATCHDOG=1` every half watchdog interval only while no stage
//! is stuck, so a stuck stage makes systemd kill and restart the daemon (`Restart=`),
//! and the durable spool and outbox make that restart lose nothing.
//!
//! The same task keeps the `STATUS=` line current (studies queued, last result, stuck
//! stages) for `systemctl status`.
//!
//! Fault injection for tests (`CSPINE_FAULT_STALL`, [`Heartbeat::fault_stall_point`]) is
//! described in [`crate::test_hooks`]: `serve` hands the stages to stall to
//! [`Health::with_fault_stall`].
//!
//! Wiring, in `serve`: `let health = Health::with_fault_stall(stall_secs, hooks.stall)`
//! (the `[service.stall_secs]` section; [`Health::new`] where no stage is to stall);
//! each stage gets `health.register("inference")` etc.; after the port is bound, the model
//! loaded and the outbox open, `notify::ready()` and `tokio::spawn(run_watchdog(health))`;
//! on SIGTERM `notify::stopping()`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::notify;
use crate::heartbeat::{millis_since, Heartbeat, Stage};
use crate::test_hooks::StageSet;
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// `[service.stall_secs]`: how long each stage may go without a heartbeat before it
/// counts as stuck. Inference gets longest: one CT volume on a CPU-only box can take
/// minutes. Stages not listed here (a stage added later) get `default`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StallSecs {
    pub dicom: f64,
    pub series: f64,
    pub inference: f64,
    pub alert: f64,
    pub default: f64,
}

impl Default for StallSecs {
    fn default() -> Self {
        StallSecs {
            dicom: 60.0,
            series: 120.0,
            inference: 900.0,
            alert: 120.0,
            default: 120.0,
        }
    }
}

impl StallSecs {
    pub fn validate(&self) -> Result<()> {
        for (key, secs) in [
            ("dicom", self.dicom),
            ("series", self.series),
            ("inference", self.inference),
            ("alert", self.alert),
            ("default", self.default),
        ] {
            ensure!(
                secs.is_finite() && secs >= 0.5,
                "service.stall_secs.{key} must be at least 0.5 seconds, got {secs}"
            );
        }
        Ok(())
    }

    /// The allowed stall time of `stage`.
    pub fn for_stage(&self, stage: &str) -> Duration {
        let secs = match stage {
            "dicom" => self.dicom,
            "series" => self.series,
            "inference" => self.inference,
            "alert" => self.alert,
            _ => self.default,
        };
        Duration::from_secs_f64(secs)
    }
}

/// The registry of stage heartbeats and the facts shown in `STATUS=`.
/// Cloning shares the same registry.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    /// Heartbeats are stored as milliseconds since this instant (an atomic store per beat).
    epoch: Instant,
    stall: StallSecs,
    /// Test hook: stages registered under these names stall on purpose.
    fault_stall: StageSet,
    stages: Mutex<Vec<Arc<Stage>>>,
    queued: AtomicUsize,
    last_result: Mutex<Option<String>>,
}

/// A stage that has not beaten for longer than it is allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct StuckStage {
    pub name: &'static str,
    pub silent_for: Duration,
    pub allowed_stall: Duration,
}

impl std::fmt::Display for StuckStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} silent for {:.0} s (allowed {:.0} s)",
            self.name,
            self.silent_for.as_secs_f64(),
            self.allowed_stall.as_secs_f64()
        )
    }
}

impl Health {
    /// A registry with the stall times of `stall`.
    pub fn new(stall: StallSecs) -> Health {
        Health::with_fault_stall(stall, StageSet::default())
    }

    /// As [`Health::new`]; the stages registered under a name in `fault_stall` (a test
    /// hook, `CSPINE_FAULT_STALL`; empty in production) stall on purpose.
    pub fn with_fault_stall(stall: StallSecs, fault_stall: StageSet) -> Health {
        Health {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                stall,
                fault_stall,
                stages: Mutex::new(Vec::new()),
                queued: AtomicUsize::new(0),
                last_result: Mutex::new(None),
            }),
        }
    }

    /// Registers a stage (named after its module: `dicom`, `series`, `inference`,
    /// `alert`) with the stall time from the config; it counts as having just beaten.
    pub fn register(&self, name: &'static str) -> Heartbeat {
        let allowed = self.inner.stall.for_stage(name);
        self.register_with(name, allowed)
    }

    /// Registers a stage with an explicit allowed stall time.
    pub fn register_with(&self, name: &'static str, allowed_stall: Duration) -> Heartbeat {
        let heartbeat = Heartbeat::with_fault_stall(
            name,
            allowed_stall,
            self.inner.epoch,
            self.inner.fault_stall.contains(name),
        );
        lock(&self.inner.stages).push(heartbeat.stage_handle());
        heartbeat
    }

    /// The stages that are stuck now.
    pub fn stuck(&self) -> Vec<StuckStage> {
        self.stuck_at(Instant::now())
    }

    /// The stages that are stuck at `now` (an instant after every beat; for tests).
    pub fn stuck_at(&self, now: Instant) -> Vec<StuckStage> {
        let now_ms = millis_since(self.inner.epoch, now);
        lock(&self.inner.stages)
            .iter()
            .filter(|stage| !stage.finished.load(Ordering::Relaxed))
            .filter_map(|stage| {
                let last = stage.last_beat_ms.load(Ordering::Relaxed);
                let silent_for = Duration::from_millis(now_ms.saturating_sub(last));
                (silent_for > stage.allowed_stall).then_some(StuckStage {
                    name: stage.name,
                    silent_for,
                    allowed_stall: stage.allowed_stall,
                })
            })
            .collect()
    }

    /// Studies received but not yet published (shown in `STATUS=`).
    pub fn set_queued(&self, studies: usize) {
        self.inner.queued.store(studies, Ordering::Relaxed);
    }

    /// One study entered the pipeline.
    pub fn study_queued(&self) {
        self.inner.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// One study left the pipeline (published or failed).
    pub fn study_done(&self) {
        // Saturating: a study re-indexed from the spool at start-up may finish
        // without having been counted in.
        let _ = self
            .inner
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// A short description of the last result, e.g. `"1.2.840... fracture p=0.93"`.
    pub fn set_last_result(&self, summary: impl Into<String>) {
        *lock(&self.inner.last_result) = Some(summary.into());
    }

    /// The `STATUS=` line for the given stuck stages.
    pub fn status_line(&self, stuck: &[StuckStage]) -> String {
        let queued = self.inner.queued.load(Ordering::Relaxed);
        let mut line = format!(
            "{queued} {} queued",
            if queued == 1 { "study" } else { "studies" }
        );
        match &*lock(&self.inner.last_result) {
            Some(last) => line.push_str(&format!("; last result: {last}")),
            None => line.push_str("; no result yet"),
        }
        if !stuck.is_empty() {
            let names: Vec<String> = stuck.iter().map(|s| s.to_string()).collect();
            line.push_str(&format!("; STUCK: {}", names.join(", ")));
        }
        line
    }
}

/// Feeds the systemd watchdog and the `STATUS=` line; runs until the task is dropped
/// or aborted (do that at shutdown, after [`notify::stopping`]).
///
/// Pings `WATCHDOG=1` every half `WatchdogSec=` while no stage is stuck. Without a
/// watchdog (run by hand) it still logs stuck stages and updates `STATUS=`.
pub async fn run_watchdog(health: Health) {
    let interval = notify::watchdog_interval();
    let period = interval
        .map(|interval| interval / 2)
        .unwrap_or(Duration::from_secs(5))
        .max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watchdog = Watchdog::new(health, interval.is_some());
    loop {
        ticker.tick().await;
        let turn = watchdog.turn(Instant::now());
        if turn.ping {
            notify::watchdog();
        }
        if let Some(status) = turn.status {
            notify::status(&status);
        }
    }
}

/// The decisions of one watchdog turn, kept apart from the socket for testing.
struct Watchdog {
    health: Health,
    pinging: bool,
    last_status: String,
    reported_stuck: BTreeSet<&'static str>,
}

#[derive(Debug, PartialEq)]
struct Turn {
    ping: bool,
    /// A new `STATUS=` line, when it changed.
    status: Option<String>,
}

impl Watchdog {
    fn new(health: Health, pinging: bool) -> Watchdog {
        Watchdog {
            health,
            pinging,
            last_status: String::new(),
            reported_stuck: BTreeSet::new(),
        }
    }

    fn turn(&mut self, now: Instant) -> Turn {
        let stuck = self.health.stuck_at(now);
        if stuck.is_empty() && !self.reported_stuck.is_empty() {
            log::info!("all pipeline stages are making progress again");
            self.reported_stuck.clear();
        }
        for stage in &stuck {
            if self.reported_stuck.insert(stage.name) {
                log::error!(
                    "pipeline stage {stage}; {}",
                    if self.pinging {
                        "withholding watchdog pings so that systemd restarts the daemon"
                    } else {
                        "no systemd watchdog configured: the daemon will not be restarted"
                    }
                );
            }
        }
        let status = self.health.status_line(&stuck);
        let changed = status != self.last_status;
        if changed {
            self.last_status.clone_from(&status);
        }
        Turn {
            ping: self.pinging && stuck.is_empty(),
            status: changed.then_some(status),
        }
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain data.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_fresh_stage_is_not_stuck() {
        let health = Health::new(StallSecs::default());
        let _beat = health.register_with("inference", secs(10));
        assert!(health.stuck().is_empty());
    }

    #[test]
    fn a_silent_stage_is_stuck_after_its_own_allowance() {
        let health = Health::new(StallSecs::default());
        let start = Instant::now();
        let _dicom = health.register_with("dicom", secs(2));
        let _inference = health.register_with("inference", secs(20));
        assert!(health.stuck_at(start + secs(1)).is_empty());
        let stuck = health.stuck_at(start + secs(5));
        assert_eq!(stuck.len(), 1, "{stuck:?}");
        assert_eq!(stuck[0].name, "dicom");
        assert_eq!(stuck[0].allowed_stall, secs(2));
        let names: Vec<_> = health
            .stuck_at(start + secs(30))
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["dicom", "inference"]);
    }

    #[test]
    fn beating_keeps_a_stage_alive_and_clones_share_the_beat() {
        let health = Health::new(StallSecs::default());
        let beat = health.register_with("series", Duration::from_millis(100));
        let clone = beat.clone();
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(health.stuck().len(), 1);
        clone.beat();
        assert!(health.stuck().is_empty());
        assert_eq!(beat.stage(), "series");
    }

    #[test]
    fn a_finished_stage_is_not_watched() {
        let health = Health::new(StallSecs::default());
        let start = Instant::now();
        let beat = health.register_with("alert", secs(1));
        beat.finish();
        assert!(health.stuck_at(start + secs(60)).is_empty());
    }

    #[test]
    fn stall_times_come_from_the_config() {
        let stall = StallSecs {
            inference: 42.0,
            ..StallSecs::default()
        };
        let health = Health::new(stall.clone());
        let beat = health.register("inference");
        assert_eq!(beat.allowed_stall(), secs(42));
        assert_eq!(stall.for_stage("later-stage"), secs(120));
        assert!(StallSecs {
            dicom: 0.0,
            ..StallSecs::default()
        }
        .validate()
        .unwrap_err()
        .to_string()
        .contains("service.stall_secs.dicom"));
        let parsed: StallSecs = toml::from_str("inference = 5.5").unwrap();
        assert_eq!(parsed.for_stage("inference"), Duration::from_millis(5500));
        assert!(toml::from_str::<StallSecs>("infrence = 5").is_err());
    }

    #[test]
    fn status_line_shows_queue_last_result_and_stuck_stages() {
        let health = Health::new(StallSecs::default());
        assert_eq!(health.status_line(&[]), "0 studies queued; no result yet");
        health.study_queued();
        health.study_queued();
        health.study_done();
        health.set_last_result("1.2.3 fracture p=0.93");
        let stuck = [StuckStage {
            name: "inference",
            silent_for: secs(950),
            allowed_stall: secs(900),
        }];
        assert_eq!(
            health.status_line(&stuck),
            "1 study queued; last result: 1.2.3 fracture p=0.93; \
             STUCK: inference silent for 950 s (allowed 900 s)"
        );
        health.study_done();
        health.study_done();
        health.set_queued(0);
        assert!(health.status_line(&[]).starts_with("0 studies queued"));
    }

    #[tokio::test]
    async fn recv_beats_while_idle_and_on_arrival() {
        let health = Health::new(StallSecs::default());
        let beat = health.register_with("series", Duration::from_millis(200));
        // A second stage that never beats: proves the clock really moved past the allowance.
        let _silent = health.register_with("alert", Duration::from_millis(200));
        let (tx, mut rx) = mpsc::channel::<u32>(1);
        let watcher = {
            let health = health.clone();
            tokio::spawn(async move {
                let mut worst = Vec::new();
                // Sample while the receiver idles for 5x its allowed stall.
                for _ in 0..50 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    worst.extend(health.stuck().into_iter().map(|s| s.name));
                }
                tx.send(7).await.unwrap();
                worst
            })
        };
        assert_eq!(beat.recv(&mut rx).await, Some(7));
        let stuck_seen = watcher.await.unwrap();
        assert!(stuck_seen.contains(&"alert"), "{stuck_seen:?}");
        assert!(!stuck_seen.contains(&"series"), "{stuck_seen:?}");
        assert_eq!(beat.recv(&mut rx).await, None);
    }

    #[tokio::test]
    async fn send_beats_while_the_channel_is_full_and_gives_the_message_back_when_closed() {
        let health = Health::new(StallSecs::default());
        let beat = health.register_with("series", Duration::from_millis(200));
        let _silent = health.register_with("alert", Duration::from_millis(200));
        let (tx, mut rx) = mpsc::channel::<u32>(1);
        tx.send(1).await.unwrap();
        // The downstream stage takes 5x the allowed stall before it reads.
        let watcher = {
            let health = health.clone();
            tokio::spawn(async move {
                let mut stuck_seen = Vec::new();
                for _ in 0..50 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    stuck_seen.extend(health.stuck().into_iter().map(|s| s.name));
                }
                let got = [rx.recv().await, rx.recv().await];
                (stuck_seen, got)
            })
        };
        assert_eq!(beat.send(&tx, 2).await, Ok(()));
        let (stuck_seen, got) = watcher.await.unwrap();
        assert_eq!(got, [Some(1), Some(2)]);
        assert!(stuck_seen.contains(&"alert"), "{stuck_seen:?}");
        assert!(!stuck_seen.contains(&"series"), "{stuck_seen:?}");
        // The receiver is gone with the watcher task.
        assert_eq!(beat.send(&tx, 3).await, Err(3));
    }

    #[test]
    fn watchdog_pings_only_while_no_stage_is_stuck() {
        let health = Health::new(StallSecs::default());
        let start = Instant::now();
        let inference = health.register_with("inference", secs(10));
        let _series = health.register_with("series", secs(100));
        let mut watchdog = Watchdog::new(health.clone(), true);

        let first = watchdog.turn(start + secs(1));
        assert!(first.ping);
        assert_eq!(
            first.status.as_deref(),
            Some("0 studies queued; no result yet")
        );
        // Unchanged status is not re-sent.
        assert_eq!(
            watchdog.turn(start + secs(2)),
            Turn {
                ping: true,
                status: None
            }
        );

        let stuck = watchdog.turn(start + secs(30));
        assert!(!stuck.ping);
        assert!(stuck
            .status
            .unwrap()
            .contains("STUCK: inference silent for 30 s"));

        // Progress again: pings resume and the STUCK note goes away.
        inference.beat();
        let recovered = watchdog.turn(Instant::now());
        assert!(recovered.ping);
        assert_eq!(
            recovered.status.as_deref(),
            Some("0 studies queued; no result yet")
        );

        // Without a systemd watchdog nothing is pinged, but the status still updates.
        let mut unsupervised = Watchdog::new(health, false);
        let turn = unsupervised.turn(start + secs(1));
        assert!(!turn.ping);
        assert!(turn.status.is_some());
    }
}
