//! What the SCP tells the event stream ([`crate::events`]): the event of a finished
//! C-STORE and the reason of a refused connection, from the SCP's own types.

use dicom_ul::association::Error as UlError;

use crate::dicom::limits::Busy;
use crate::dicom::spool::{StoreError, Stored};
use crate::events::{AssociationRefusal, Event, InstanceRefusal};

impl From<Busy> for AssociationRefusal {
    fn from(busy: Busy) -> Self {
        match busy {
            Busy::AllSlots => AssociationRefusal::AllSlots,
            Busy::ThisAddress => AssociationRefusal::ThisAddress,
        }
    }
}

impl From<&StoreError> for InstanceRefusal {
    fn from(e: &StoreError) -> Self {
        match e {
            StoreError::CannotUnderstand(_) => InstanceRefusal::CannotUnderstand,
            StoreError::Mismatch(_) => InstanceRefusal::Mismatch,
            StoreError::TooLarge { .. } => InstanceRefusal::TooLarge,
            StoreError::ShortOfSpace { .. } => InstanceRefusal::ShortOfSpace,
            StoreError::OutOfResources(_) => InstanceRefusal::OutOfResources,
        }
    }
}

/// The event of a C-STORE whose data set reached the spool (stored, or refused there).
pub fn store_event(
    calling_ae: &str,
    sop_instance_uid: &str,
    outcome: &Result<Stored, StoreError>,
) -> Event {
    let (calling_ae, sop_instance_uid) = (calling_ae.to_owned(), sop_instance_uid.to_owned());
    match outcome {
        Ok(stored) => Event::InstanceStored {
            calling_ae,
            sop_instance_uid,
            duplicate: matches!(stored, Stored::Duplicate(_) | Stored::KeptFirst(_)),
        },
        Err(e) => Event::InstanceRefused {
            calling_ae,
            sop_instance_uid,
            reason: e.into(),
        },
    }
}

/// The event of a C-STORE refused before its data set was stored (drained): not served
/// ([`InstanceRefusal::NotAccepted`]), or no room for it in the spool.
pub fn drained_event(calling_ae: &str, sop_instance_uid: &str, reason: InstanceRefusal) -> Event {
    Event::InstanceRefused {
        calling_ae: calling_ae.to_owned(),
        sop_instance_uid: sop_instance_uid.to_owned(),
        reason,
    }
}

/// Why association negotiation failed, or `None` when the peer just went away.
pub fn negotiation_refusal(e: &UlError) -> Option<AssociationRefusal> {
    match e {
        UlError::Rejected { .. } => Some(AssociationRefusal::Rejected),
        UlError::ConnectionClosed { .. } => None,
        UlError::ReceivePdu { source, .. } if is_io(source) => None,
        _ => Some(AssociationRefusal::InvalidRequest),
    }
}

/// Whether a PDU could not be read because the connection failed (the peer went away).
pub fn is_io(e: &dicom_ul::pdu::ReadError) -> bool {
    use std::error::Error as _;
    let mut cur: Option<&dyn std::error::Error> = e.source();
    while let Some(err) = cur {
        if err.is::<std::io::Error>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// An association refusal of `peer`.
pub fn refused(peer: std::net::SocketAddr, reason: impl Into<AssociationRefusal>) -> Event {
    Event::AssociationRefused {
        peer: peer.to_string(),
        reason: reason.into(),
    }
}
