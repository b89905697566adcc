//! `cspine-triage echo ADDRESS`: a C-ECHO (DICOM Verification) to a DICOM node, over TCP or
//! TLS ([`crate::dicom::echo`] does the work).

use std::path::PathBuf;

use anyhow::Result;

use crate::dicom::{echo, tls::TlsConfig};

#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// Peer address, host:port.
    pub address: String,
    /// Called AE title (the peer's).
    #[arg(long, default_value = "CSPINE")]
    pub called_ae: String,
    /// Our (calling) AE title.
    #[arg(long, default_value = "CSPINE-SCU")]
    pub calling_ae: String,
    /// PEM bundle of the CAs trusted to sign the peer's certificate; any --tls-* option
    /// turns TLS on, and TLS needs this one.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate chain offered as our client certificate.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Name the peer's certificate must carry (default: the host part of the address).
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// Seconds to connect and for each answer.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
}

/// One C-ECHO; prints "Success" or fails with the peer's answer.
pub fn run(args: EchoArgs) -> Result<()> {
    anyhow::ensure!(
        args.timeout > 0.0 && args.timeout.is_finite(),
        "--timeout must be > 0"
    );
    let wants_tls = args.tls_ca.is_some()
        || args.tls_cert.is_some()
        || args.tls_key.is_some()
        || args.tls_server_name.is_some();
    let tls = wants_tls.then_some(TlsConfig {
        certificate: args.tls_cert,
        private_key: args.tls_key,
        ca: args.tls_ca,
        verify_client: false,
        server_name: args.tls_server_name,
    });
    let target = echo::EchoTarget {
        address: args.address,
        called_ae: args.called_ae,
        calling_ae: args.calling_ae,
        timeout: std::time::Duration::from_secs_f64(args.timeout),
    };
    echo::echo(&target, tls.as_ref())?;
    println!(
        "C-ECHO to {} at {}{}: Success",
        target.called_ae,
        target.address,
        if tls.is_some() { " (TLS)" } else { "" }
    );
    Ok(())
}
