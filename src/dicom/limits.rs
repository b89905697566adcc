//! How many connections the SCP serves at once: association slots (all peers together
//! and per peer address), and refusals in progress.
//!
//! A connection takes its slot when it is accepted (only after the address part of the
//! allow-list let it in, see [`super::access::AllowList::may_connect_from`]) and keeps it
//! until its task ends. A connection over a limit is answered with A-ASSOCIATE-RJ
//! (transient, local limit exceeded) by a refusal task; at most [`MAX_REFUSALS_AT_ONCE`]
//! such tasks run at once, and a connection beyond that is closed at once, unanswered.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::access::canonical_ip;

/// Refusals (A-ASSOCIATE-RJ, local limit exceeded) handled at the same time. Each reads
/// and discards the peer's request in fixed chunks for up to the ARTIM time; more
/// connections than this while all slots are taken are closed without an answer.
pub const MAX_REFUSALS_AT_ONCE: usize = 16;

/// Which limit a connection ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// `dicom.max_associations` associations are open.
    AllSlots,
    /// `dicom.max_associations_per_address` associations are open from this address.
    ThisAddress,
}

impl fmt::Display for Busy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Busy::AllSlots => "all association slots are taken (dicom.max_associations)",
            Busy::ThisAddress => {
                "this address has all the associations it may have \
                 (dicom.max_associations_per_address)"
            }
        })
    }
}

/// What to do with a newly accepted connection.
pub enum Admission {
    /// Serve it; the slot is held until the guard is dropped.
    Serve(Slot),
    /// Answer it with A-ASSOCIATE-RJ; the permit bounds how many refusals run at once.
    Refuse(Busy, OwnedSemaphorePermit),
    /// Over a limit and too many refusals in progress: close it now.
    Close(Busy),
}

/// An association slot: one of the global ones and one of its address's.
pub struct Slot {
    _global: OwnedSemaphorePermit,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// The SCP's connection limits.
pub struct Limits {
    slots: Arc<Semaphore>,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_address: usize,
    refusals: Arc<Semaphore>,
}

impl Limits {
    pub fn new(max_associations: usize, max_per_address: usize) -> Limits {
        Limits {
            slots: Arc::new(Semaphore::new(max_associations)),
            counts: Arc::default(),
            max_per_address,
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS_AT_ONCE)),
        }
    }

    /// Takes a slot for a connection from `peer`, or says which limit it ran into.
    pub fn admit(&self, peer: IpAddr) -> Admission {
        let ip = canonical_ip(peer);
        let busy = {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let n = counts.get(&ip).copied().unwrap_or(0);
            if n >= self.max_per_address {
                Busy::ThisAddress
            } else {
                match self.slots.clone().try_acquire_owned() {
                    Ok(global) => {
                        counts.insert(ip, n + 1);
                        return Admission::Serve(Slot {
                            _global: global,
                            counts: self.counts.clone(),
                            ip,
                        });
                    }
                    Err(_) => Busy::AllSlots,
                }
            }
        };
        match self.refusals.clone().try_acquire_owned() {
            Ok(permit) => Admission::Refuse(busy, permit),
            Err(_) => Admission::Close(busy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn busy(a: Admission) -> Option<Busy> {
        match a {
            Admission::Serve(_) => None,
            Admission::Refuse(b, _) | Admission::Close(b) => Some(b),
        }
    }

    #[test]
    fn per_address_and_global_caps_and_slots_come_back() {
        let limits = Limits::new(3, 2);
        let a1 = limits.admit(ip("10.0.0.1"));
        let a2 = limits.admit(ip("::ffff:10.0.0.1"));
        assert!(matches!(a1, Admission::Serve(_)) && matches!(a2, Admission::Serve(_)));
        // The same address (IPv4 or IPv4-mapped) is at its cap; another is not.
        assert_eq!(busy(limits.admit(ip("10.0.0.1"))), Some(Busy::ThisAddress));
        let b1 = limits.admit(ip("10.0.0.2"));
        assert!(matches!(b1, Admission::Serve(_)));
        assert_eq!(busy(limits.admit(ip("10.0.0.3"))), Some(Busy::AllSlots));
        drop(a1);
        assert!(matches!(limits.admit(ip("10.0.0.3")), Admission::Serve(_)));
        drop((a2, b1));
        assert!(limits.counts.lock().unwrap().is_empty());
    }

    #[test]
    fn refusals_beyond_the_cap_are_closed() {
        let limits = Limits::new(1, 1);
        let _held = limits.admit(ip("10.0.0.1"));
        let refusals: Vec<_> = (0..MAX_REFUSALS_AT_ONCE)
            .map(|_| limits.admit(ip("10.0.0.2")))
            .collect();
        assert!(refusals
            .iter()
            .all(|a| matches!(a, Admission::Refuse(Busy::AllSlots, _))));
        assert!(matches!(
            limits.admit(ip("10.0.0.2")),
            Admission::Close(Busy::AllSlots)
        ));
        drop(refusals);
        assert!(matches!(
            limits.admit(ip("10.0.0.2")),
            Admission::Refuse(..)
        ));
    }
}
