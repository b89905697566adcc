//! The broker address: `alert.mqtt_url` parsed into [`BrokerUrl`] (scheme, host, port).
//! Its own module so that the MQTT client ([`super::mqtt`]) and the protocol adapter
//! ([`super::wire`]) both use it without importing each other.

use anyhow::{bail, ensure, Context, Result};

/// Broker address parsed from `mqtt://host[:port]` / `mqtts://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<BrokerUrl> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            bail!("alert.mqtt_url {url:?} must start with mqtt:// or mqtts://");
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        ensure!(
            !rest.contains(['/', '?', '@']),
            "alert.mqtt_url {url:?}: only mqtt[s]://host[:port] is supported \
             (credentials go in alert.username / alert.password_file)"
        );
        let default_port = if tls { 8883 } else { 1883 };
        // [v6]:port, host:port, host
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .with_context(|| format!("alert.mqtt_url {url:?}: unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => bail!("alert.mqtt_url {url:?}: unexpected {after:?} after the address"),
            };
            (host.to_owned(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (rest.to_owned(), None),
            }
        };
        ensure!(!host.is_empty(), "alert.mqtt_url {url:?} has no host");
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .with_context(|| format!("alert.mqtt_url {url:?}: invalid port {p:?}"))?,
            None => default_port,
        };
        Ok(BrokerUrl { tls, host, port })
    }
}

impl BrokerUrl {
    /// Whether the broker is on this machine (`localhost` or a loopback address), so
    /// nothing sent to it crosses a network.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let u = BrokerUrl::parse("mqtt://broker.example:1884").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (false, "broker.example", 1884)
        );
        let u = BrokerUrl::parse("mqtts://10.0.0.2").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "10.0.0.2", 8883));
        let u = BrokerUrl::parse("mqtt://[::1]:1999/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 1999));
        assert_eq!(u.to_string(), "mqtt://[::1]:1999");
        for bad in [
            "tcp://x",
            "mqtt://",
            "mqtt://h:port",
            "mqtt://u:p@h",
            "mqtt://h/topic",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad} must be rejected");
        }
    }
}
