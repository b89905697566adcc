//! [`Delivery`]: the handle the rest of the daemon uses to send result objects to PACS.
//! [`Delivery::enqueue`] durably queues objects for every destination and returns;
//! [`Delivery::run`] is the stage that sends them (one sender task per destination).
//!
//! Publishing a result never waits for DICOM delivery: `enqueue` only writes and fsyncs
//! queue files (no network), and the senders run on their own tasks.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::backoff::Backoff;
use super::config::PacsConfig;
use super::error::PacsError;
use super::link::{Peer, PeerTls};
use super::part10;
use super::queue::{Added, Queue, QueueDepth};
use super::sender::Sender;
use crate::dicom::tls;
use crate::heartbeat::Heartbeat;
use crate::report::ResultObject;

/// One destination's queue depth, for metrics and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationDepth {
    /// `pacs.destinations[].name`.
    pub destination: String,
    /// Objects waiting to be sent there.
    pub entries: usize,
    /// How long the oldest of them has waited; `None` when nothing waits.
    pub oldest_age: Option<Duration>,
}

struct Destination {
    name: String,
    peer: Peer,
    queue: Arc<Queue>,
}

struct Shared {
    dir: PathBuf,
    /// Exclusive lock on `queue_dir/.lock` while open: two processes sending and removing
    /// the same entries would confuse each other.
    _lock: nix::fcntl::Flock<File>,
    destinations: Vec<Destination>,
    retry_initial: Duration,
    retry_max: Duration,
    /// Where each object delivered or set aside is recorded.
    events: crate::events::Events,
}

/// Handle to the delivery queues; cheap to clone.
#[derive(Clone)]
pub struct Delivery {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("dir", &self.shared.dir)
            .field("depth", &self.depth())
            .finish()
    }
}

impl Delivery {
    /// Opens (creating them) the queues under `config.queue_dir`, one per destination,
    /// with what a previous run left in them. `default_calling_ae` (`dicom.ae_title`) is
    /// the calling AE title of destinations without their own. Blocking file I/O.
    pub fn open(config: &PacsConfig, default_calling_ae: &str) -> Result<Delivery, PacsError> {
        let dir = config.queue_dir.clone();
        let open_error = |source: anyhow::Error| PacsError::Open {
            dir: dir.clone(),
            source,
        };
        crate::durable::create_dir_all_durably(&dir).map_err(open_error)?;
        let lock = lock(&dir).map_err(open_error)?;
        let mut destinations = Vec::with_capacity(config.destinations.len());
        for d in &config.destinations {
            let queue = Queue::open(&dir.join(&d.name))
                .with_context(|| format!("destination {}", d.name))
                .map_err(open_error)?;
            let waiting = queue.depth().entries;
            if waiting > 0 {
                log::info!(
                    "PACS {}: {waiting} object(s) from a previous run still to send",
                    d.name
                );
            }
            let address = format!("{}:{}", d.host, d.port);
            let tls = match &d.tls {
                None => None,
                Some(t) => Some(
                    tls::client_config(t)
                        .and_then(|config| {
                            Ok(PeerTls {
                                config,
                                server_name: tls::server_name(t, &address)?,
                            })
                        })
                        .with_context(|| format!("destination {}: tls", d.name))
                        .map_err(open_error)?,
                ),
            };
            destinations.push(Destination {
                name: d.name.clone(),
                peer: Peer {
                    called_ae: d.ae_title.clone(),
                    calling_ae: d.calling_ae(default_calling_ae).to_owned(),
                    address,
                    connect_timeout: d.connect_timeout(),
                    dimse_timeout: d.dimse_timeout(),
                    tls,
                },
                queue: Arc::new(queue),
            });
        }
        Ok(Delivery {
            shared: Arc::new(Shared {
                dir,
                _lock: lock,
                destinations,
                retry_initial: config.retry_initial(),
                retry_max: config.retry_max(),
                events: Default::default(),
            }),
        })
    }

    /// Durably queues `objects` for every destination and returns once every entry is
    /// fsynced (file and directory). Idempotent: an object whose SOP Instance UID is
    /// already queued for a destination is not queued there again. Every object is
    /// checked first, so an invalid one queues nothing. Blocking file I/O, no network:
    /// from async code, call it through `tokio::task::spawn_blocking`.
    pub fn enqueue(&self, objects: &[ResultObject]) -> Result<(), PacsError> {
        for object in objects {
            part10::check(object).map_err(|problem| PacsError::InvalidObject {
                sop_instance_uid: object.sop_instance_uid.clone(),
                problem,
            })?;
        }
        for destination in &self.shared.destinations {
            let mut added = false;
            for object in objects {
                let outcome = destination
                    .queue
                    .add(object)
                    .map_err(|source| PacsError::Write {
                        destination: destination.name.clone(),
                        sop_instance_uid: object.sop_instance_uid.clone(),
                        source,
                    });
                // Wake the sender for what is queued even when a later write fails.
                if outcome.is_err() && added {
                    destination.queue.added.notify_one();
                }
                added |= outcome? == Added::New;
            }
            if added {
                destination.queue.added.notify_one();
            }
        }
        Ok(())
    }

    /// Per destination: how many objects wait and for how long the oldest has (from
    /// memory; cheap enough for every metrics scrape).
    pub fn depth(&self) -> Vec<DestinationDepth> {
        self.shared
            .destinations
            .iter()
            .map(|d| {
                let QueueDepth {
                    entries,
                    oldest_age,
                } = d.queue.depth();
                DestinationDepth {
                    destination: d.name.clone(),
                    entries,
                    oldest_age,
                }
            })
            .collect()
    }

    /// The queue directory of destination `name`.
    pub fn queue_dir(&self, name: &str) -> Option<&Path> {
        self.shared
            .destinations
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.queue.dir())
    }

    /// The sending stage: one task per destination, until the task is aborted (shutdown).
    /// Each sender beats `heartbeat` while it sends and while it waits.
    /// Records each object delivered or set aside in `events` (before [`Delivery::run`]).
    pub fn with_events(mut self, events: crate::events::Events) -> Delivery {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.events = events;
        }
        self
    }

    pub async fn run(self, heartbeat: Heartbeat) -> anyhow::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for d in &self.shared.destinations {
            let sender = Sender {
                name: d.name.clone(),
                peer: d.peer.clone(),
                queue: d.queue.clone(),
                backoff: Backoff::new(self.shared.retry_initial, self.shared.retry_max),
                events: self.shared.events.clone(),
            };
            log::info!(
                "PACS {}: sending to {} at {} as {}",
                d.name,
                d.peer.called_ae,
                d.peer.address,
                d.peer.calling_ae
            );
            tasks.spawn(sender.run(heartbeat.clone()));
        }
        // Senders only end by panicking (they run until aborted).
        if let Some(ended) = tasks.join_next().await {
            ended.context("a PACS sender panicked")?;
            anyhow::bail!("a PACS sender ended");
        }
        // No destination: nothing to send, stay idle so the stage does not count as ended.
        loop {
            heartbeat
                .wait_for(std::future::pending::<()>(), heartbeat.idle_beat_period())
                .await;
        }
    }
}

fn lock(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<File>> {
    let path = dir.join(".lock");
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            anyhow::anyhow!(
                "{} is in use by another process ({errno}); is another cspine-triage running \
                 with the same pacs.queue_dir?",
                dir.display()
            )
        },
    )
}
