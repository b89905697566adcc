//! One destination's sender task: sends its queue, oldest entry first, over one
//! association at a time, and waits with capped exponential backoff when the destination
//! cannot be reached or asks to try later.
//!
//! Per entry: Success or Warning (and "already stored") removes it; a permanent refusal
//! (see [`super::status`]), a SOP class the destination does not accept, or an object that
//! cannot be encoded in an accepted transfer syntax moves it to `rejected/`; a transient
//! refusal or a lost association leaves it queued and ends the association, and the whole
//! queue is tried again, oldest first, after the backoff. Every wait beats the stage's
//! heartbeat, and every network step has a timeout, so a stuck PACS never looks like a
//! stuck daemon.

use std::sync::Arc;
use std::time::Duration;

use super::backoff::Backoff;
use super::link::{self, Link, LinkError, Peer};
use super::part10;
use super::queue::{EntryMeta, Queue};
use super::status::StoreOutcome;
use crate::heartbeat::Heartbeat;

/// Entries sent on one association before it is released and the queue looked at again.
const BATCH: usize = 64;
/// SOP classes proposed on one association (each is one presentation context).
const MAX_SOP_CLASSES: usize = 32;

/// How one association's session ended.
#[derive(Debug)]
enum SessionEnd {
    /// Every entry of the batch was delivered or set aside.
    BatchDone,
    /// Something failed that may work later: back off, then try again.
    RetryLater(RetryReason),
}

/// Why a session asks to try again later.
#[derive(Debug, thiserror::Error)]
enum RetryReason {
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("C-STORE of {sop_instance_uid} answered with transient status {status:04X}H")]
    Transient {
        sop_instance_uid: String,
        status: u16,
    },
    #[error("cannot update the queue: {0:#}")]
    Queue(anyhow::Error),
}

/// One destination as its sender sees it.
pub(crate) struct Sender {
    pub name: String,
    pub peer: Peer,
    pub queue: Arc<Queue>,
    pub backoff: Backoff,
    pub events: crate::events::Events,
}

impl Sender {
    /// Runs until the task is aborted (daemon shutdown); whatever is unsent stays queued.
    pub async fn run(mut self, heartbeat: Heartbeat) {
        let mut failing_since_logged = false;
        loop {
            heartbeat.fault_stall_point().await;
            let added = self.queue.added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            let pending = self.queue.pending();
            if pending.is_empty() {
                heartbeat
                    .wait_for(added, heartbeat.idle_beat_period())
                    .await;
                continue;
            }
            match self.session(&pending, &heartbeat).await {
                SessionEnd::BatchDone => {
                    if failing_since_logged {
                        log::info!("PACS {}: delivering again", self.name);
                        failing_since_logged = false;
                    }
                    self.backoff.reset();
                }
                SessionEnd::RetryLater(reason) => {
                    let delay = self.backoff.next_delay();
                    let depth = self.queue.depth();
                    log::warn!(
                        destination = self.name.as_str();
                        "PACS {}: {reason}; {} object(s) waiting, next attempt in {:.1} s",
                        self.name,
                        depth.entries,
                        delay.as_secs_f64()
                    );
                    failing_since_logged = true;
                    heartbeat
                        .wait_for(std::future::pending::<()>(), delay)
                        .await;
                }
            }
        }
    }

    /// One association: the oldest entries (up to [`BATCH`], of at most
    /// [`MAX_SOP_CLASSES`] SOP classes), oldest first.
    async fn session(&self, pending: &[EntryMeta], heartbeat: &Heartbeat) -> SessionEnd {
        let mut sop_classes: Vec<String> = Vec::new();
        let mut batch = Vec::new();
        for entry in pending.iter().take(BATCH) {
            if !sop_classes.contains(&entry.sop_class_uid) {
                if sop_classes.len() == MAX_SOP_CLASSES {
                    break;
                }
                sop_classes.push(entry.sop_class_uid.clone());
            }
            batch.push(entry);
        }
        let connect_limit = self.peer.connect_timeout + self.peer.dimse_timeout;
        let mut link = match heartbeat
            .wait_for(link::connect(&self.peer, &sop_classes), connect_limit)
            .await
        {
            Some(Ok(link)) => link,
            Some(Err(e)) => return SessionEnd::RetryLater(e.into()),
            None => return SessionEnd::RetryLater(RetryReason::Timeout(connect_limit)),
        };
        let mut message_id: u16 = 1;
        for entry in batch {
            match self.send_one(&mut link, entry, message_id, heartbeat).await {
                Ok(()) => message_id = message_id.wrapping_add(1).max(1),
                Err(reason) => {
                    // The association may be mid-message: drop it rather than release.
                    drop(link);
                    return SessionEnd::RetryLater(reason);
                }
            }
        }
        let _ = heartbeat
            .wait_for(link.release(), self.peer.dimse_timeout)
            .await;
        SessionEnd::BatchDone
    }

    /// Sends one entry and settles it (removed, set aside); `Err` leaves it queued.
    async fn send_one(
        &self,
        link: &mut Link,
        entry: &EntryMeta,
        message_id: u16,
        heartbeat: &Heartbeat,
    ) -> Result<(), RetryReason> {
        let part10 = match self.queue.load(entry) {
            Ok(bytes) => bytes,
            Err(e) => {
                return self
                    .queue
                    .set_aside_damaged(entry, &e)
                    .map_err(RetryReason::Queue)
            }
        };
        let Some((context_id, transfer_syntax)) = link.accepted(&entry.sop_class_uid) else {
            let why = anyhow::anyhow!(
                "PACS {} does not accept SOP class {} (of {} {:?})",
                self.name,
                entry.sop_class_uid,
                entry.sop_instance_uid,
                entry.kind
            );
            return self.queue.reject(entry, &why).map_err(RetryReason::Queue);
        };
        let data_set = match part10::data_set_in(&part10, &transfer_syntax) {
            Ok(data_set) => data_set,
            Err(e) => {
                let why = e.context(format!(
                    "{} cannot be encoded in {transfer_syntax}, the transfer syntax PACS {} \
                     accepted",
                    entry.sop_instance_uid, self.name
                ));
                return self.queue.reject(entry, &why).map_err(RetryReason::Queue);
            }
        };
        let limit = self.peer.dimse_timeout;
        let store = link.store(
            context_id,
            message_id,
            &entry.sop_class_uid,
            &entry.sop_instance_uid,
            &data_set,
        );
        let status = match heartbeat.wait_for(store, limit).await {
            Some(Ok(status)) => status,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(RetryReason::Timeout(limit)),
        };
        match StoreOutcome::of_status(status) {
            StoreOutcome::Delivered => {
                log::info!(
                    destination = self.name.as_str(), sop_instance_uid = entry.sop_instance_uid.as_str();
                    "PACS {}: stored {:?} {} (status {status:04X}H)",
                    self.name,
                    entry.kind,
                    entry.sop_instance_uid
                );
                self.queue.remove(entry).map_err(RetryReason::Queue)?;
                self.events.emit(crate::events::Event::PacsObjectDelivered {
                    destination: self.name.clone(),
                    sop_instance_uid: entry.sop_instance_uid.clone(),
                    queued_to_delivered_secs: queued_secs(entry),
                });
                Ok(())
            }
            StoreOutcome::Permanent => {
                let why = anyhow::anyhow!(
                    "PACS {} refused {:?} {} for good with status {status:04X}H",
                    self.name,
                    entry.kind,
                    entry.sop_instance_uid
                );
                self.queue.reject(entry, &why).map_err(RetryReason::Queue)?;
                self.events.emit(crate::events::Event::PacsObjectRejected {
                    destination: self.name.clone(),
                    sop_instance_uid: entry.sop_instance_uid.clone(),
                });
                Ok(())
            }
            StoreOutcome::Transient => Err(RetryReason::Transient {
                sop_instance_uid: entry.sop_instance_uid.clone(),
                status,
            }),
        }
    }
}

/// Seconds from queueing `entry` to now (the clock may have stepped: `None` then).
fn queued_secs(entry: &EntryMeta) -> Option<f64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    now.checked_sub(entry.enqueued_unix_ms)
        .map(|ms| ms as f64 / 1000.0)
}
