//! The embedded broker (rumqttd) started when no `alert.mqtt_url` is configured, so a
//! single box (and the README demo) works with nothing else installed. It listens on
//! 127.0.0.1 only: production points `mqtt_url` at the hospital broker instead.
//! When `alert.username` and a password are configured, it requires them (rumqttd's
//! static credentials): other local processes cannot read or publish without them.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Largest publish the embedded broker accepts: a key image PNG is well below this.
const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

/// A running embedded broker. rumqttd has no shutdown; it lives as long as the process.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts rumqttd (MQTT 3.1.1) on `127.0.0.1:port`, open to any local client, and
    /// waits until it accepts connections.
    pub fn start(port: u16) -> Result<EmbeddedBroker> {
        EmbeddedBroker::start_with_login(port, None)
    }

    /// Like [`EmbeddedBroker::start`]; with `login` (username, password), a client must
    /// present exactly these in its CONNECT or is refused.
    pub fn start_with_login(port: u16, login: Option<(String, String)>) -> Result<EmbeddedBroker> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // rumqttd only logs a failed bind from its own thread: check first for a clear error.
        TcpListener::bind(addr).with_context(|| {
            format!(
                "cannot start the embedded MQTT broker on {addr}: port in use? \
                 (set alert.embedded_broker_port, or alert.mqtt_url to use an existing broker)"
            )
        })?;

        let server = ServerSettings {
            name: "cspine-embedded".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: MAX_PAYLOAD_BYTES,
                max_inflight_count: 100,
                auth: login.map(|(user, pass)| HashMap::from([(user, pass)])),
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: 1000,
                max_outgoing_packet_count: 200,
                max_segment_size: 100 * 1024 * 1024,
                max_segment_count: 10,
                ..RouterConfig::default()
            },
            v4: Some(HashMap::from([("1".to_owned(), server)])),
            ..Config::default()
        };
        std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                let mut broker = Broker::new(config);
                if let Err(err) = broker.start() {
                    log::error!("embedded MQTT broker stopped: {err}");
                }
            })
            .context("cannot start the embedded MQTT broker thread")?;

        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                bail!("the embedded MQTT broker did not start listening on {addr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        log::info!("embedded MQTT broker listening on {addr} (no alert.mqtt_url configured)");
        Ok(EmbeddedBroker { addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL clients use to reach it.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}
