//! MQTT delivery of outbox entries (rumqttc 0.25; MQTT 3.1.1, or 5 via [`super::wire`]).
//!
//! The outbox, not the client, is the source of truth. rumqttc forgets unacknowledged
//! publishes on a reconnect without a session, so we connect with a clean session and,
//! after every CONNACK, publish again everything still in the outbox, oldest first.
//! An entry is removed only when every one of its publishes got its PUBACK.
//!
//! Matching PUBACKs to entries: rumqttc assigns the packet id when it takes a request from
//! its channel and reports it as `Outgoing::Publish(pkid)`, in channel order. We push a
//! [`Tag`] into a FIFO under the same lock as each publish request, pop it on
//! `Outgoing::Publish(pkid)` and find it again on `Incoming::PubAck(pkid)`. Two rules keep
//! the FIFO in step with the channel:
//! - nothing is published while disconnected, and on every connection error the channel is
//!   drained (`EventLoop::clean`) under the lock, so no request of an old connection is
//!   sent on a new one;
//! - rumqttc takes requests from its channel in order and reports each publish when it
//!   writes it; a publish whose packet id is still in use (MQTT 5 brokers often allow only
//!   20 in flight, and rumqttc reuses ids modulo that) is reported as `AwaitAck` and held,
//!   and rumqttc takes no further request until it is written and reported, so the order
//!   of `Outgoing::Publish` events is still the order of our requests.
//!
//! The event loop is polled by one task that is never cancelled (cancelling `poll` in a
//! `select!` can lose a request that was taken from the channel but not yet written).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use rumqttc::{TlsConfiguration, Transport};
use serde::Serialize;
use time::OffsetDateTime;

use super::broker_url::BrokerUrl;
use super::outbox::Outbox;
use super::wire::{self, EventSource, Payload, Source, Wire, WireEvent, WireOptions};
use super::AlertConfig;
use crate::events::{Event, Events, Figures};
use crate::result::ModelInfo;

/// Most publishes awaiting PUBACK at once.
pub const WINDOW: usize = 32;
/// rumqttc's in-flight limit (= its packet-id space, lowered by an MQTT 5 broker's
/// receive maximum).
const CLIENT_INFLIGHT: u16 = 100;

/// The topics of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// `prefix` ends with `/` (the config normalises it).
    pub fn new(prefix: &str) -> Topics {
        Topics {
            prefix: prefix.to_owned(),
        }
    }
    /// Every result, QoS 1.
    pub fn result(&self) -> String {
        format!("{}result", self.prefix)
    }
    /// Positive results only, QoS 1.
    pub fn alert(&self) -> String {
        format!("{}alert", self.prefix)
    }
    /// Retained online/offline state; offline is the Last Will.
    pub fn status(&self) -> String {
        format!("{}status", self.prefix)
    }
    /// Key image PNG of result `id`, QoS 1, not retained. Characters that would break the
    /// topic level (`/`, `+`, `#`, NUL) become `_`; the schema keeps ids free of them anyway.
    pub fn key_image(&self, id: &str) -> String {
        let level: String = id
            .chars()
            .map(|c| {
                if matches!(c, '/' | '+' | '#' | '\0') {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        format!("{}keyimage/{level}", self.prefix)
    }
}

/// What the retained `status` topic says about this daemon.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusInfo {
    /// cspine-triage version.
    pub version: String,
    /// The loaded model, when there is one.
    pub model: Option<ModelInfo>,
}

impl StatusInfo {
    pub fn new(model: Option<ModelInfo>) -> StatusInfo {
        StatusInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            model,
        }
    }
}

#[derive(Serialize)]
struct StatusPayload<'a> {
    state: &'a str,
    site: &'a str,
    device: &'a str,
    version: &'a str,
    model: Option<&'a ModelInfo>,
    #[serde(with = "time::serde::rfc3339::option")]
    since: Option<OffsetDateTime>,
    /// Key figures, while online and when the daemon provides them.
    #[serde(skip_serializing_if = "Option::is_none")]
    figures: Option<Figures>,
}

/// The status payload; `since` is when this run started delivering (`None`: offline).
fn status_payload(
    config: &AlertConfig,
    info: &StatusInfo,
    since: Option<OffsetDateTime>,
    figures: Option<Figures>,
) -> Vec<u8> {
    let payload = StatusPayload {
        state: if since.is_some() { "online" } else { "offline" },
        site: &config.site,
        device: &config.device,
        version: &info.version,
        model: info.model.as_ref(),
        // The Last Will is fixed at connect time: it cannot know when we went offline.
        since,
        figures,
    };
    serde_json::to_vec(&payload).expect("status serialises")
}

/// Client options from the config: credentials, TLS, keep-alive and the Last Will.
/// Reads the password, CA and client certificate files (errors name the config key).
pub fn wire_options(
    config: &AlertConfig,
    url: &BrokerUrl,
    info: &StatusInfo,
) -> Result<WireOptions> {
    let login = match &config.username {
        Some(user) => Some((user.clone(), config.password()?.unwrap_or_default())),
        None => None,
    };
    let transport = if url.tls {
        let ca_path = match &config.ca_file {
            Some(path) => path.clone(),
            None => {
                let system = std::path::PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
                ensure!(
                    system.exists(),
                    "{url} uses TLS but alert.ca_file is not set and there is no system CA \
                     bundle at {}",
                    system.display()
                );
                system
            }
        };
        let ca = std::fs::read(&ca_path)
            .with_context(|| format!("cannot read alert.ca_file {}", ca_path.display()))?;
        let client_auth = match (&config.client_cert_file, &config.client_key_file) {
            (Some(cert), Some(key)) => Some((
                std::fs::read(cert).with_context(|| {
                    format!("cannot read alert.client_cert_file {}", cert.display())
                })?,
                std::fs::read(key).with_context(|| {
                    format!("cannot read alert.client_key_file {}", key.display())
                })?,
            )),
            _ => None,
        };
        Some(Transport::tls_with_config(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        }))
    } else {
        None
    };
    Ok(WireOptions {
        client_id: config.effective_client_id(),
        url: url.clone(),
        keep_alive: Duration::from_secs(config.keep_alive_secs),
        login,
        transport,
        will_topic: Topics::new(&config.effective_topic_prefix()).status(),
        will_payload: status_payload(config, info, None, None),
        message_expiry_secs: config.message_expiry_secs,
    })
}

/// What one publish is for, so its PUBACK can be credited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Entry(u64),
    Status,
}

/// Connection-scoped bookkeeping, shared by the poll task and the sender; see the module
/// documentation for why every publish request is made under this lock.
#[derive(Default)]
struct Link {
    connected: bool,
    /// Incremented at every CONNACK.
    epoch: u64,
    /// Sent, packet id not yet known.
    unassigned: VecDeque<Tag>,
    by_pkid: HashMap<u16, Tag>,
    /// Unacknowledged publishes per entry in this connection.
    remaining: HashMap<u64, usize>,
    /// Highest outbox sequence number sent in this connection.
    cursor: u64,
    /// Publishes awaiting PUBACK.
    outstanding: usize,
}

impl Link {
    fn reset(&mut self) {
        self.unassigned.clear();
        self.by_pkid.clear();
        self.remaining.clear();
        self.cursor = 0;
        self.outstanding = 0;
    }

    fn send(&mut self, wire: &dyn Wire, tag: Tag, publish: Publish, retain: bool) {
        let (topic, kind, payload) = publish;
        self.unassigned.push_back(tag);
        self.outstanding += 1;
        if let Err(err) = wire.publish(topic, retain, payload, kind) {
            // Only possible when the event loop is gone (shutting down); the entry stays in
            // the outbox and is sent on the next start.
            self.unassigned.pop_back();
            self.outstanding -= 1;
            log::warn!("cannot queue a publish: {err:#}");
        }
    }
}

type Publish = (String, Payload, Vec<u8>);

/// Shared between the poll task and the sender task.
struct Delivery {
    wire: Box<dyn Wire>,
    link: Mutex<Link>,
    outbox: Outbox,
    topics: Topics,
    /// Wakes the sender: connected, entries acknowledged or committed.
    wake: tokio::sync::Notify,
    /// Signalled whenever a PUBACK arrives (for the shutdown drain).
    acked: tokio::sync::Notify,
    /// The current `online` status (its figures refreshed by [`Delivery::refresh_status`]).
    online: Mutex<Vec<u8>>,
    offline: Vec<u8>,
    events: Events,
}

impl Delivery {
    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send_status(&self, link: &mut Link, online: bool) {
        let payload = if online {
            self.online
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        } else {
            self.offline.clone()
        };
        let publish = (self.topics.status(), Payload::Json, payload);
        link.send(&*self.wire, Tag::Status, publish, true);
    }

    /// Re-publishes the retained `online` status when its key figures changed.
    fn refresh_status(&self, fresh: Vec<u8>) {
        {
            let mut online = self.online.lock().unwrap_or_else(|p| p.into_inner());
            if *online == fresh {
                return;
            }
            *online = fresh;
        }
        let mut link = self.link();
        if link.connected {
            self.send_status(&mut link, true);
        }
    }

    /// Sends outbox entries in sequence order until the window is full or all are sent.
    fn fill_window(&self) {
        loop {
            let (epoch, cursor) = {
                let link = self.link();
                if !link.connected || link.outstanding + 3 > WINDOW {
                    return;
                }
                (link.epoch, link.cursor)
            };
            let Some(meta) = self.outbox.next_after(cursor) else {
                return;
            };
            // Read the file without holding the lock.
            let entry = match self.outbox.load(meta.seq) {
                Ok(entry) => entry,
                Err(err) => {
                    if self.outbox.contains(meta.seq) {
                        if let Err(e) = self.outbox.quarantine(meta.seq, &err) {
                            log::error!("{e:#}");
                            // Skip it in this connection rather than spin on it.
                            let mut link = self.link();
                            if link.epoch == epoch {
                                link.cursor = link.cursor.max(meta.seq);
                            }
                        }
                    }
                    continue;
                }
            };
            let mut link = self.link();
            if !link.connected || link.epoch != epoch {
                return;
            }
            let mut publishes: Vec<Publish> = Vec::with_capacity(3);
            // Key image first: a dashboard that gets the result can already show it.
            if let Some(png) = entry.key_image_png {
                publishes.push((self.topics.key_image(&entry.id), Payload::Png, png));
            }
            if entry.positive {
                publishes.push((
                    self.topics.result(),
                    Payload::Json,
                    entry.result_json.clone(),
                ));
                publishes.push((self.topics.alert(), Payload::Json, entry.result_json));
            } else {
                publishes.push((self.topics.result(), Payload::Json, entry.result_json));
            }
            link.remaining.insert(entry.seq, publishes.len());
            link.cursor = entry.seq;
            for publish in publishes {
                link.send(&*self.wire, Tag::Entry(entry.seq), publish, false);
            }
            log::debug!("published outbox entry {} (id {})", entry.seq, entry.id);
        }
    }

    /// Handles one event of the event loop; returns entries that are now fully delivered.
    fn on_event(&self, event: &WireEvent) -> Vec<u64> {
        let mut delivered = Vec::new();
        match event {
            WireEvent::PublishSent(pkid) => {
                let mut link = self.link();
                match link.unassigned.pop_front() {
                    Some(tag) => {
                        link.by_pkid.insert(*pkid, tag);
                    }
                    None => log::warn!("publish {pkid} was not sent by the outbox; ignored"),
                }
            }
            WireEvent::Collision(pkid) => {
                // Held until packet id {pkid} is acknowledged, then reported as
                // `PublishSent` in order (see the module documentation).
                log::debug!("publish waits for packet id {pkid} to be acknowledged");
            }
            WireEvent::PubAck { pkid, refused } => {
                let mut link = self.link();
                if let Some(tag) = link.by_pkid.remove(pkid) {
                    link.outstanding -= 1;
                    match (tag, refused) {
                        (Tag::Entry(seq), Some(why)) => {
                            // Keep it: it is retried after the next reconnect or restart.
                            link.remaining.remove(&seq);
                            log::error!(
                                "the broker refused a publish of outbox entry {seq}: {why}; \
                                 it stays in the outbox (check the broker's ACL for {}#)",
                                self.topics.prefix
                            );
                        }
                        (Tag::Entry(seq), None) => {
                            if let Some(left) = link.remaining.get_mut(&seq) {
                                *left -= 1;
                                if *left == 0 {
                                    link.remaining.remove(&seq);
                                    delivered.push(seq);
                                }
                            }
                        }
                        (Tag::Status, Some(why)) => {
                            log::error!("the broker refused the status publish: {why}")
                        }
                        (Tag::Status, None) => {}
                    }
                }
                drop(link);
                self.acked.notify_waiters();
            }
            WireEvent::ConnAck | WireEvent::Other => {}
        }
        delivered
    }
}

/// Runs the MQTT side until `shutdown` fires: connects (with backoff), keeps the retained
/// status, publishes outbox entries and removes them once acknowledged. On shutdown it
/// waits up to `shutdown_drain_secs` for the outbox to empty, then publishes `offline` and
/// disconnects.
pub async fn deliver(
    config: AlertConfig,
    url: BrokerUrl,
    info: StatusInfo,
    outbox: Outbox,
    wake: Arc<tokio::sync::Notify>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    events: Events,
) -> Result<()> {
    let options = wire_options(&config, &url, &info)?;
    // "since" in the status is when this run started delivering.
    let since = OffsetDateTime::now_utc();
    let mut status_tick =
        tokio::time::interval(Duration::from_secs_f64(config.status_interval_secs));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The channel never holds more than WINDOW publishes + status + disconnect.
    let (wire, source) = wire::connect(config.protocol, options, WINDOW + 8, CLIENT_INFLIGHT);
    let delivery = Arc::new(Delivery {
        wire,
        link: Mutex::new(Link::default()),
        outbox: outbox.clone(),
        topics: Topics::new(&config.effective_topic_prefix()),
        wake: tokio::sync::Notify::new(),
        acked: tokio::sync::Notify::new(),
        online: Mutex::new(status_payload(
            &config,
            &info,
            Some(since),
            events.figures(),
        )),
        offline: status_payload(&config, &info, None, None),
        events: events.clone(),
    });
    let poller = tokio::spawn(poll_loop(
        source,
        delivery.clone(),
        url.clone(),
        Duration::from_secs_f64(config.reconnect_min_secs),
        Duration::from_secs_f64(config.reconnect_max_secs),
    ));

    // Sender: fills the window whenever something changed.
    loop {
        delivery.fill_window();
        tokio::select! {
            _ = delivery.wake.notified() => {}
            _ = wake.notified() => {}
            _ = status_tick.tick() => delivery.refresh_status(
                status_payload(&config, &info, Some(since), events.figures()),
            ),
            _ = shutdown.changed() => break,
        }
    }

    // Drain: give the broker a moment to take what is left.
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs_f64(config.shutdown_drain_secs);
    loop {
        delivery.fill_window();
        if outbox.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            log::warn!(
                "shutting down with {} result(s) not yet acknowledged by {url}: they stay in \
                 the outbox {} and are published on the next start",
                outbox.len(),
                outbox.dir().display()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A clean DISCONNECT suppresses the Last Will, so say offline ourselves.
    let sent_offline = {
        let mut link = delivery.link();
        if link.connected {
            delivery.send_status(&mut link, false);
            true
        } else {
            false
        }
    };
    if sent_offline {
        let wait = async {
            loop {
                let acked = delivery.acked.notified();
                tokio::pin!(acked);
                acked.as_mut().enable();
                if delivery.link().outstanding == 0 {
                    break;
                }
                acked.await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
        delivery.wire.disconnect();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    poller.abort();
    Ok(())
}

async fn poll_loop(
    mut source: Source,
    delivery: Arc<Delivery>,
    url: BrokerUrl,
    min_delay: Duration,
    max_delay: Duration,
) {
    let mut delay = min_delay;
    let mut failures: u32 = 0;
    loop {
        match source.poll().await {
            Ok(WireEvent::ConnAck) => {
                let waiting = delivery.outbox.len();
                {
                    let mut link = delivery.link();
                    // Clean session: anything rumqttc kept from before is ours to resend.
                    source.forget_queued_after_connack();
                    link.reset();
                    link.connected = true;
                    link.epoch += 1;
                    delivery.send_status(&mut link, true);
                }
                let after = if failures > 0 {
                    format!(" after {failures} failed attempt(s)")
                } else {
                    String::new()
                };
                log::info!(
                    "connected to MQTT broker {url}{after}; {waiting} result(s) in the outbox \
                     to publish"
                );
                delivery.events.emit(Event::BrokerConnected {
                    failed_attempts: failures,
                });
                delay = min_delay;
                failures = 0;
                delivery.wake.notify_one();
            }
            Ok(event) => {
                let delivered = delivery.on_event(&event);
                if !delivered.is_empty() {
                    // Unlink + directory fsync take ~10 ms on an ext4 VM disk: off the
                    // runtime. A crash before it completes only means one more delivery.
                    let outbox = delivery.outbox.clone();
                    let events = delivery.events.clone();
                    tokio::task::spawn_blocking(move || {
                        for seq in delivered {
                            match outbox.remove(seq) {
                                Ok(Some(meta)) => {
                                    log::info!(
                                        "result {} delivered: the broker acknowledged outbox \
                                         entry {seq}, removed",
                                        meta.id
                                    );
                                    events.emit(Event::ResultPublished { result_id: meta.id });
                                    events.emit(super::outbox_depth(&outbox));
                                }
                                Ok(None) => {}
                                Err(err) => log::error!("{err:#}"),
                            }
                        }
                    });
                    delivery.wake.notify_one();
                }
            }
            Err(err) if err.requests_done => return,
            Err(err) => {
                let was_connected = {
                    let mut link = delivery.link();
                    let was = link.connected;
                    link.connected = false;
                    link.reset();
                    // Drop requests still in the channel so none reaches the next connection
                    // (the outbox resends them after the next CONNACK).
                    source.forget_queued();
                    was
                };
                failures += 1;
                let why = err.reason;
                if was_connected {
                    log::warn!(
                        "lost the connection to MQTT broker {url}: {why}; reconnecting in {:.1} s",
                        delay.as_secs_f64()
                    );
                } else {
                    log::error!(
                        "cannot connect to MQTT broker {url}: {why}; retrying in {:.1} s \
                         (results stay in the outbox: nothing is lost)",
                        delay.as_secs_f64()
                    );
                }
                delivery.events.emit(Event::BrokerConnectionFailed {
                    was_connected,
                    retry_in_secs: delay.as_secs_f64(),
                });
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(max_delay);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_under_prefix() {
        let t = Topics::new("cspine/site/ct1/");
        assert_eq!(t.result(), "cspine/site/ct1/result");
        assert_eq!(t.alert(), "cspine/site/ct1/alert");
        assert_eq!(t.status(), "cspine/site/ct1/status");
        assert_eq!(t.key_image("abc"), "cspine/site/ct1/keyimage/abc");
        assert_eq!(t.key_image("a/b+#"), "cspine/site/ct1/keyimage/a_b__");
    }
}
