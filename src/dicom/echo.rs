//! A C-ECHO SCU (`cspine-triage echo`): associates with a DICOM node for the
//! Verification SOP class, over TCP or TLS ([`super::tls::client_config`]), sends one
//! C-ECHO-RQ and reads its status. Each way it can fail is its own [`EchoError`].

use std::io::{Read, Write};
use std::time::Duration;

use dicom_core::{dicom_value, DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::{entries::IMPLICIT_VR_LITTLE_ENDIAN, TransferSyntaxRegistry};
use dicom_ul::association::{CloseSocket, Error as UlError};
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociation, ClientAssociationOptions, Pdu};

use super::dimse;
use super::syntax::VERIFICATION;
use super::tls::{self, TlsConfig, TlsError};

/// Whom to echo and as whom.
#[derive(Debug, Clone)]
pub struct EchoTarget {
    /// `host:port` of the peer.
    pub address: String,
    pub called_ae: String,
    pub calling_ae: String,
    /// Connect, read and write timeout.
    pub timeout: Duration,
}

/// Why a C-ECHO did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    #[error("cannot connect to {address}: {detail}")]
    Connect { address: String, detail: String },
    #[error("{address} rejected the association ({result}): {reason}")]
    Rejected {
        address: String,
        result: String,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] TlsError),
    #[error("TLS with {address} failed: {detail}")]
    Tls { address: String, detail: String },
    #[error("{address} accepted the association but not the Verification SOP class")]
    VerificationRefused { address: String },
    #[error("C-ECHO to {address} answered with status {status:04X}H")]
    Status { address: String, status: u16 },
    #[error("association with {address} failed: {detail}")]
    Association { address: String, detail: String },
}

/// Sends one C-ECHO; `Ok` only for status Success (0000H).
pub fn echo(target: &EchoTarget, tls: Option<&TlsConfig>) -> Result<(), EchoError> {
    let options = ClientAssociationOptions::new()
        .calling_ae_title(target.calling_ae.clone())
        .called_ae_title(target.called_ae.clone())
        .with_abstract_syntax(VERIFICATION)
        .connection_timeout(target.timeout)
        .read_timeout(target.timeout)
        .write_timeout(target.timeout);
    let address = target.address.as_str();
    match tls {
        None => {
            let assoc = options
                .establish(address)
                .map_err(|e| association_error(address, e, false))?;
            verify(assoc, address, false)
        }
        Some(config) => {
            let client = tls::client_config(config)?;
            let name = tls::server_name(config, address)?;
            let assoc = options
                .tls_config(client)
                .server_name(&name)
                .establish_tls(address)
                .map_err(|e| association_error(address, e, true))?;
            verify(assoc, address, true)
        }
    }
}

fn verify<S: CloseSocket + Read + Write>(
    mut assoc: ClientAssociation<S>,
    address: &str,
    over_tls: bool,
) -> Result<(), EchoError> {
    let fail = |e: UlError| association_error(address, e, over_tls);
    let Some(pc) = assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .cloned()
    else {
        let _ = assoc.abort();
        return Err(EchoError::VerificationRefused {
            address: address.into(),
        });
    };
    let mut command = Vec::with_capacity(96);
    echo_request(1)
        .write_dataset_with_ts(&mut command, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| EchoError::Association {
            address: address.into(),
            detail: e.to_string(),
        })?;
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc.id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command,
            }],
        })
        .map_err(fail)?;
    let status = match assoc.receive().map_err(fail)? {
        Pdu::PData { data } if !data.is_empty() => read_status(&data[0].data),
        other => Err(format!(
            "expected a C-ECHO-RSP, got {}",
            other.short_description()
        )),
    }
    .map_err(|detail| EchoError::Association {
        address: address.into(),
        detail,
    })?;
    let _ = assoc.release();
    if status == dimse::status::SUCCESS {
        Ok(())
    } else {
        Err(EchoError::Status {
            address: address.into(),
            status,
        })
    }
}

fn read_status(command: &[u8]) -> Result<u16, String> {
    let ts = TransferSyntaxRegistry
        .get(IMPLICIT_VR_LITTLE_ENDIAN.uid())
        .ok_or("no implicit VR little endian")?;
    let rsp = InMemDicomObject::read_dataset_with_ts(command, ts)
        .map_err(|e| format!("unreadable C-ECHO-RSP: {e}"))?;
    let field = rsp
        .element(tags::COMMAND_FIELD)
        .ok()
        .and_then(|e| e.to_int::<u16>().ok());
    if field != Some(dimse::C_ECHO_RSP) {
        return Err(format!("expected a C-ECHO-RSP, got command {field:04X?}"));
    }
    rsp.element(tags::STATUS)
        .ok()
        .and_then(|e| e.to_int::<u16>().ok())
        .ok_or_else(|| "C-ECHO-RSP without a status".to_string())
}

fn echo_request(message_id: u16) -> InMemDicomObject {
    InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            dicom_value!(Str, VERIFICATION),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            dicom_value!(U16, [dimse::C_ECHO_RQ]),
        ),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [message_id])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [dimse::NO_DATA_SET]),
        ),
    ])
}

/// The error text with its causes (dicom-ul's own messages are terse).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn association_error(address: &str, e: UlError, over_tls: bool) -> EchoError {
    let address = address.to_string();
    match e {
        UlError::Connect { .. } | UlError::ToAddress { .. } => EchoError::Connect {
            detail: chain(&e),
            address,
        },
        UlError::Rejected { association_rj, .. } => EchoError::Rejected {
            address,
            result: format!("{:?}", association_rj.result).to_lowercase(),
            reason: association_rj.source.to_string(),
        },
        UlError::TlsHandshake { .. }
        | UlError::TlsConnection { .. }
        | UlError::InvalidServerName { .. } => EchoError::Tls {
            detail: chain(&e),
            address,
        },
        UlError::TlsNotSupported => EchoError::Tls {
            detail: "the peer answered with TLS: this port wants TLS (give --tls-ca)".into(),
            address,
        },
        // In TLS 1.3 the server checks our certificate after our side of the handshake
        // is done: its refusal arrives as the first read failing.
        UlError::ReceivePdu { .. }
        | UlError::ConnectionClosed { .. }
        | UlError::WireRead { .. }
            if over_tls =>
        {
            EchoError::Tls {
                detail: format!(
                    "the TLS session ended before the association was answered \
                     (the server may have refused our certificate): {}",
                    chain(&e)
                ),
                address,
            }
        }
        other => EchoError::Association {
            detail: chain(&other),
            address,
        },
    }
}
