//! One association's DIMSE loop: receives P-DATA, answers C-ECHO, streams C-STORE data
//! sets into the spool and answers each only once the instance is durable; ends on
//! release, abort, a closed connection, the idle timer or a stalled peer.

use std::net::SocketAddr;
use std::time::Instant;

use dicom_ul::association::{AsyncServerAssociation, Error as UlError};
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, PDataValue, PDataValueType, Pdu,
    PresentationContextResultReason,
};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::events::{self, is_io};
use super::{run_blocking, Shared};
use crate::dicom::dimse::{self, status, Command};
use crate::dicom::peer_text::{escaped, peer_str};
use crate::dicom::spool::{Incoming, InstanceHeader, StoreError, Stored};
use crate::dicom::syntax;
use crate::dicom::StoredInstance;
use crate::events::InstanceRefusal;

pub(super) fn abort_pdu(reason: AbortRQServiceProviderReason) -> Pdu {
    Pdu::AbortRQ {
        source: AbortRQSource::ServiceProvider(reason),
    }
}

/// What is being received on the association right now.
enum Receiving {
    /// Between messages.
    Idle,
    /// Command set fragments of one message.
    Command { context_id: u8, bytes: Vec<u8> },
    /// The data set of a C-STORE that will be stored.
    Store {
        rq: Command,
        context_id: u8,
        incoming: Incoming,
    },
    /// A data set that is read and dropped, then answered with `status` (the event
    /// stream records `reason`).
    Drain {
        rq: Command,
        context_id: u8,
        status: u16,
        comment: String,
        reason: InstanceRefusal,
    },
}

pub(super) struct Session<'a, S> {
    assoc: AsyncServerAssociation<S>,
    peer: SocketAddr,
    calling_ae: String,
    shared: &'a Shared,
    tx: mpsc::Sender<StoredInstance>,
    state: Receiving,
    started: Instant,
    stored: u64,
    duplicates: u64,
    failed: u64,
    bytes: u64,
    /// A send timed out: the connection is closed without trying to send anything more.
    stalled: Option<Outgoing>,
}

/// How the association ended (for the log).
enum End {
    Released,
    AbortedByPeer,
    Aborted(String),
    Closed,
    /// The peer did not take a PDU within `dicom.send_timeout_secs`: closed unannounced.
    Stalled(Outgoing),
}

/// What the SCP was sending (for the log of a send that timed out).
#[derive(Debug, Clone, Copy)]
enum Outgoing {
    Response,
    ReleaseRp,
    Abort,
}

impl std::fmt::Display for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outgoing::Response => "a response",
            Outgoing::ReleaseRp => "the A-RELEASE-RP",
            Outgoing::Abort => "the A-ABORT",
        })
    }
}

/// Why a PDU could not be sent.
enum SendError {
    /// The peer stopped reading: nothing more can be sent, the connection is cut.
    TimedOut,
    Failed(UlError),
}

impl<'a, S> Session<'a, S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    pub(super) fn new(
        assoc: AsyncServerAssociation<S>,
        peer: SocketAddr,
        shared: &'a Shared,
        tx: mpsc::Sender<StoredInstance>,
    ) -> Self {
        use dicom_ul::association::Association;
        let calling_ae = assoc.peer_ae_title().trim().to_string();
        Session {
            assoc,
            peer,
            calling_ae,
            shared,
            tx,
            state: Receiving::Idle,
            started: Instant::now(),
            stored: 0,
            duplicates: 0,
            failed: 0,
            bytes: 0,
            stalled: None,
        }
    }

    pub(super) fn log_negotiation(&self) {
        let contexts = self.assoc.presentation_contexts();
        let accepted = contexts
            .iter()
            .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
            .count();
        log::info!(
            "association from {} ({}): {accepted}/{} presentation contexts accepted",
            peer_str(&self.calling_ae),
            self.peer,
            contexts.len()
        );
        // SCUs like storescu propose ~100 SOP classes; only refused *syntaxes* for a class
        // we serve are worth the operator's attention (the SCU must fall back).
        for pc in contexts {
            match pc.reason {
                PresentationContextResultReason::Acceptance => log::debug!(
                    "  context {} ({}) accepted with {}",
                    pc.id,
                    peer_str(&pc.abstract_syntax),
                    peer_str(&pc.transfer_syntax)
                ),
                PresentationContextResultReason::TransferSyntaxesNotSupported => log::info!(
                    "  context {} ({}) refused: none of its transfer syntaxes can be decoded here",
                    pc.id,
                    peer_str(&pc.abstract_syntax)
                ),
                ref other => log::debug!(
                    "  context {} ({}) refused: {other:?}",
                    pc.id,
                    peer_str(&pc.abstract_syntax)
                ),
            }
        }
    }

    pub(super) async fn run(&mut self) {
        self.shared
            .events
            .emit(crate::events::Event::AssociationOpened {
                peer: self.peer.to_string(),
                calling_ae: self.calling_ae.clone(),
            });
        let end = self.serve().await;
        if let Receiving::Store { incoming, .. } =
            std::mem::replace(&mut self.state, Receiving::Idle)
        {
            // Never acknowledged: the SCU will send it again.
            incoming.discard();
        }
        self.shared
            .events
            .emit(crate::events::Event::AssociationClosed {
                peer: self.peer.to_string(),
                calling_ae: self.calling_ae.clone(),
                stored: self.stored,
                duplicates: self.duplicates,
                failed: self.failed,
            });
        let secs = self.started.elapsed().as_secs_f64();
        let how = match end {
            End::Released => "released".to_string(),
            End::AbortedByPeer => "aborted by the peer".to_string(),
            End::Aborted(why) => format!("aborted: {}", escaped(why)),
            End::Closed => "connection closed".to_string(),
            End::Stalled(what) => format!(
                "closed: the peer did not take {what} within {} s (dicom.send_timeout_secs)",
                self.shared.config.send_timeout_secs
            ),
        };
        log::info!(
            "association from {} ({}) {how}: {} stored, {} duplicates, {} failed, {:.1} MB in {secs:.2} s",
            peer_str(&self.calling_ae),
            self.peer,
            self.stored,
            self.duplicates,
            self.failed,
            self.bytes as f64 / 1e6
        );
    }

    async fn serve(&mut self) -> End {
        let idle = self.shared.config.idle_timeout();
        loop {
            let pdu = match tokio::time::timeout(idle, self.assoc.receive()).await {
                Ok(Ok(pdu)) => pdu,
                Ok(Err(UlError::ConnectionClosed { .. })) => return End::Closed,
                Ok(Err(UlError::ReceivePdu { source, .. })) if is_io(&source) => {
                    return End::Closed
                }
                Ok(Err(e)) => {
                    let why = format!("invalid PDU: {e}");
                    return self
                        .abort(AbortRQServiceProviderReason::InvalidPduParameter, why)
                        .await;
                }
                Err(_) => {
                    let why = format!(
                        "idle for {} s (dicom.idle_timeout_secs)",
                        self.shared.config.idle_timeout_secs
                    );
                    return self
                        .abort(AbortRQServiceProviderReason::ReasonNotSpecified, why)
                        .await;
                }
            };
            match pdu {
                Pdu::PData { data } => {
                    for pdv in data {
                        if let Err(why) = self.on_pdv(pdv).await {
                            if let Some(what) = self.stalled {
                                return End::Stalled(what);
                            }
                            return self
                                .abort(AbortRQServiceProviderReason::UnexpectedPduParameter, why)
                                .await;
                        }
                    }
                }
                Pdu::ReleaseRQ => {
                    if !matches!(self.state, Receiving::Idle) {
                        log::warn!(
                            "{}: release requested in the middle of a message",
                            self.peer
                        );
                    }
                    return match self.send(&Pdu::ReleaseRP, Outgoing::ReleaseRp).await {
                        Err(SendError::TimedOut) => End::Stalled(Outgoing::ReleaseRp),
                        _ => End::Released,
                    };
                }
                Pdu::AbortRQ { .. } => return End::AbortedByPeer,
                Pdu::Unknown { pdu_type, .. } => {
                    let why = format!("unrecognized PDU type 0x{pdu_type:02X}");
                    return self
                        .abort(AbortRQServiceProviderReason::UnrecognizedPdu, why)
                        .await;
                }
                other => {
                    let why = format!("unexpected {}", other.short_description());
                    return self
                        .abort(AbortRQServiceProviderReason::UnexpectedPdu, why)
                        .await;
                }
            }
        }
    }

    async fn abort(&mut self, reason: AbortRQServiceProviderReason, why: String) -> End {
        log::warn!(
            "association from {} ({}) aborted: {}",
            peer_str(&self.calling_ae),
            self.peer,
            escaped(&why)
        );
        let _ = self.send(&abort_pdu(reason), Outgoing::Abort).await;
        End::Aborted(why)
    }

    /// Sends one PDU within `dicom.send_timeout_secs`. On expiry the association is
    /// marked stalled; the caller ends it and the connection is closed.
    async fn send(&mut self, pdu: &Pdu, what: Outgoing) -> Result<(), SendError> {
        match tokio::time::timeout(self.shared.config.send_timeout(), self.assoc.send(pdu)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SendError::Failed(e)),
            Err(_) => {
                log::warn!(
                    "association from {} ({}): the peer did not take {what} within {} s \
                     (dicom.send_timeout_secs); closing the connection",
                    peer_str(&self.calling_ae),
                    self.peer,
                    self.shared.config.send_timeout_secs
                );
                self.stalled = Some(what);
                Err(SendError::TimedOut)
            }
        }
    }

    /// Handles one presentation data value. `Err` aborts the association.
    async fn on_pdv(&mut self, pdv: PDataValue) -> Result<(), String> {
        let PDataValue {
            presentation_context_id: id,
            value_type,
            is_last,
            data,
        } = pdv;
        match (&mut self.state, value_type) {
            (Receiving::Idle, PDataValueType::Command) => {
                dimse::check_command_set_len(data.len())?;
                self.state = Receiving::Command {
                    context_id: id,
                    bytes: data,
                };
                if is_last {
                    self.on_command().await?;
                }
            }
            (Receiving::Command { context_id, bytes }, PDataValueType::Command)
                if *context_id == id =>
            {
                dimse::check_command_set_len(bytes.len() + data.len())?;
                bytes.extend_from_slice(&data);
                if is_last {
                    self.on_command().await?;
                }
            }
            (
                Receiving::Store {
                    context_id,
                    incoming,
                    ..
                },
                PDataValueType::Data,
            ) if *context_id == id => {
                self.bytes += data.len() as u64;
                incoming.push(&data).await;
                if is_last {
                    self.finish_store().await?;
                }
            }
            (Receiving::Drain { context_id, .. }, PDataValueType::Data) if *context_id == id => {
                self.bytes += data.len() as u64;
                if is_last {
                    let Receiving::Drain {
                        rq,
                        context_id,
                        status,
                        comment,
                        reason,
                    } = std::mem::replace(&mut self.state, Receiving::Idle)
                    else {
                        unreachable!()
                    };
                    self.respond(context_id, &rq, status, Some(&comment))
                        .await?;
                    let sop = &rq.affected_sop_instance_uid;
                    let event = events::drained_event(&self.calling_ae, sop, reason);
                    self.shared.events.emit(event);
                }
            }
            (_, kind) => {
                return Err(format!(
                    "{kind:?} fragment on presentation context {id} was not expected here"
                ))
            }
        }
        Ok(())
    }

    /// A complete command set arrived.
    async fn on_command(&mut self) -> Result<(), String> {
        let Receiving::Command { context_id, bytes } =
            std::mem::replace(&mut self.state, Receiving::Idle)
        else {
            unreachable!()
        };
        let rq = Command::parse(&bytes).map_err(|e| format!("{e:#}"))?;
        let context = self
            .assoc
            .presentation_contexts()
            .iter()
            .find(|pc| {
                pc.id == context_id && pc.reason == PresentationContextResultReason::Acceptance
            })
            .cloned()
            .ok_or_else(|| {
                format!("message on presentation context {context_id}, which was not accepted")
            })?;
        let abstract_syntax = syntax::trim_uid(&context.abstract_syntax).to_string();

        match rq.command_field {
            dimse::C_ECHO_RQ if !rq.has_data_set => {
                log::debug!("C-ECHO from {}", peer_str(&self.calling_ae));
                self.respond(context_id, &rq, status::SUCCESS, None).await
            }
            dimse::C_STORE_RQ if rq.has_data_set => {
                let refuse =
                    |status: u16, comment: String, reason: InstanceRefusal| Receiving::Drain {
                        rq: rq.clone(),
                        context_id,
                        status,
                        comment,
                        reason,
                    };
                self.state = if rq.affected_sop_class_uid != abstract_syntax {
                    refuse(
                        status::SOP_CLASS_NOT_SUPPORTED,
                        format!(
                            "SOP class {} sent on a context for {}",
                            peer_str(&rq.affected_sop_class_uid),
                            peer_str(&abstract_syntax)
                        ),
                        InstanceRefusal::NotAccepted,
                    )
                } else if let Err(e) = self.shared.spool.check_free_space() {
                    refuse(status::OUT_OF_RESOURCES, format!("{e:#}"), (&e).into())
                } else {
                    let header = InstanceHeader {
                        sop_class_uid: rq.affected_sop_class_uid.clone(),
                        sop_instance_uid: rq.affected_sop_instance_uid.clone(),
                        transfer_syntax_uid: syntax::trim_uid(&context.transfer_syntax).to_string(),
                        calling_ae: self.calling_ae.clone(),
                        received_at: OffsetDateTime::now_utc(),
                    };
                    match self.shared.spool.begin(header) {
                        Ok(incoming) => Receiving::Store {
                            rq: rq.clone(),
                            context_id,
                            incoming,
                        },
                        Err(e) => refuse(
                            status::OUT_OF_RESOURCES,
                            format!("{e:#}"),
                            InstanceRefusal::OutOfResources,
                        ),
                    }
                };
                if let Receiving::Drain {
                    comment, status, ..
                } = &self.state
                {
                    self.failed += 1;
                    log::warn!(
                        "C-STORE {} from {} refused with {status:04X}: {}",
                        peer_str(&rq.affected_sop_instance_uid),
                        peer_str(&self.calling_ae),
                        escaped(comment)
                    );
                }
                Ok(())
            }
            _ => {
                let comment = format!("command 0x{:04X} is not served here", rq.command_field);
                log::warn!("{} from {}", comment, peer_str(&self.calling_ae));
                if rq.has_data_set {
                    self.state = Receiving::Drain {
                        rq,
                        context_id,
                        status: status::UNRECOGNIZED_OPERATION,
                        comment,
                        reason: InstanceRefusal::NotAccepted,
                    };
                    Ok(())
                } else {
                    self.respond(
                        context_id,
                        &rq,
                        status::UNRECOGNIZED_OPERATION,
                        Some(&comment),
                    )
                    .await
                }
            }
        }
    }

    /// The last data fragment of a C-STORE arrived: make it durable, then answer.
    async fn finish_store(&mut self) -> Result<(), String> {
        let Receiving::Store {
            rq,
            context_id,
            incoming,
        } = std::mem::replace(&mut self.state, Receiving::Idle)
        else {
            unreachable!()
        };
        let spool = self.shared.spool.clone();
        let outcome = run_blocking(move || spool.commit(incoming))
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::OutOfResources(anyhow::anyhow!(
                    "store task failed: {e}"
                )))
            });
        let sop = &rq.affected_sop_instance_uid;
        let event = events::store_event(&self.calling_ae, sop, &outcome);
        let (status, comment, stored) = match outcome {
            Ok(Stored::New(instance)) => {
                self.stored += 1;
                (status::SUCCESS, None, Some(instance))
            }
            Ok(Stored::Duplicate(instance)) => {
                self.duplicates += 1;
                log::info!(
                    "{} from {} is already in the spool ({}); not stored twice",
                    peer_str(&instance.sop_instance_uid),
                    peer_str(&self.calling_ae),
                    instance.path.display()
                );
                (status::SUCCESS, None, None)
            }
            Ok(Stored::KeptFirst(instance)) => {
                self.duplicates += 1;
                log::warn!(
                    "{} from {} differs from the instance with the same SOP Instance UID \
                     in the spool; kept the first (dicom.duplicate_policy = \"keep-first\")",
                    peer_str(&instance.sop_instance_uid),
                    peer_str(&self.calling_ae),
                );
                (status::SUCCESS, None, None)
            }
            Ok(Stored::Replaced(instance)) => {
                self.stored += 1;
                log::warn!(
                    "{} from {} differs from the instance with the same SOP Instance UID \
                     in the spool: replaced it, its series is analysed again \
                     (dicom.duplicate_policy = \"replace\")",
                    peer_str(&instance.sop_instance_uid),
                    peer_str(&self.calling_ae),
                );
                (status::SUCCESS, None, Some(instance))
            }
            Err(e) => {
                self.failed += 1;
                let status = match &e {
                    StoreError::CannotUnderstand(_) => status::CANNOT_UNDERSTAND,
                    StoreError::Mismatch(_) => status::DATA_SET_DOES_NOT_MATCH,
                    StoreError::OutOfResources(_)
                    | StoreError::TooLarge { .. }
                    | StoreError::ShortOfSpace { .. } => status::OUT_OF_RESOURCES,
                };
                log::warn!(
                    "C-STORE {} from {} failed with {status:04X}: {}",
                    peer_str(&rq.affected_sop_instance_uid),
                    peer_str(&self.calling_ae),
                    escaped(&e)
                );
                (status, Some(e.to_string()), None)
            }
        };
        self.respond(context_id, &rq, status, comment.as_deref())
            .await?;
        self.shared.events.emit(event);
        if let Some(instance) = stored {
            log::debug!("stored {}", instance.path.display());
            // The receiver only goes away at shutdown; the file is safe in the spool and
            // the next start re-indexes it.
            let _ = self.tx.send(instance).await;
        }
        Ok(())
    }

    async fn respond(
        &mut self,
        context_id: u8,
        rq: &Command,
        status: u16,
        comment: Option<&str>,
    ) -> Result<(), String> {
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: dimse::response(rq, status, comment),
            }],
        };
        match self.send(&pdu, Outgoing::Response).await {
            Ok(()) => Ok(()),
            Err(SendError::TimedOut) => Err("response not taken (dicom.send_timeout_secs)".into()),
            Err(SendError::Failed(e)) => Err(format!("cannot send response: {e}")),
        }
    }
}
