//! The Storage SCP: accepts associations, answers C-ECHO, receives C-STORE into the
//! spool and answers Success only once the instance is durable.
//!
//! One tokio task per association. P-DATA fragments of a data set are streamed into
//! the spool's temp file as they arrive (memory stays bounded by the write chunk),
//! and the fsync/link work runs on the blocking pool.
//!
//! No peer can hold a connection for longer than a timer allows: the A-ASSOCIATE-RQ must
//! come within `dicom.artim_timeout_secs`, the next PDU within `dicom.idle_timeout_secs`,
//! and every PDU we send (responses, A-RELEASE-RP, A-ASSOCIATE-RJ, A-ABORT) must be taken
//! within `dicom.send_timeout_secs`, else the connection is closed and its slot freed.
//! Connections from addresses the allow-list can never admit are closed at accept, and
//! slots are limited in all and per address ([`super::limits`]). Peer-supplied text is
//! logged quoted and escaped ([`super::peer_text`]).
//!
//! With `[dicom.tls]` a second listener serves DICOM over TLS ([`super::tls`]): the
//! same limits and timers, the TLS handshake within `dicom.tls.handshake_timeout_secs`
//! on top of the ARTIM timer, and the association slot taken before the handshake. The
//! plain port stays open unless `dicom.tls.plain = false`.
//!
//! This file binds the listeners and owns what every connection shares; [`accept`] takes
//! connections in and applies the limits, [`connection`] negotiates one association and
//! [`session`] runs its DIMSE loop.

mod accept;
mod connection;
mod events;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::tls;

use super::access::AllowList;
use super::limits::Limits;
use super::spool::{Spool, SpoolOptions};
use super::{ScpConfig, StoredInstance};

/// A bound (listening) SCP. Binding first lets the service signal readiness
/// (systemd `READY=1`) only once the port is really open.
pub struct Scp {
    /// The plain port (absent with `dicom.tls.plain = false`).
    plain: Option<TcpListener>,
    /// The TLS port and its rustls configuration.
    tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    shared: Arc<Shared>,
}

/// How connections on a listener are carried.
#[derive(Clone)]
enum Transport {
    Plain,
    Tls(Arc<rustls::ServerConfig>),
}

struct Shared {
    config: ScpConfig,
    spool: Arc<Spool>,
    allow_list: Arc<AllowList>,
    limits: Limits,
    events: crate::events::Events,
}

/// Binds and serves forever: the simple form of [`Scp::bind`] + [`Scp::run`].
pub async fn run_scp(config: ScpConfig, tx: mpsc::Sender<StoredInstance>) -> Result<()> {
    Scp::bind(config).await?.run(tx).await
}

impl Scp {
    /// Validates the config, opens the spool and binds the listening socket.
    pub async fn bind(config: ScpConfig) -> Result<Scp> {
        config.validate()?;
        let allow_list = Arc::new(AllowList::parse(&config.allowed_calling_aes)?);
        let spool = Spool::open_with(
            &config.spool_dir,
            SpoolOptions {
                our_ae: config.ae_title.clone(),
                min_free_mb: config.min_free_space_mb,
                max_instance_mb: config.max_instance_mb,
                duplicate_policy: config.duplicate_policy,
            },
        )?;
        let tls = match &config.tls {
            None => None,
            Some(t) => {
                let server = tls::server_config(&t.tls()).context("dicom.tls")?;
                let listener = TcpListener::bind((config.bind.as_str(), t.port))
                    .await
                    .with_context(|| {
                        format!(
                            "cannot listen on {}:{} (dicom.bind / dicom.tls.port)",
                            config.bind, t.port
                        )
                    })?;
                log::info!(
                    "DICOM TLS port {} (client certificates {})",
                    listener.local_addr()?,
                    if t.verify_client {
                        "required"
                    } else {
                        "not asked for"
                    }
                );
                Some((listener, server))
            }
        };
        let plain = match &config.tls {
            Some(t) if !t.plain => None,
            _ => Some(
                TcpListener::bind((config.bind.as_str(), config.port))
                    .await
                    .with_context(|| {
                        format!(
                            "cannot listen on {}:{} (dicom.bind / dicom.port)",
                            config.bind, config.port
                        )
                    })?,
            ),
        };
        let limits = Limits::new(config.max_associations, config.max_associations_per_address);
        Ok(Scp {
            plain,
            tls,
            shared: Arc::new(Shared {
                config,
                spool: Arc::new(spool),
                allow_list,
                limits,
                events: Default::default(),
            }),
        })
    }

    /// Sends this SCP's association and C-STORE events to `events` (before [`Scp::run`]).
    pub fn with_events(mut self, events: crate::events::Events) -> Scp {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.events = events;
        }
        self
    }

    /// The address actually bound (resolves port 0): the plain port, or the TLS port
    /// when the plain one is off.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        match (&self.plain, &self.tls) {
            (Some(l), _) | (None, Some((l, _))) => Ok(l.local_addr()?),
            (None, None) => anyhow::bail!("no listening port"),
        }
    }

    /// The TLS port's address, when `[dicom.tls]` is configured.
    pub fn tls_local_addr(&self) -> Result<Option<SocketAddr>> {
        Ok(match &self.tls {
            Some((l, _)) => Some(l.local_addr()?),
            None => None,
        })
    }

    /// The spool this SCP writes to: the janitor ([`super::spool::keep_spool`]) marks and
    /// releases through the same one.
    pub fn spool(&self) -> Arc<Spool> {
        self.shared.spool.clone()
    }

    /// Accepts associations until the task is dropped. Each durably stored instance is
    /// sent on `tx` after its Success response (a full channel slows the SCU down).
    pub async fn run(self, tx: mpsc::Sender<StoredInstance>) -> Result<()> {
        let plain = self
            .plain
            .map(|l| accept::accept_loop(l, self.shared.clone(), tx.clone(), Transport::Plain));
        let tls = self.tls.map(|(l, server)| {
            accept::accept_loop(l, self.shared.clone(), tx.clone(), Transport::Tls(server))
        });
        match (plain, tls) {
            (Some(p), Some(t)) => tokio::select! {
                r = p => r,
                r = t => r,
            },
            (Some(one), None) | (None, Some(one)) => one.await,
            (None, None) => Ok(()),
        }
    }
}

/// Runs blocking file work (write, fsync, link). On a multi-threaded runtime it runs in
/// place: C-STORE is request/response, so this association has nothing else to do, and
/// skipping the hand-off to the blocking pool saves two thread wake-ups per instance
/// (measurable on a loaded 2-core box).
pub(crate) async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
        Ok(tokio::task::block_in_place(f))
    } else {
        tokio::task::spawn_blocking(f).await
    }
}
