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

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dicom_ul::association::server::ServerAssociationOptions;
use dicom_ul::association::{AsyncServerAssociation, Error as UlError};
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, PDataValue, PDataValueType, Pdu,
    PresentationContextResultReason,
};
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::access::{take_refusal, AllowList, PeerPolicy};
use super::dimse::{self, status, Command};
use super::limits::{Admission, Limits, MAX_REFUSALS_AT_ONCE};
use super::peer_text::{escaped, peer_str};
use super::refusal::{reject_busy, send_raw};
use super::scp_events::{self, is_io};
use super::spool::{Incoming, InstanceHeader, Spool, SpoolOptions, StoreError, Stored};
use super::syntax::{self, ACCEPTED_TRANSFER_SYNTAXES, VERIFICATION};
use super::{ScpConfig, StoredInstance};

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
                let reason = crate::events::AssociationRefusal::AddressNotAllowed;
                self.shared.events.emit(scp_events::refused(peer, reason));
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
                    shared.events.emit(scp_events::refused(peer, busy));
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
                Admission::Close(busy) => {
                    shared.events.emit(scp_events::refused(peer, busy));
                    log::warn!(
                        "connection from {peer} closed at once: {busy}, and \
                         {MAX_REFUSALS_AT_ONCE} other refusals are in progress"
                    )
                }
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

fn abort_pdu(reason: AbortRQServiceProviderReason) -> Pdu {
    Pdu::AbortRQ {
        source: AbortRQSource::ServiceProvider(reason),
    }
}

/// Negotiates the association, then serves it.
async fn serve_connection(
    socket: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    tx: mpsc::Sender<StoredInstance>,
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

    let established = tokio::time::timeout(
        shared.config.artim_timeout(),
        options.establish_async(socket),
    )
    .await;
    let assoc = match established {
        Ok(Ok(assoc)) => assoc,
        Ok(Err(e)) => {
            if let Some(reason) = scp_events::negotiation_refusal(&e) {
                shared.events.emit(scp_events::refused(peer, reason));
            }
            negotiation_failed(e, peer, &refusal, spare, shared.config.send_timeout()).await;
            return;
        }
        Err(_) => {
            let reason = crate::events::AssociationRefusal::InvalidRequest;
            shared.events.emit(scp_events::refused(peer, reason));
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
    shared.events.emit(crate::events::Event::AssociationOpened {
        peer: peer.to_string(),
        calling_ae: session.calling_ae.clone(),
    });
    session.run().await;
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
    mut spare: TcpStream,
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
            let _ = send_raw(
                &mut spare,
                &abort_pdu(AbortRQServiceProviderReason::InvalidPduParameter),
                send_timeout,
            )
            .await;
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
        other => log::warn!("association with {peer} failed: {}", escaped(other)),
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
    /// A data set that is read and dropped, then answered with `status`.
    Drain {
        rq: Command,
        context_id: u8,
        status: u16,
        comment: String,
    },
}

struct Session<'a> {
    assoc: AsyncServerAssociation<TcpStream>,
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

impl<'a> Session<'a> {
    fn new(
        assoc: AsyncServerAssociation<TcpStream>,
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

    fn log_negotiation(&self) {
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

    async fn run(&mut self) {
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
                    } = std::mem::replace(&mut self.state, Receiving::Idle)
                    else {
                        unreachable!()
                    };
                    self.respond(context_id, &rq, status, Some(&comment))
                        .await?;
                    let sop = &rq.affected_sop_instance_uid;
                    let event = scp_events::drained_event(&self.calling_ae, sop);
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
                let refuse = |status: u16, comment: String| Receiving::Drain {
                    rq: rq.clone(),
                    context_id,
                    status,
                    comment,
                };
                self.state = if rq.affected_sop_class_uid != abstract_syntax {
                    refuse(
                        status::SOP_CLASS_NOT_SUPPORTED,
                        format!(
                            "SOP class {} sent on a context for {}",
                            peer_str(&rq.affected_sop_class_uid),
                            peer_str(&abstract_syntax)
                        ),
                    )
                } else if let Err(e) = self.shared.spool.check_free_space() {
                    refuse(status::OUT_OF_RESOURCES, format!("{e:#}"))
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
                        Err(e) => refuse(status::OUT_OF_RESOURCES, format!("{e:#}")),
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
        let event = scp_events::store_event(&self.calling_ae, sop, &outcome);
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
