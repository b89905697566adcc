//! Accepting connections: the allow-list's address check before a slot is taken,
//! TCP_NODELAY, and admission against the association limits ([`crate::dicom::limits`]):
//! a connection is served, refused with A-ASSOCIATE-RJ, or closed at once. On the TLS
//! port a refusal is sent after the TLS handshake, so that the SCU can read it.

use std::sync::Arc;

use anyhow::Result;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::connection::{serve_connection, tls_handshake_failed};
use super::events;
use super::{Shared, Transport};
use crate::dicom::limits::{Admission, MAX_REFUSALS_AT_ONCE};
use crate::dicom::refusal::reject_busy;
use crate::dicom::StoredInstance;

/// Accepts connections on `listener` until the task is dropped.
pub(super) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tx: mpsc::Sender<StoredInstance>,
    transport: Transport,
) -> Result<()> {
    loop {
        let (socket, peer) = match listener.accept().await {
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
        if !shared.allow_list.may_connect_from(peer.ip()) {
            let reason = crate::events::AssociationRefusal::AddressNotAllowed;
            shared.events.emit(events::refused(peer, reason));
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
        let shared = shared.clone();
        let tx = tx.clone();
        let transport = transport.clone();
        match shared.limits.admit(peer.ip()) {
            Admission::Serve(slot) => {
                tokio::spawn(async move {
                    serve_connection(socket, peer, &shared, tx, transport).await;
                    drop(slot);
                });
            }
            Admission::Refuse(busy, permit) => {
                shared.events.emit(events::refused(peer, busy));
                tokio::spawn(async move {
                    let config = &shared.config;
                    let (artim, send) = (config.artim_timeout(), config.send_timeout());
                    match transport {
                        Transport::Plain => reject_busy(socket, peer, busy, artim, send).await,
                        Transport::Tls(server) => {
                            let handshake =
                                config.tls.as_ref().map_or(artim, |t| t.handshake_timeout());
                            let acceptor = tokio_rustls::TlsAcceptor::from(server);
                            match tokio::time::timeout(handshake, acceptor.accept(socket)).await {
                                Ok(Ok(stream)) => {
                                    reject_busy(stream, peer, busy, artim, send).await
                                }
                                Ok(Err(e)) => tls_handshake_failed(peer, &e),
                                Err(_) => log::warn!(
                                    "connection from {peer} closed: {busy}, and no TLS handshake \
                                     within {} s (dicom.tls.handshake_timeout_secs)",
                                    handshake.as_secs_f64()
                                ),
                            }
                        }
                    }
                    drop(permit);
                });
            }
            Admission::Close(busy) => {
                shared.events.emit(events::refused(peer, busy));
                log::warn!(
                    "connection from {peer} closed at once: {busy}, and \
                     {MAX_REFUSALS_AT_ONCE} other refusals are in progress"
                )
            }
        }
    }
}
