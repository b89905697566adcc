//! DICOM ingest: association handling (C-ECHO / C-STORE SCP) and the durable spool.
//!
//! - [`scp`]: the Storage SCP (bind, accept, negotiate, receive C-STORE, answer).
//! - [`access`]: who may associate (called AE, calling-AE allow-list, peer address).
//! - [`echo`]: a C-ECHO SCU (`cspine-triage echo`), over TCP or TLS.
//! - [`dimse`]: the DIMSE command sets we read and write, and their status codes.
//! - [`limits`]: how many associations at once (in all, per peer address) and how many
//!   refusals of connections over those limits.
//! - [`refusal`]: answering connections that are not served (A-ASSOCIATE-RJ when busy,
//!   A-ABORT on a raw socket), in bounded time and memory.
//! - [`peer_text`]: peer-supplied strings (AE titles, UIDs, comments) quoted and escaped
//!   for log lines.
//! - [`lengths`]: declared element lengths checked against the bytes received, before
//!   anything is parsed (a lying length must not cost gigabytes and minutes).
//! - [`scu`]: a minimal C-STORE SCU (`cspine-triage send`).
//! - [`spool`]: the durable on-disk spool and its whole life cycle (atomic, fsynced
//!   writes; duplicates and corrections; analysed marks; release; re-index; the janitor).
//! - [`syntax`]: which SOP classes and transfer syntaxes we accept, and why.
//! - [`tls`]: DICOM TLS: the config shape shared by the SCP and every SCU, and the
//!   rustls server and client configurations built from it.

pub mod access;
pub mod dimse;
pub mod echo;
pub mod lengths;
pub mod limits;
pub mod peer_text;
pub mod refusal;
pub mod scp;

pub mod scu;
pub mod spool;
pub mod syntax;
pub mod tls;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use scp::{run_scp, Scp};
pub use spool::{Spool, SpoolOptions};

/// `[dicom]` section: the Storage SCP and its spool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScpConfig {
    /// Our AE title; associations calling another title are rejected.
    pub ae_title: String,
    /// Address and port to listen on (port 0: any free port, logged at start-up).
    pub bind: String,
    pub port: u16,
    /// Directory of the durable spool (instances are fsynced here before Success).
    pub spool_dir: PathBuf,
    /// Calling AE titles allowed to associate, each optionally pinned to a peer address:
    /// `"CTSCANNER"` or `"CTSCANNER@10.1.2.3"`. Empty: any calling AE is accepted. When
    /// every entry is pinned, a connection from any other address is closed at accept,
    /// before it takes an association slot.
    pub allowed_calling_aes: Vec<String>,
    /// Storage SOP classes accepted (Verification is always accepted). Non-CT classes are
    /// stored and then skipped, with a reason, by the series assembler.
    pub sop_classes: Vec<String>,
    /// More simultaneous associations than this are rejected (transient, local limit exceeded).
    pub max_associations: usize,
    /// More simultaneous associations than this from one peer address are rejected the
    /// same way, so that one address cannot take every slot (default 4 of the 8 slots).
    pub max_associations_per_address: usize,
    /// Largest P-DATA PDU we accept (bytes, without the 6-byte PDU header).
    pub max_pdu_length: u32,
    /// Seconds a new connection has to send its A-ASSOCIATE-RQ (DICOM ARTIM timer).
    pub artim_timeout_secs: f64,
    /// Seconds of silence after which an established association is aborted.
    pub idle_timeout_secs: f64,
    /// Seconds one PDU (a response, A-RELEASE-RP, A-ASSOCIATE-RJ, A-ABORT) may take to
    /// be sent. A peer that stops reading is cut off after this and its slot freed.
    pub send_timeout_secs: f64,
    /// Below this much free space (MB) in the spool, C-STOREs are refused with A700
    /// (Out of Resources) instead of being accepted and lost. Checked when a C-STORE
    /// starts and again before every chunk of a large instance is written.
    pub min_free_space_mb: u64,
    /// Largest instance accepted (MB of data set). A CT slice is about 0.5 MB; an enhanced
    /// multi-frame CT can be hundreds. A larger one is drained and refused with A700, and
    /// nothing of it is kept.
    pub max_instance_mb: u64,
    /// An instance whose SOP Instance UID is already in the spool with a *different* data
    /// set: `"replace"` (the newer version replaces the older and its series is analysed
    /// again, as a scanner re-sending a corrected instance expects) or `"keep-first"`. The
    /// same data set again is always an idempotent Success.
    pub duplicate_policy: spool::DuplicatePolicy,
    /// `[dicom.tls]`: a second, TLS, listening port (DICOM TLS Secure Transport
    /// Connection). Absent: no TLS port.
    pub tls: Option<ScpTlsConfig>,
}

/// `[dicom.tls]`: the SCP's TLS port. Every limit of the plain port (allow-list,
/// association slots in all and per address, timers, TCP_NODELAY) applies to it too; a
/// TLS connection takes its association slot before the handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScpTlsConfig {
    /// TLS port (2762 is the port registered for DICOM over TLS; 0: any free port).
    pub port: u16,
    /// Whether the plain port (`dicom.port`) stays open beside the TLS port. `false`:
    /// only TLS connections are served.
    pub plain: bool,
    /// Seconds the TLS handshake may take. The A-ASSOCIATE-RQ then has
    /// `dicom.artim_timeout_secs`; the two are one deadline (their sum) from accept.
    pub handshake_timeout_secs: f64,
    /// PEM file with our certificate chain (leaf first). Required.
    pub certificate: Option<PathBuf>,
    /// PEM file with its private key. Required.
    pub private_key: Option<PathBuf>,
    /// PEM bundle of the CAs whose client certificates are accepted (with `verify_client`).
    pub ca: Option<PathBuf>,
    /// Require a client certificate signed by `ca`; without one the handshake fails and
    /// no association is made.
    pub verify_client: bool,
}

impl Default for ScpTlsConfig {
    fn default() -> Self {
        ScpTlsConfig {
            port: 2762,
            plain: true,
            handshake_timeout_secs: 10.0,
            certificate: None,
            private_key: None,
            ca: None,
            verify_client: false,
        }
    }
}

impl ScpTlsConfig {
    /// The shared TLS shape ([`tls::TlsConfig`]) of these keys.
    pub fn tls(&self) -> tls::TlsConfig {
        tls::TlsConfig {
            certificate: self.certificate.clone(),
            private_key: self.private_key.clone(),
            ca: self.ca.clone(),
            verify_client: self.verify_client,
            server_name: None,
        }
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.handshake_timeout_secs)
    }
}

impl Default for ScpConfig {
    fn default() -> Self {
        ScpConfig {
            ae_title: "CSPINE".into(),
            bind: "0.0.0.0".into(),
            port: 11112,
            spool_dir: PathBuf::from("/var/lib/cspine-triage/spool"),
            allowed_calling_aes: Vec::new(),
            sop_classes: syntax::DEFAULT_STORAGE_SOP_CLASSES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            max_associations: 8,
            max_associations_per_address: 4,
            max_pdu_length: 65536,
            artim_timeout_secs: 30.0,
            idle_timeout_secs: 120.0,
            send_timeout_secs: 30.0,
            min_free_space_mb: 1024,
            max_instance_mb: 1024,
            duplicate_policy: spool::DuplicatePolicy::Replace,
            tls: None,
        }
    }
}

impl ScpConfig {
    pub fn validate(&self) -> Result<()> {
        access::validate_ae_title(&self.ae_title).context("dicom.ae_title")?;
        access::AllowList::parse(&self.allowed_calling_aes).context("dicom.allowed_calling_aes")?;
        ensure!(
            !self.sop_classes.is_empty(),
            "dicom.sop_classes must list at least one storage SOP class"
        );
        for uid in &self.sop_classes {
            ensure!(
                syntax::is_valid_uid(uid),
                "dicom.sop_classes: {uid:?} is not a UID (digits and dots, at most 64 characters)"
            );
        }
        ensure!(
            self.max_associations >= 1,
            "dicom.max_associations must be at least 1"
        );
        ensure!(
            self.max_associations_per_address >= 1,
            "dicom.max_associations_per_address must be at least 1"
        );
        ensure!(
            (dicom_ul::pdu::MINIMUM_PDU_SIZE..=dicom_ul::pdu::MAXIMUM_PDU_SIZE)
                .contains(&self.max_pdu_length),
            "dicom.max_pdu_length must be between {} and {}, got {}",
            dicom_ul::pdu::MINIMUM_PDU_SIZE,
            dicom_ul::pdu::MAXIMUM_PDU_SIZE,
            self.max_pdu_length
        );
        ensure!(
            self.artim_timeout_secs > 0.0 && self.artim_timeout_secs.is_finite(),
            "dicom.artim_timeout_secs must be > 0"
        );
        ensure!(
            self.idle_timeout_secs > 0.0 && self.idle_timeout_secs.is_finite(),
            "dicom.idle_timeout_secs must be > 0"
        );
        ensure!(
            self.max_instance_mb >= 1,
            "dicom.max_instance_mb must be at least 1"
        );
        ensure!(
            self.send_timeout_secs > 0.0 && self.send_timeout_secs.is_finite(),
            "dicom.send_timeout_secs must be > 0"
        );
        ensure!(
            !self.spool_dir.as_os_str().is_empty(),
            "dicom.spool_dir must not be empty"
        );
        if let Some(t) = &self.tls {
            ensure!(
                t.handshake_timeout_secs > 0.0 && t.handshake_timeout_secs.is_finite(),
                "dicom.tls.handshake_timeout_secs must be > 0"
            );
            ensure!(
                !t.plain || t.port == 0 || t.port != self.port,
                "dicom.tls.port must differ from dicom.port ({})",
                self.port
            );
        }
        Ok(())
    }

    /// Loads the TLS files `[dicom.tls]` names and reports every problem, each naming
    /// its key and file (`check-config`; the SCP refuses to start on the first).
    pub fn tls_problems(&self) -> Vec<String> {
        match &self.tls {
            None => Vec::new(),
            Some(t) => t
                .tls()
                .problems(tls::Role::Server)
                .into_iter()
                .map(|e| format!("dicom.{e}"))
                .collect(),
        }
    }

    pub fn artim_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.artim_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.idle_timeout_secs)
    }

    pub fn send_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.send_timeout_secs)
    }
}

/// Message from the SCP (or the spool re-index at start-up) to the series assembler:
/// one instance that is durably on disk.
#[derive(Debug, Clone)]
pub struct StoredInstance {
    /// Path of the instance file in the spool (a DICOM Part 10 file).
    pub path: PathBuf,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    /// Calling AE title of the association that sent it.
    pub calling_ae: String,
    pub received_at: OffsetDateTime,
    /// Whether it replaced an earlier instance with the same SOP Instance UID.
    pub arrival: Arrival,
}

/// How an instance came to be in the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Arrival {
    /// Its SOP Instance UID was not in the spool (or held the same data set).
    #[default]
    First,
    /// A corrected re-send: it replaced an instance with the same SOP Instance UID and a
    /// different data set (`dicom.duplicate_policy = "replace"`); its series is analysed
    /// again.
    Correction,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        ScpConfig::default().validate().unwrap();
    }

    #[test]
    fn bad_values_are_rejected_with_the_key_name() {
        let mut c = ScpConfig {
            ae_title: "WAY_TOO_LONG_AE_TITLE".into(),
            ..ScpConfig::default()
        };
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("dicom.ae_title"));
        c.ae_title = "OK".into();
        c.allowed_calling_aes = vec!["CT@not-an-ip".into()];
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("allowed_calling_aes"));
        c.allowed_calling_aes.clear();
        c.max_pdu_length = 10;
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("max_pdu_length"));
        c.max_pdu_length = 65536;
        c.send_timeout_secs = 0.0;
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("send_timeout_secs"));
        c.send_timeout_secs = 30.0;
        c.max_associations_per_address = 0;
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("max_associations_per_address"));
    }

    #[test]
    fn tls_section_parses_and_is_checked() {
        let c: ScpConfig =
            toml::from_str("port = 104\n[tls]\nport = 104\ncertificate = \"/nonexistent/c.pem\"\n")
                .unwrap();
        let tls = c.tls.as_ref().unwrap();
        assert!(tls.plain && !tls.verify_client);
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("dicom.tls.port"));
        // The missing certificate and the unset key are both reported.
        assert_eq!(c.tls_problems().len(), 2, "{:?}", c.tls_problems());
        assert!(toml::from_str::<ScpConfig>("[tls]\nverify = true\n").is_err());
    }
}
