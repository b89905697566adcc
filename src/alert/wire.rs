//! The two MQTT protocol versions behind one small interface, so [`super::mqtt`] holds the
//! delivery logic once. rumqttc has separate clients for 3.1.1 (`rumqttc`) and 5
//! (`rumqttc::v5`) with the same shape; this module maps their events and errors onto
//! [`WireEvent`] / [`WireError`] and adds the MQTT 5 publish properties (content type,
//! payload format, message expiry).

use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use rumqttc::{QoS, Transport};
use serde::{Deserialize, Serialize};

use super::broker_url::BrokerUrl;

/// `alert.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MqttProtocol {
    /// MQTT 3.1.1 (default: every broker speaks it).
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5: content types, message expiry, and PUBACK reason codes (a publish the
    /// broker refuses, e.g. by ACL, stays in the outbox instead of counting as delivered).
    #[serde(rename = "5")]
    V5,
}

/// What a publish carries, for the MQTT 5 content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    Json,
    Png,
}

/// Everything needed to build a client of either version.
pub struct WireOptions {
    pub client_id: String,
    pub url: BrokerUrl,
    pub keep_alive: Duration,
    pub login: Option<(String, String)>,
    pub transport: Option<Transport>,
    pub will_topic: String,
    pub will_payload: Vec<u8>,
    /// MQTT 5 only.
    pub message_expiry_secs: Option<u32>,
}

/// Sends requests to the event loop (never blocks: the caller bounds what is queued).
pub trait Wire: Send + Sync + 'static {
    fn publish(&self, topic: String, retain: bool, payload: Vec<u8>, kind: Payload) -> Result<()>;
    fn disconnect(&self);
}

/// The events of the event loop that delivery cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireEvent {
    ConnAck,
    /// A publish left the client with this packet id (in request order).
    PublishSent(u16),
    /// rumqttc held a publish back because its packet id was still in use.
    Collision(u16),
    /// PUBACK; `refused` carries the broker's reason when it did not accept the publish
    /// (MQTT 5 only; 3.1.1 cannot say).
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    Other,
}

/// A connection error, already turned into a log-ready reason.
#[derive(Debug)]
pub struct WireError {
    /// The client was dropped: stop polling.
    pub requests_done: bool,
    pub reason: String,
}

/// The event loop of either version.
pub trait EventSource: Send + 'static {
    fn poll(&mut self) -> impl Future<Output = Result<WireEvent, WireError>> + Send;
    /// After a connection error: drops requests still queued and whatever rumqttc kept for
    /// resending; after the next CONNACK the outbox resends everything itself.
    fn forget_queued(&mut self);
    /// After a CONNACK: drops what rumqttc would resend from an earlier session.
    fn forget_queued_after_connack(&mut self);
}

/// Builds the client and event loop for `protocol`.
pub fn connect(
    protocol: MqttProtocol,
    options: WireOptions,
    cap: usize,
    inflight: u16,
) -> (Box<dyn Wire>, Source) {
    match protocol {
        MqttProtocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(
                options.client_id,
                options.url.host.clone(),
                options.url.port,
            );
            o.set_keep_alive(options.keep_alive)
                .set_clean_session(true)
                .set_inflight(inflight)
                .set_max_packet_size(1024 * 1024, 64 * 1024 * 1024)
                .set_last_will(rumqttc::LastWill::new(
                    options.will_topic,
                    options.will_payload,
                    QoS::AtLeastOnce,
                    true,
                ));
            if let Some((user, pass)) = options.login {
                o.set_credentials(user, pass);
            }
            if let Some(t) = options.transport {
                o.set_transport(t);
            }
            let (client, eventloop) = rumqttc::AsyncClient::new(o, cap);
            (
                Box::new(client),
                Source::V311(Box::new(V311Source(eventloop, options.url))),
            )
        }
        MqttProtocol::V5 => {
            use rumqttc::v5::mqttbytes::v5::LastWillProperties;
            let mut o = rumqttc::v5::MqttOptions::new(
                options.client_id,
                options.url.host.clone(),
                options.url.port,
            );
            o.set_keep_alive(options.keep_alive)
                .set_clean_start(true)
                .set_session_expiry_interval(None)
                .set_outgoing_inflight_upper_limit(inflight)
                .set_max_packet_size(Some(1024 * 1024))
                .set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                    options.will_topic,
                    options.will_payload,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    true,
                    Some(LastWillProperties {
                        delay_interval: None,
                        payload_format_indicator: Some(1),
                        message_expiry_interval: None,
                        content_type: Some("application/json".into()),
                        response_topic: None,
                        correlation_data: None,
                        user_properties: Vec::new(),
                    }),
                ));
            if let Some((user, pass)) = options.login {
                o.set_credentials(user, pass);
            }
            if let Some(t) = options.transport {
                o.set_transport(t);
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(o, cap);
            let wire = V5Wire {
                client,
                expiry: options.message_expiry_secs,
            };
            (
                Box::new(wire),
                Source::V5(Box::new(V5Source(eventloop, options.url))),
            )
        }
    }
}

impl Wire for rumqttc::AsyncClient {
    fn publish(&self, topic: String, retain: bool, payload: Vec<u8>, _: Payload) -> Result<()> {
        Ok(self.try_publish(topic, QoS::AtLeastOnce, retain, payload)?)
    }
    fn disconnect(&self) {
        let _ = self.try_disconnect();
    }
}

struct V5Wire {
    client: rumqttc::v5::AsyncClient,
    expiry: Option<u32>,
}

impl Wire for V5Wire {
    fn publish(&self, topic: String, retain: bool, payload: Vec<u8>, kind: Payload) -> Result<()> {
        let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
            payload_format_indicator: (kind == Payload::Json).then_some(1),
            // The retained status must not expire; results and images may.
            message_expiry_interval: if retain { None } else { self.expiry },
            content_type: Some(
                match kind {
                    Payload::Json => "application/json",
                    Payload::Png => "image/png",
                }
                .into(),
            ),
            ..Default::default()
        };
        Ok(self.client.try_publish_with_properties(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            retain,
            payload,
            properties,
        )?)
    }
    fn disconnect(&self) {
        let _ = self.client.try_disconnect();
    }
}

/// Either event loop (an enum rather than a trait object: `poll` is async).
pub enum Source {
    V311(Box<V311Source>),
    V5(Box<V5Source>),
}

impl EventSource for Source {
    async fn poll(&mut self) -> Result<WireEvent, WireError> {
        match self {
            Source::V311(s) => s.poll().await,
            Source::V5(s) => s.poll().await,
        }
    }
    fn forget_queued(&mut self) {
        match self {
            Source::V311(s) => s.forget_queued(),
            Source::V5(s) => s.forget_queued(),
        }
    }
    fn forget_queued_after_connack(&mut self) {
        match self {
            Source::V311(s) => s.0.pending.clear(),
            Source::V5(s) => s.0.pending.clear(),
        }
    }
}

pub struct V311Source(rumqttc::EventLoop, BrokerUrl);

impl EventSource for V311Source {
    async fn poll(&mut self) -> Result<WireEvent, WireError> {
        use rumqttc::{ConnectReturnCode as Code, ConnectionError as E, Event, Incoming, Outgoing};
        match self.0.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => Ok(WireEvent::ConnAck),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(WireEvent::PublishSent(pkid)),
            Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => Ok(WireEvent::Collision(pkid)),
            Ok(Event::Incoming(Incoming::PubAck(ack))) => Ok(WireEvent::PubAck {
                pkid: ack.pkid,
                refused: None,
            }),
            Ok(_) => Ok(WireEvent::Other),
            Err(err) => {
                let url = &self.1;
                let reason = match &err {
                    E::RequestsDone => String::new(),
                    E::ConnectionRefused(Code::BadUserNamePassword) => refused_login(false),
                    E::ConnectionRefused(Code::NotAuthorized) => refused_login(true),
                    E::ConnectionRefused(Code::BadClientId) => refused_client_id(),
                    E::ConnectionRefused(code) => format!("CONNACK refused: {code:?}"),
                    E::Io(io) => io_reason(io, url),
                    E::NetworkTimeout => "timed out connecting".to_owned(),
                    E::Tls(tls) => tls_reason(tls),
                    other => other.to_string(),
                };
                Err(WireError {
                    requests_done: matches!(err, E::RequestsDone),
                    reason,
                })
            }
        }
    }
    fn forget_queued(&mut self) {
        self.0.clean();
        self.0.pending.clear();
    }
    fn forget_queued_after_connack(&mut self) {
        self.0.pending.clear();
    }
}

pub struct V5Source(rumqttc::v5::EventLoop, BrokerUrl);

impl EventSource for V5Source {
    async fn poll(&mut self) -> Result<WireEvent, WireError> {
        use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as Code, PubAckReason};
        use rumqttc::v5::{ConnectionError as E, Event, Incoming};
        use rumqttc::Outgoing;
        match self.0.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => Ok(WireEvent::ConnAck),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(WireEvent::PublishSent(pkid)),
            Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => Ok(WireEvent::Collision(pkid)),
            Ok(Event::Incoming(Incoming::PubAck(ack))) => Ok(WireEvent::PubAck {
                pkid: ack.pkid,
                refused: match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                    other => Some(match ack.properties.and_then(|p| p.reason_string) {
                        Some(why) => format!("{other:?}: {why}"),
                        None => format!("{other:?}"),
                    }),
                },
            }),
            Ok(_) => Ok(WireEvent::Other),
            Err(err) => {
                let url = &self.1;
                let reason = match &err {
                    E::RequestsDone => String::new(),
                    E::ConnectionRefused(Code::BadUserNamePassword) => refused_login(false),
                    E::ConnectionRefused(Code::NotAuthorized) => refused_login(true),
                    E::ConnectionRefused(Code::BadClientId | Code::ClientIdentifierNotValid) => {
                        refused_client_id()
                    }
                    E::ConnectionRefused(code) => format!("CONNACK refused: {code:?}"),
                    E::Io(io) => io_reason(io, url),
                    E::Timeout(_) => "timed out connecting".to_owned(),
                    E::Tls(tls) => tls_reason(tls),
                    other => other.to_string(),
                };
                Err(WireError {
                    requests_done: matches!(err, E::RequestsDone),
                    reason,
                })
            }
        }
    }
    fn forget_queued(&mut self) {
        self.0.clean();
        self.0.pending.clear();
    }
    fn forget_queued_after_connack(&mut self) {
        self.0.pending.clear();
    }
}

fn refused_login(not_authorized: bool) -> String {
    if not_authorized {
        "CONNACK refused: not authorized: bad username or password, or the broker's ACL \
         denies this client (check alert.username and alert.password / alert.password_file)"
            .to_owned()
    } else {
        "CONNACK refused: bad username or password (check alert.username and \
         alert.password / alert.password_file)"
            .to_owned()
    }
}

fn refused_client_id() -> String {
    "CONNACK refused: client id rejected (check alert.client_id)".to_owned()
}

fn io_reason(io: &std::io::Error, url: &BrokerUrl) -> String {
    if io.kind() == std::io::ErrorKind::ConnectionRefused {
        format!(
            "connection refused by {}:{} (is the broker running and listening there?)",
            url.host, url.port
        )
    } else {
        format!("network error: {io}")
    }
}

fn tls_reason(tls: &rumqttc::TlsError) -> String {
    format!(
        "TLS failed: {tls} (check alert.ca_file, the broker certificate's host name, and \
         alert.client_cert_file / client_key_file)"
    )
}
