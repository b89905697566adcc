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

mod connection;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::access::AllowList;
use super::limits::{Admission, Limits, MAX_REFUSALS_AT_ONCE};
use super::refusal::reject_busy;
use super::spool::{Spool, SpoolOptions};
use super::{ScpConfig, StoredInstance};
use connection::serve_connection;

/// A bound (listening) SCP. Binding first lets the service signal readiness
/// (systemd `READY=1`) only once the port is really open.
pub struct Scp {
    listener: TcpListener,
    shared: Arc<Shared>,
}

struct Shared {
    config: ScpConfig,
    spool: Arc<Spool>,
    allow_list: Arc<AllowList>,
    limits: Limits,
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
        let listener = TcpListener::bind((config.bind.as_str(), config.port))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}:{} (dicom.bind / dicom.port)",
                    config.bind, config.port
                )
            })?;
        let limits = Limits::new(config.max_associations, config.max_associations_per_address);
        Ok(Scp {
            listener,
            shared: Arc::new(Shared {
                config,
                spool: Arc::new(spool),
                allow_list,
                limits,
            }),
        })
    }

    /// The address actually bound (resolves port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// The spool this SCP writes to: the janitor ([`super::spool::keep_spool`]) marks and
    /// releases through the same one.
    pub fn spool(&self) -> Arc<Spool> {
        self.shared.spool.clone()
    }

    /// Accepts associations until the task is dropped. Each durably stored instance is
    /// sent on `tx` after its Success response (a full channel slows the SCU down).
    pub async fn run(self, tx: mpsc::Sender<StoredInstance>) -> Result<()> {
        loop {
            let (socket, peer) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: keep serving the associations we have.
                    log::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Before a slot is taken: silent connections from addresses that can never
            // associate must not lock the allowed ones out.
            if !self.shared.allow_list.may_connect_from(peer.ip()) {
                log::warn!(
                    "connection from {peer} closed at once: every dicom.allowed_calling_aes \
                     entry is pinned to another address"
                );
                continue;
            }
            // Without TCP_NODELAY small PDUs (responses) wait for delayed ACKs: ~30x slower.
            if let Err(e) = socket.set_nodelay(true) {
                log::warn!("cannot set TCP_NODELAY for {peer}: {e}");
            }
            let shared = self.shared.clone();
            let tx = tx.clone();
            match shared.limits.admit(peer.ip()) {
                Admission::Serve(slot) => {
                    tokio::spawn(async move {
                        serve_connection(socket, peer, &shared, tx).await;
                        drop(slot);
                    });
                }
                Admission::Refuse(busy, permit) => {
                    tokio::spawn(async move {
                        let config = &shared.config;
                        reject_busy(
                            socket,
                            peer,
                            busy,
                            config.artim_timeout(),
                            config.send_timeout(),
                        )
                        .await;
                        drop(permit);
                    });
                }
                Admission::Close(busy) => log::warn!(
                    "connection from {peer} closed at once: {busy}, and \
                     {MAX_REFUSALS_AT_ONCE} other refusals are in progress"
                ),
            }
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
