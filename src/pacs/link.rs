//! The DICOM association to one destination: [`connect`] (the one place a connection is
//! made, plain or DICOM TLS), one C-STORE ([`Link::store`]) and the release.
//!
//! Each SOP class to send is proposed in its own presentation context with Explicit VR
//! Little Endian and Implicit VR Little Endian; the data set is encoded in whichever of
//! the two the destination accepted.

use std::time::Duration;

use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociationOptions, Pdu};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::dicom::scu::store_request;

/// Largest PDU we accept from the destination (its responses are small).
const MAX_PDU: u32 = 116_794;
/// A C-STORE response command is about 200 bytes; more is not a response.
const MAX_RESPONSE_COMMAND: usize = 64 * 1024;

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Peer {
    pub called_ae: String,
    pub calling_ae: String,
    /// `host:port`.
    pub address: String,
    pub connect_timeout: Duration,
    pub dimse_timeout: Duration,
    /// DICOM TLS, when the destination has a `tls` table.
    pub tls: Option<PeerTls>,
}

/// The rustls client configuration and the name the destination's certificate must carry.
#[derive(Debug, Clone)]
pub struct PeerTls {
    pub config: std::sync::Arc<rustls::ClientConfig>,
    pub server_name: String,
}

/// Why an association or an exchange on it failed. All of them are worth retrying later.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot associate with {called_ae} at {address}: {source}")]
    Associate {
        called_ae: String,
        address: String,
        source: dicom_ul::association::Error,
    },
    #[error("association lost: {0}")]
    Lost(#[from] dicom_ul::association::Error),
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the destination answered with {0} instead of a C-STORE response")]
    Unexpected(&'static str),
    #[error("the C-STORE response cannot be read: {0}")]
    BadResponse(String),
}

/// An established association, one variant per kind of transport.
pub enum Link {
    /// Both boxed: a TLS session's state is several times a plain socket's, and one
    /// link per destination lives for a whole association (the cost of a box is nothing).
    Plain(Box<AsyncClientAssociation<tokio::net::TcpStream>>),
    Tls(Box<AsyncClientAssociation<dicom_ul::association::client::AsyncTlsStream>>),
}

/// Opens an association to `peer` proposing `sop_classes`: the one place a connection is
/// made, over DICOM TLS when the destination has a `tls` table.
pub async fn connect(peer: &Peer, sop_classes: &[String]) -> Result<Link, LinkError> {
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(peer.calling_ae.clone())
        .called_ae_title(peer.called_ae.clone())
        .max_pdu_length(MAX_PDU)
        .connection_timeout(peer.connect_timeout)
        .read_timeout(peer.dimse_timeout)
        .write_timeout(peer.dimse_timeout);
    for sop_class in sop_classes {
        options = options.with_presentation_context(
            sop_class.clone(),
            vec![
                EXPLICIT_VR_LITTLE_ENDIAN.uid().to_owned(),
                IMPLICIT_VR_LITTLE_ENDIAN.uid().to_owned(),
            ],
        );
    }
    let associate_error = |source| LinkError::Associate {
        called_ae: peer.called_ae.clone(),
        address: peer.address.clone(),
        source,
    };
    // Without TCP_NODELAY small PDUs wait for delayed ACKs.
    match &peer.tls {
        None => {
            let mut association = options
                .establish_async(peer.address.as_str())
                .await
                .map_err(associate_error)?;
            association.inner_stream().set_nodelay(true)?;
            Ok(Link::Plain(Box::new(association)))
        }
        Some(tls) => {
            let mut association = options
                .tls_config(tls.config.clone())
                .server_name(&tls.server_name)
                .establish_tls_async(peer.address.as_str())
                .await
                .map_err(associate_error)?;
            association.inner_stream().get_ref().0.set_nodelay(true)?;
            Ok(Link::Tls(Box::new(association)))
        }
    }
}

impl Link {
    /// The presentation context id and transfer syntax UID the destination accepted for
    /// `sop_class`, if it accepted one.
    pub fn accepted(&self, sop_class: &str) -> Option<(u8, String)> {
        let contexts = match self {
            Link::Plain(a) => a.presentation_contexts(),
            Link::Tls(a) => a.presentation_contexts(),
        };
        contexts
            .iter()
            .find(|pc| {
                pc.reason == PresentationContextResultReason::Acceptance
                    && trim_uid(&pc.abstract_syntax) == sop_class
            })
            .map(|pc| (pc.id, trim_uid(&pc.transfer_syntax).to_owned()))
    }

    /// Sends one C-STORE request with `data_set` (already encoded in the context's
    /// transfer syntax) and returns the response status.
    pub async fn store(
        &mut self,
        context_id: u8,
        message_id: u16,
        sop_class: &str,
        sop_instance: &str,
        data_set: &[u8],
    ) -> Result<u16, LinkError> {
        match self {
            Link::Plain(a) => {
                store_on(a, context_id, message_id, sop_class, sop_instance, data_set).await
            }
            Link::Tls(a) => {
                store_on(a, context_id, message_id, sop_class, sop_instance, data_set).await
            }
        }
    }

    /// Releases the association (A-RELEASE), or aborts it when that fails.
    pub async fn release(self) {
        match self {
            Link::Plain(a) => {
                if let Err(e) = (*a).release().await {
                    log::debug!("PACS association release failed: {e}");
                }
            }
            Link::Tls(a) => {
                if let Err(e) = (*a).release().await {
                    log::debug!("PACS association release failed (TLS): {e}");
                }
            }
        }
    }
}

async fn store_on<S>(
    association: &mut AsyncClientAssociation<S>,
    context_id: u8,
    message_id: u16,
    sop_class: &str,
    sop_instance: &str,
    data_set: &[u8],
) -> Result<u16, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let command = store_request(sop_class, sop_instance, message_id);
    let mut command_bytes = Vec::with_capacity(256);
    command
        .write_dataset_with_ts(&mut command_bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| LinkError::BadResponse(format!("cannot encode the C-STORE request: {e}")))?;
    association
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command_bytes,
            }],
        })
        .await?;
    {
        let mut writer = association.send_pdata(context_id);
        writer.write_all(data_set).await?;
        writer.finish().await?;
    }
    let mut response = Vec::new();
    loop {
        match association.receive().await? {
            Pdu::PData { data } => {
                let mut last = false;
                for pdv in data {
                    if pdv.value_type != PDataValueType::Command {
                        return Err(LinkError::Unexpected("a data set fragment"));
                    }
                    last |= pdv.is_last;
                    response.extend_from_slice(&pdv.data);
                }
                if response.len() > MAX_RESPONSE_COMMAND {
                    return Err(LinkError::BadResponse("command too long".into()));
                }
                if last {
                    break;
                }
            }
            Pdu::AbortRQ { .. } => return Err(LinkError::Unexpected("an A-ABORT")),
            Pdu::ReleaseRQ => return Err(LinkError::Unexpected("an A-RELEASE request")),
            _ => return Err(LinkError::Unexpected("another PDU")),
        }
    }
    let response =
        InMemDicomObject::read_dataset_with_ts(&response[..], &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .map_err(|e| LinkError::BadResponse(e.to_string()))?;
    let status = response
        .element(tags::STATUS)
        .map_err(|e| LinkError::BadResponse(e.to_string()))?
        .to_int::<u16>()
        .map_err(|e| LinkError::BadResponse(e.to_string()))?;
    Ok(status)
}

pub(crate) fn trim_uid(s: &str) -> &str {
    s.trim_end_matches(['\0', ' '])
}
