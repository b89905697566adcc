//! Answering connections the SCP does not serve, with bounded effort: A-ASSOCIATE-RJ
//! (transient, local limit exceeded) for connections over a limit of
//! [`super::limits`], and single PDUs (A-ABORT) sent on a raw socket. A refused request
//! is read in fixed chunks and dropped, never buffered by its declared length; reading
//! is bounded by the ARTIM timer and every send by `dicom.send_timeout_secs`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJSource, Pdu,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::limits::Busy;

/// The largest A-ASSOCIATE-RQ a refusal reads (and discards) before answering; a longer
/// one is closed unanswered. Real requests are a few KiB (storescu's ~100 contexts: ~10).
const MAX_REFUSED_REQUEST: usize = 1 << 20;
/// A refusal reads the request through a buffer of this size, whatever its length says.
const REFUSAL_READ_CHUNK: usize = 4096;

/// Answers an association request with A-ASSOCIATE-RJ (transient, service provider
/// presentation, local limit exceeded): the SCU should retry later. The request is read
/// and dropped in fixed chunks, never buffered; the whole refusal is bounded by the ARTIM
/// timer (reading) and the send timeout (answering).
pub async fn reject_busy<S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: S,
    peer: SocketAddr,
    busy: Busy,
    artim: Duration,
    send_timeout: Duration,
) {
    let read = async {
        let mut header = [0u8; 6];
        socket.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
        if header[0] != 0x01 || len > MAX_REFUSED_REQUEST {
            return Ok(false);
        }
        let mut chunk = [0u8; REFUSAL_READ_CHUNK];
        let mut left = len;
        while left > 0 {
            let n = socket
                .read(&mut chunk[..left.min(REFUSAL_READ_CHUNK)])
                .await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            left -= n;
        }
        Ok::<bool, std::io::Error>(true)
    };
    match tokio::time::timeout(artim, read).await {
        Ok(Ok(true)) => {
            log::warn!(
                "association from {peer} rejected: {busy}; sent transient reject, local limit exceeded"
            );
            let rj = Pdu::AssociationRJ(AssociationRJ {
                result: AssociationRJResult::Transient,
                source: AssociationRJSource::ServiceProviderPresentation(
                    AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
                ),
            });
            let _ = send_raw(&mut socket, &rj, send_timeout).await;
        }
        _ => log::warn!("connection from {peer} closed: {busy}, and no valid request came"),
    }
}

/// Sends one PDU and shuts the connection down, within `limit`.
pub async fn send_raw<S: AsyncWrite + Unpin>(
    socket: &mut S,
    pdu: &Pdu,
    limit: Duration,
) -> Result<()> {
    let mut buf = Vec::with_capacity(64);
    dicom_ul::write_pdu(&mut buf, pdu)?;
    tokio::time::timeout(limit, async {
        socket.write_all(&buf).await?;
        let _ = socket.shutdown().await;
        Ok::<(), std::io::Error>(())
    })
    .await
    .context("peer did not take the PDU (dicom.send_timeout_secs)")??;
    Ok(())
}
