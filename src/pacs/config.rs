//! `[pacs]` section: where result objects are sent by C-STORE, as whom, how patiently.
//!
//! ```toml
//! [pacs]
//! queue_dir = "/var/lib/cspine-triage/pacs"
//! [[pacs.destinations]]
//! name = "main-pacs"
//! ae_title = "PACS"
//! host = "pacs.hospital.example"
//! port = 104
//! ```
//!
//! No destination (the default): nothing is sent and no sender runs.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::dicom::access::validate_ae_title;
use crate::dicom::tls::{Role, TlsConfig};

/// `[pacs]`: the durable queue and the destinations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PacsConfig {
    /// Durable delivery queue, one sub-directory per destination (entries are fsynced here
    /// before `enqueue` returns). Must be inside the unit's StateDirectory.
    pub queue_dir: PathBuf,
    /// Retry backoff after a failed connection or a transient refusal: starts at
    /// `retry_initial_secs`, doubles per failed attempt, capped at `retry_max_secs`.
    pub retry_initial_secs: f64,
    pub retry_max_secs: f64,
    /// `[[pacs.destinations]]`: every result object goes to each of them.
    pub destinations: Vec<DestinationConfig>,
}

impl Default for PacsConfig {
    fn default() -> Self {
        PacsConfig {
            queue_dir: PathBuf::from("/var/lib/cspine-triage/pacs"),
            retry_initial_secs: 1.0,
            retry_max_secs: 300.0,
            destinations: Vec::new(),
        }
    }
}

/// One `[[pacs.destinations]]` entry: a Storage SCP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Our name for it (letters, digits, `-`, `_`; 1 to 64): its queue directory and its
    /// name in logs and metrics.
    pub name: String,
    /// The PACS's AE title (the called AE).
    pub ae_title: String,
    pub host: String,
    pub port: u16,
    /// Our AE title towards it (the calling AE); default `dicom.ae_title`.
    #[serde(default)]
    pub calling_ae_title: Option<String>,
    /// Seconds to open the TCP connection and have the association accepted.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: f64,
    /// Seconds each DIMSE exchange (sending one object, waiting for its response, the
    /// release) may take before the association is dropped and retried later.
    #[serde(default = "default_dimse_timeout")]
    pub dimse_timeout_secs: f64,
    /// DICOM TLS towards this destination (`[pacs.destinations.tls]`, the keys of
    /// [`crate::dicom::tls::TlsConfig`]): `ca` (required: the destination's certificate is
    /// always verified), `certificate` and `private_key` when the PACS asks for a client
    /// certificate, `server_name` when the certificate names another host than `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

fn default_connect_timeout() -> f64 {
    10.0
}

fn default_dimse_timeout() -> f64 {
    60.0
}

impl PacsConfig {
    /// Checks every key; the error names the offending one.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.retry_initial_secs.is_finite()
                && self.retry_initial_secs > 0.0
                && self.retry_max_secs.is_finite()
                && self.retry_initial_secs <= self.retry_max_secs,
            "pacs.retry_initial_secs must be > 0 and <= pacs.retry_max_secs"
        );
        ensure!(
            self.destinations.is_empty() || !self.queue_dir.as_os_str().is_empty(),
            "pacs.queue_dir must be set when destinations are configured"
        );
        let mut names = HashSet::new();
        for (i, d) in self.destinations.iter().enumerate() {
            d.validate()
                .with_context(|| format!("pacs.destinations[{i}] ({:?})", d.name))?;
            ensure!(
                names.insert(d.name.as_str()),
                "pacs.destinations: name {:?} is used twice",
                d.name
            );
        }
        Ok(())
    }

    pub fn retry_initial(&self) -> Duration {
        Duration::from_secs_f64(self.retry_initial_secs)
    }

    pub fn retry_max(&self) -> Duration {
        Duration::from_secs_f64(self.retry_max_secs)
    }
}

impl DestinationConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.name.is_empty()
                && self.name.len() <= 64
                && self
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "name must be 1 to 64 letters, digits, '-' or '_' (it names a directory)"
        );
        validate_ae_title(&self.ae_title).context("ae_title")?;
        if let Some(calling) = &self.calling_ae_title {
            validate_ae_title(calling).context("calling_ae_title")?;
        }
        ensure!(!self.host.trim().is_empty(), "host must not be empty");
        ensure!(self.port != 0, "port must not be 0");
        for (key, secs) in [
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("dimse_timeout_secs", self.dimse_timeout_secs),
        ] {
            ensure!(
                secs.is_finite() && secs > 0.0 && secs <= 3600.0,
                "{key} must be > 0 and at most 3600, got {secs}"
            );
        }
        if let Some(tls) = &self.tls {
            let problems = tls.problems(Role::Client);
            if let Some(first) = problems.first() {
                anyhow::bail!("{first}");
            }
        }
        Ok(())
    }

    /// The calling AE title: this destination's own, else `default` (`dicom.ae_title`).
    pub fn calling_ae<'a>(&'a self, default: &'a str) -> &'a str {
        self.calling_ae_title.as_deref().unwrap_or(default)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_secs)
    }

    pub fn dimse_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.dimse_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destination() -> DestinationConfig {
        toml::from_str(
            r#"
name = "main-pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
"#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_and_calling_ae() {
        let d = destination();
        assert_eq!(d.connect_timeout_secs, 10.0);
        assert_eq!(d.calling_ae("CSPINE"), "CSPINE");
        let mut config = PacsConfig::default();
        config.destinations.push(d);
        config.validate().unwrap();
    }

    #[test]
    fn bad_keys_are_named() {
        type Spoil = fn(&mut PacsConfig);
        let cases: [(Spoil, &str); 6] = [
            (|c| c.destinations[0].name = "a/b".into(), "name"),
            (|c| c.destinations[0].ae_title = "".into(), "ae_title"),
            (|c| c.destinations[0].port = 0, "port"),
            (
                |c| c.destinations[0].dimse_timeout_secs = 0.0,
                "dimse_timeout_secs",
            ),
            (|c| c.retry_initial_secs = 600.0, "pacs.retry_initial_secs"),
            (
                |c| c.destinations.push(c.destinations[0].clone()),
                "used twice",
            ),
        ];
        for (spoil, key) in cases {
            let mut config = PacsConfig {
                destinations: vec![destination()],
                ..PacsConfig::default()
            };
            spoil(&mut config);
            let err = format!("{:#}", config.validate().unwrap_err());
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn a_tls_table_takes_the_dicom_tls_keys_and_a_missing_ca_is_refused() {
        let err = toml::from_str::<DestinationConfig>(
            "name = \"p\"\nae_title = \"P\"\nhost = \"h\"\nport = 1\n[tls]\nca_file = \"x\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("ca_file"), "{err}");
        let d = toml::from_str::<DestinationConfig>(
            "name = \"p\"\nae_title = \"P\"\nhost = \"h\"\nport = 1\n[tls]\nca = \"/nonexistent/ca.pem\"\n",
        )
        .unwrap();
        let err = format!("{:#}", d.validate().unwrap_err());
        assert!(err.contains("tls"), "{err}");
    }
}
