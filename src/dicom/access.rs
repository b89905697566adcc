//! Who may open an association: the called AE must be ours, and when an allow-list is
//! configured the calling AE (optionally pinned to a peer address) must be on it.
//!
//! The address part is checked twice: at accept, before the connection takes an
//! association slot ([`AllowList::may_connect_from`]: when every entry is pinned to an
//! address, no other address can ever associate), and with the AE title at negotiation.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure, Context, Result};
use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{AssociationRJServiceUserReason, UserIdentity};

/// Checks an AE title as PS3.5 defines it: 1 to 16 characters of the default
/// repertoire, no backslash, no control characters, not only spaces.
pub fn validate_ae_title(ae: &str) -> Result<()> {
    ensure!(
        !ae.trim().is_empty() && ae.len() <= 16,
        "AE title must be 1 to 16 characters, got {ae:?}"
    );
    ensure!(
        ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\'),
        "AE title {ae:?} may only contain printable ASCII characters other than '\\'"
    );
    Ok(())
}

/// One allow-list entry: `AE` or `AE@address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedPeer {
    pub ae_title: String,
    pub address: Option<IpAddr>,
}

/// The calling-AE allow-list. Empty means "anyone who calls our AE title".
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    entries: Vec<AllowedPeer>,
}

impl AllowList {
    pub fn parse(entries: &[String]) -> Result<AllowList> {
        let entries = entries
            .iter()
            .map(|entry| {
                let (ae, address) = match entry.rsplit_once('@') {
                    Some((ae, addr)) => {
                        let ip: IpAddr = addr.parse().with_context(|| {
                            format!("{entry:?}: {addr:?} is not an IP address (use AE or AE@IP)")
                        })?;
                        (ae, Some(ip))
                    }
                    None => (entry.as_str(), None),
                };
                validate_ae_title(ae).with_context(|| format!("entry {entry:?}"))?;
                Ok(AllowedPeer {
                    ae_title: ae.trim().to_string(),
                    address,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AllowList { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a connection from `peer` could ever be allowed, judged before its
    /// A-ASSOCIATE-RQ is read: false only when every entry is pinned to an address and
    /// none is `peer`'s. Such a connection is closed at accept, without taking a slot.
    pub fn may_connect_from(&self, peer: IpAddr) -> bool {
        self.entries.is_empty()
            || self
                .entries
                .iter()
                .any(|e| e.address.is_none_or(|a| same_ip(a, peer)))
    }

    /// `Ok` if this calling AE from this address may associate, else why not.
    pub fn check(&self, calling_ae: &str, peer: IpAddr) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let calling_ae = calling_ae.trim();
        let mut known_ae = false;
        for entry in &self.entries {
            if entry.ae_title == calling_ae {
                known_ae = true;
                if entry.address.is_none_or(|a| same_ip(a, peer)) {
                    return Ok(());
                }
            }
        }
        if known_ae {
            bail!("calling AE {calling_ae:?} is allowed, but not from address {peer}")
        }
        bail!("calling AE {calling_ae:?} is not in dicom.allowed_calling_aes")
    }
}

pub fn take_refusal(slot: &Mutex<Option<String>>) -> Option<String> {
    slot.lock().ok().and_then(|mut r| r.take())
}

/// An IPv4 peer seen through an IPv6 socket (`::ffff:a.b.c.d`) as that IPv4; any other
/// address as it is.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    canonical_ip(a) == canonical_ip(b)
}

/// The [`AccessControl`] policy of one incoming connection. dicom-ul only passes AE
/// titles, so the peer address is captured per connection; the refusal reason is kept
/// so that the SCP can log it in full (the A-ASSOCIATE-RJ can only carry a code).
pub struct PeerPolicy {
    pub allow_list: Arc<AllowList>,
    pub peer: IpAddr,
    pub refusal: Arc<Mutex<Option<String>>>,
}

impl PeerPolicy {
    pub fn new(allow_list: Arc<AllowList>, peer: IpAddr) -> PeerPolicy {
        PeerPolicy {
            allow_list,
            peer,
            refusal: Arc::new(Mutex::new(None)),
        }
    }

    /// Where the reason of a refusal is left; clone it before handing the policy over.
    pub fn refusal_slot(&self) -> Arc<Mutex<Option<String>>> {
        self.refusal.clone()
    }

    pub fn take_refusal(&self) -> Option<String> {
        take_refusal(&self.refusal)
    }

    fn refuse(
        &self,
        why: String,
        reason: AssociationRJServiceUserReason,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if let Ok(mut r) = self.refusal.lock() {
            *r = Some(why);
        }
        Err(reason)
    }
}

impl AccessControl for PeerPolicy {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        let called = called_ae_title.trim();
        if called != this_ae_title.trim() {
            return self.refuse(
                format!(
                    "called AE {called:?} is not ours ({:?}); calling AE {:?}",
                    this_ae_title.trim(),
                    calling_ae_title.trim()
                ),
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            );
        }
        if let Err(why) = self.allow_list.check(calling_ae_title, self.peer) {
            return self.refuse(
                why.to_string(),
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allow_list_with_and_without_address() {
        let list = AllowList::parse(&["CTSCANNER".into(), "PACS@127.0.0.2".into()]).unwrap();
        assert!(list.check("CTSCANNER ", ip("10.0.0.1")).is_ok());
        assert!(list.check("PACS", ip("127.0.0.2")).is_ok());
        assert!(list.check("PACS", ip("::ffff:127.0.0.2")).is_ok());
        let err = list.check("PACS", ip("127.0.0.3")).unwrap_err().to_string();
        assert!(err.contains("not from address"), "{err}");
        let err = list
            .check("OTHER", ip("127.0.0.2"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not in dicom.allowed_calling_aes"), "{err}");
        assert!(AllowList::default().check("ANY", ip("127.0.0.1")).is_ok());
    }

    #[test]
    fn addresses_that_can_never_associate_are_known_before_negotiation() {
        let pinned = AllowList::parse(&["CT@10.0.0.5".into(), "PACS@10.0.0.6".into()]).unwrap();
        assert!(pinned.may_connect_from(ip("10.0.0.5")));
        assert!(pinned.may_connect_from(ip("::ffff:10.0.0.6")));
        assert!(!pinned.may_connect_from(ip("10.0.0.7")));
        // One entry without an address: any address may try (the AE decides).
        let open = AllowList::parse(&["CT@10.0.0.5".into(), "PACS".into()]).unwrap();
        assert!(open.may_connect_from(ip("10.0.0.7")));
        assert!(AllowList::default().may_connect_from(ip("10.0.0.7")));
    }

    #[test]
    fn bad_entries_are_refused() {
        assert!(AllowList::parse(&["CT@host.example".into()]).is_err());
        assert!(AllowList::parse(&["".into()]).is_err());
        assert!(AllowList::parse(&["A\\B".into()]).is_err());
        assert!(AllowList::parse(&["SEVENTEEN_CHARS_X".into()]).is_err());
    }

    #[test]
    fn policy_gives_the_standard_reason_codes() {
        let list = Arc::new(AllowList::parse(&["CT".into()]).unwrap());
        let p = PeerPolicy::new(list, ip("127.0.0.1"));
        assert_eq!(
            p.check_access("CSPINE", "CT", "WRONG", None),
            Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized)
        );
        assert!(p.take_refusal().unwrap().contains("WRONG"));
        assert_eq!(
            p.check_access("CSPINE", "MR", "CSPINE", None),
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        );
        assert_eq!(p.check_access("CSPINE", "CT", "CSPINE", None), Ok(()));
    }
}
