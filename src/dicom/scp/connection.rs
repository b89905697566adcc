//! One connection from accept to association: negotiates it (called AE, calling-AE
//! allow-list, presentation contexts) within the ARTIM timer, logs and answers a failed
//! negotiation, then hands the association to its [`Session`]. On the TLS port the
//! handshake comes first (dicom-ul's `establish_tls_async`), within
//! `dicom.tls.handshake_timeout_secs` added to the ARTIM timer; a refused handshake is
//! logged with the peer address and closes the connection.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use dicom_ul::association::server::ServerAssociationOptions;
use dicom_ul::association::Error as UlError;
use dicom_ul::pdu::AbortRQServiceProviderReason;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::events::{self, is_io};
use super::session::{abort_pdu, Session};
use super::{Shared, Transport};
use crate::dicom::access::{take_refusal, PeerPolicy};
use crate::dicom::peer_text::escaped;
use crate::dicom::refusal::send_raw;
use crate::dicom::syntax::{ACCEPTED_TRANSFER_SYNTAXES, VERIFICATION};
use crate::dicom::StoredInstance;

/// Negotiates the association, then serves it.
pub(super) async fn serve_connection(
    socket: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    tx: mpsc::Sender<StoredInstance>,
    transport: Transport,
) {
    // dicom-ul consumes the socket, also when negotiation fails on garbage; a duplicate
    // handle lets us still answer that with an A-ABORT.
    let (socket, spare) = match duplicate(socket) {
        Ok(pair) => pair,
        Err(e) => {
            log::warn!("connection from {peer}: {e:#}");
            return;
        }
    };
    let policy = PeerPolicy::new(shared.allow_list.clone(), peer.ip());
    let refusal = policy.refusal_slot();
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(policy)
        .ae_title(shared.config.ae_title.as_str())
        .max_pdu_length(shared.config.max_pdu_length)
        .with_abstract_syntax(VERIFICATION);
    for sop_class in &shared.config.sop_classes {
        options = options.with_abstract_syntax(sop_class.as_str());
    }
    for (ts, _) in ACCEPTED_TRANSFER_SYNTAXES {
        options = options.with_transfer_syntax(*ts);
    }

    let artim = shared.config.artim_timeout();
    let send_timeout = shared.config.send_timeout();
    match transport {
        Transport::Plain => {
            let established = tokio::time::timeout(artim, options.establish_async(socket)).await;
            let assoc = match established {
                Ok(Ok(assoc)) => assoc,
                Ok(Err(e)) => {
                    if let Some(reason) = events::negotiation_refusal(&e) {
                        shared.events.emit(events::refused(peer, reason));
                    }
                    negotiation_failed(e, peer, &refusal, Some(spare), send_timeout).await;
                    return;
                }
                Err(_) => {
                    let reason = crate::events::AssociationRefusal::InvalidRequest;
                    shared.events.emit(events::refused(peer, reason));
                    log::warn!(
                        "connection from {peer} closed: no A-ASSOCIATE-RQ within {} s (dicom.artim_timeout_secs)",
                        shared.config.artim_timeout_secs
                    );
                    return;
                }
            };
            drop(spare);
            let mut session = Session::new(assoc, peer, shared, tx);
            session.log_negotiation();
            session.run().await;
        }
        Transport::Tls(server) => {
            // Nothing raw can be sent inside a TLS session: no spare socket.
            drop(spare);
            let handshake = shared
                .config
                .tls
                .as_ref()
                .map_or(artim, |t| t.handshake_timeout());
            let options = options.tls_config(server);
            let established =
                tokio::time::timeout(handshake + artim, options.establish_tls_async(socket)).await;
            let assoc = match established {
                Ok(Ok(assoc)) => assoc,
                Ok(Err(UlError::TlsHandshake { source, .. })) => {
                    tls_handshake_failed(peer, &source);
                    return;
                }
                Ok(Err(e)) => {
                    if let Some(reason) = events::negotiation_refusal(&e) {
                        shared.events.emit(events::refused(peer, reason));
                    }
                    negotiation_failed(e, peer, &refusal, None, send_timeout).await;
                    return;
                }
                Err(_) => {
                    let reason = crate::events::AssociationRefusal::InvalidRequest;
                    shared.events.emit(events::refused(peer, reason));
                    log::warn!(
                        "TLS connection from {peer} closed: no TLS handshake and A-ASSOCIATE-RQ \
                         within {} s (dicom.tls.handshake_timeout_secs + dicom.artim_timeout_secs)",
                        (handshake + artim).as_secs_f64()
                    );
                    return;
                }
            };
            let mut session = Session::new(assoc, peer, shared, tx);
            session.log_negotiation();
            session.run().await;
        }
    }
}

/// Logs a TLS handshake the SCP refused or that failed (wrong CA, no client certificate,
/// no common protocol version, not TLS at all).
pub(super) fn tls_handshake_failed(peer: SocketAddr, e: &std::io::Error) {
    log::warn!(
        "TLS handshake with {peer} refused: {}; no association",
        escaped(e)
    );
}

fn duplicate(socket: TcpStream) -> Result<(TcpStream, TcpStream)> {
    let std = socket.into_std().context("cannot take socket")?;
    let spare = std.try_clone().context("cannot duplicate socket")?;
    Ok((TcpStream::from_std(std)?, TcpStream::from_std(spare)?))
}

async fn negotiation_failed(
    e: UlError,
    peer: SocketAddr,
    refusal: &Mutex<Option<String>>,
    spare: Option<TcpStream>,
    send_timeout: Duration,
) {
    match e {
        UlError::Rejected { association_rj, .. } => {
            // dicom-ul already sent the A-ASSOCIATE-RJ.
            let why = take_refusal(refusal).unwrap_or_else(|| association_rj.source.to_string());
            log::warn!(
                "association from {peer} rejected ({}): {}",
                association_rj.source,
                escaped(why)
            );
        }
        UlError::ReceivePdu { source, .. } if is_io(&source) => {
            log::info!(
                "connection from {peer} closed before association: {}",
                escaped(source)
            );
        }
        UlError::ConnectionClosed { .. } => {
            log::info!("connection from {peer} closed before association");
        }
        UlError::ReceivePdu { source, .. } => {
            log::warn!(
                "connection from {peer} aborted: invalid A-ASSOCIATE-RQ: {}",
                escaped(source)
            );
            if let Some(mut spare) = spare {
                let _ = send_raw(
                    &mut spare,
                    &abort_pdu(AbortRQServiceProviderReason::InvalidPduParameter),
                    send_timeout,
                )
                .await;
            }
        }
        UlError::UnknownPdu { .. } => {
            log::warn!(
                "connection from {peer} aborted: unrecognized PDU instead of A-ASSOCIATE-RQ"
            );
        }
        UlError::UnexpectedPdu { pdu, .. } => {
            log::warn!(
                "connection from {peer} aborted: expected A-ASSOCIATE-RQ, got {}",
                pdu.short_description()
            );
        }
        UlError::TlsNotSupported => log::warn!(
            "connection from {peer} closed: it began a TLS handshake on the plain port \
             (the TLS port is dicom.tls.port)"
        ),
        other => log::warn!("association with {peer} failed: {}", escaped(other)),
    }
}
