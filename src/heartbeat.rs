//! A pipeline stage's liveness handle: [`Heartbeat`] records when the stage last made
//! progress, so that a watcher (the systemd watchdog in `service::health`) can tell a
//! stuck stage from a busy one. It sits below every stage, so that `series`,
//! `inference` and `alert` can beat without importing the service layer.
//!
//! A stage beats when it finishes an item and while it idle-waits for input
//! ([`Heartbeat::recv`] does both), while it waits on a full channel downstream
//! ([`Heartbeat::send`]) and while it retries ([`Heartbeat::wait_for`]).
//!
//! Fault injection for tests: a stage made with [`Heartbeat::with_fault_stall`] (`serve`
//! does so for the stages that `CSPINE_FAULT_STALL` names, [`crate::test_hooks`]) blocks
//! forever, without beating, the first time it reaches [`Heartbeat::fault_stall_point`]
//! (top of its loop). Production units never set it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// One stage's beat record, shared by its [`Heartbeat`]s and the watcher.
pub(crate) struct Stage {
    pub(crate) name: &'static str,
    pub(crate) allowed_stall: Duration,
    pub(crate) last_beat_ms: AtomicU64,
    /// A stage that ended on purpose (shutdown) is no longer watched.
    pub(crate) finished: AtomicBool,
    /// Test hook: the stage stalls at [`Heartbeat::fault_stall_point`].
    fault_stall: bool,
}

/// A stage's handle for reporting progress. Clone it into the stage's tasks.
#[derive(Clone)]
pub struct Heartbeat {
    stage: Arc<Stage>,
    epoch: Instant,
}

impl Heartbeat {
    /// A new stage handle that counts as having just beaten. Its beats are milliseconds
    /// since `epoch`; a registry that watches several stages gives them all its epoch and
    /// keeps [`Heartbeat::stage_handle`] to read the beats.
    pub fn new(name: &'static str, allowed_stall: Duration, epoch: Instant) -> Heartbeat {
        Heartbeat::with_fault_stall(name, allowed_stall, epoch, false)
    }

    /// As [`Heartbeat::new`]; with `fault_stall` (a test hook, `CSPINE_FAULT_STALL`), the
    /// stage stalls at its [`Heartbeat::fault_stall_point`].
    pub fn with_fault_stall(
        name: &'static str,
        allowed_stall: Duration,
        epoch: Instant,
        fault_stall: bool,
    ) -> Heartbeat {
        let heartbeat = Heartbeat {
            stage: Arc::new(Stage {
                name,
                allowed_stall,
                last_beat_ms: AtomicU64::new(0),
                finished: AtomicBool::new(false),
                fault_stall,
            }),
            epoch,
        };
        heartbeat.beat();
        heartbeat
    }

    /// The shared state the watcher reads (see `service::health::Health`).
    pub(crate) fn stage_handle(&self) -> Arc<Stage> {
        self.stage.clone()
    }

    /// The stage made progress (finished an item, or is idle-waiting and alive).
    pub fn beat(&self) {
        let now = millis_since(self.epoch, Instant::now());
        self.stage.last_beat_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// The stage ended on purpose (input closed at shutdown): stop watching it.
    /// A stage that dies without calling this stays watched and soon counts as stuck.
    pub fn finish(&self) {
        self.stage.finished.store(true, Ordering::Relaxed);
    }

    pub fn stage(&self) -> &'static str {
        self.stage.name
    }

    /// How long this stage may go without a beat before it counts as stuck.
    pub fn allowed_stall(&self) -> Duration {
        self.stage.allowed_stall
    }

    /// How often an idle stage should beat: well within its allowed stall.
    pub fn idle_beat_period(&self) -> Duration {
        (self.stage.allowed_stall / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// Receives the next message, beating while idle-waiting and once on arrival.
    /// `None` when the channel is closed (the stage should [`finish`](Self::finish)).
    pub async fn recv<T>(&self, rx: &mut mpsc::Receiver<T>) -> Option<T> {
        loop {
            match tokio::time::timeout(self.idle_beat_period(), rx.recv()).await {
                Ok(message) => {
                    self.beat();
                    return message;
                }
                Err(_idle) => self.beat(),
            }
        }
    }

    /// Sends `message` on a bounded channel, beating while the channel is full: waiting
    /// for a slower stage downstream (the alert stage retrying a full outbox disk) is
    /// backpressure, not a stall, and a stage downstream that is stuck has a heartbeat of
    /// its own. Without this, a stage waiting here for longer than its allowed stall
    /// made the watchdog restart the daemon again and again until the disk had room.
    /// `Err` gives `message` back when the channel is closed.
    pub async fn send<T>(&self, tx: &mpsc::Sender<T>, message: T) -> Result<(), T> {
        loop {
            self.beat();
            match tokio::time::timeout(self.idle_beat_period(), tx.reserve()).await {
                Ok(Ok(permit)) => {
                    permit.send(message);
                    self.beat();
                    return Ok(());
                }
                Ok(Err(_closed)) => return Err(message),
                Err(_full) => {}
            }
        }
    }

    /// Waits for `future` for at most `max`, beating meanwhile; `None` if `max` passed
    /// first. For a stage that retries (a full or failing outbox disk): retrying is
    /// progress, not a stall.
    pub async fn wait_for<F: std::future::Future>(
        &self,
        future: F,
        max: Duration,
    ) -> Option<F::Output> {
        let until = Instant::now() + max;
        tokio::pin!(future);
        loop {
            self.beat();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if let Ok(output) =
                tokio::time::timeout(left.min(self.idle_beat_period()), future.as_mut()).await
            {
                self.beat();
                return Some(output);
            }
        }
    }

    /// Fault-injection point: if this stage was made to stall
    /// ([`Heartbeat::with_fault_stall`]), block this task forever without beating (a
    /// simulated hung stage, for the watchdog test).
    /// Call it at the top of the stage's loop, before waiting for input, so that the
    /// stage hangs right after start-up and the test needs no study:
    /// `loop { beat.fault_stall_point().await; let Some(x) = beat.recv(&mut rx).await ... }`.
    pub async fn fault_stall_point(&self) {
        if self.stage.fault_stall {
            log::warn!(
                "CSPINE_FAULT_STALL: stage {} now stalls forever (fault injection)",
                self.stage.name
            );
            std::future::pending::<()>().await;
        }
    }
}

pub(crate) fn millis_since(epoch: Instant, now: Instant) -> u64 {
    now.saturating_duration_since(epoch).as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_stage_made_to_stall_stalls_at_its_fault_point() {
        let epoch = Instant::now();
        let healthy = Heartbeat::new("pacs", Duration::from_secs(3), epoch);
        healthy.fault_stall_point().await;
        let stalled = Heartbeat::with_fault_stall("pacs", Duration::from_secs(3), epoch, true);
        let waited =
            tokio::time::timeout(Duration::from_millis(50), stalled.fault_stall_point()).await;
        assert!(waited.is_err(), "the stage should stall");
    }

    #[test]
    fn a_new_heartbeat_has_just_beaten_and_keeps_its_allowance() {
        let epoch = Instant::now();
        let beat = Heartbeat::new("alert", Duration::from_secs(3), epoch);
        assert_eq!(beat.stage(), "alert");
        assert_eq!(beat.allowed_stall(), Duration::from_secs(3));
        assert!(!beat.stage_handle().finished.load(Ordering::Relaxed));
        beat.finish();
        assert!(beat.stage_handle().finished.load(Ordering::Relaxed));
    }
}
