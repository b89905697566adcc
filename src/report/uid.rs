//! Deterministic UIDs of the result objects: the same result id always names the same
//! series and instances, so a re-analysis after a crash rebuilds objects with the UIDs
//! already queued or delivered, and delivery stays once per UID.

use sha2::{Digest, Sha256};

use super::object::ResultObjectKind;

/// Implementation Class UID (0002,0012) of the files we write: `2.25.` + the first 16
/// bytes of sha256("cspine-triage/implementation").
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.223456417255649113861469872651602845001";

/// Implementation Version Name (0002,0013), at most 16 characters.
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("CSPINE_", env!("CARGO_PKG_VERSION"));

/// The JSON / UID-derivation name of a kind.
pub fn kind_name(kind: ResultObjectKind) -> &'static str {
    match kind {
        ResultObjectKind::StructuredReport => "structured_report",
        ResultObjectKind::KeyObjectSelection => "key_object_selection",
        ResultObjectKind::SecondaryCapture => "secondary_capture",
    }
}

/// `2.25.` + the decimal of the first 16 bytes (big-endian) of sha256(`text`): a UUID-
/// derived UID (PS3.5 B.2), at most 44 characters.
pub fn uid_from(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    format!("2.25.{}", u128::from_be_bytes(first))
}

/// Series Instance UID of the `kind` object of result `result_id`:
/// [`uid_from`]`("<result_id>/<kind>/series")`.
pub fn series_uid(result_id: &str, kind: ResultObjectKind) -> String {
    uid_from(&format!("{result_id}/{}/series", kind_name(kind)))
}

/// SOP Instance UID of the `kind` object of result `result_id`:
/// [`uid_from`]`("<result_id>/<kind>/instance")`.
pub fn instance_uid(result_id: &str, kind: ResultObjectKind) -> String {
    uid_from(&format!("{result_id}/{}/instance", kind_name(kind)))
}

/// A further UID of result `result_id` named by `what` (e.g. an SR tracking identifier).
pub fn derived_uid(result_id: &str, what: &str) -> String {
    uid_from(&format!("{result_id}/{what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_follow_the_documented_formula_and_are_valid() {
        let digest = Sha256::digest(b"abc/structured_report/series");
        let n = u128::from_be_bytes(digest[..16].try_into().unwrap());
        assert_eq!(
            series_uid("abc", ResultObjectKind::StructuredReport),
            format!("2.25.{n}")
        );
        let all = [
            ResultObjectKind::StructuredReport,
            ResultObjectKind::KeyObjectSelection,
            ResultObjectKind::SecondaryCapture,
        ];
        let mut uids: Vec<String> = all
            .iter()
            .flat_map(|&k| [series_uid("abc", k), instance_uid("abc", k)])
            .collect();
        uids.push(uid_from(IMPLEMENTATION_CLASS_UID));
        for uid in &uids {
            assert!(uid.len() <= 64 && uid.starts_with("2.25."), "{uid}");
            assert!(!uid[5..].starts_with('0') && uid[5..].bytes().all(|b| b.is_ascii_digit()));
        }
        uids.sort();
        uids.dedup();
        assert_eq!(uids.len(), 7, "all distinct");
        assert_eq!(
            uid_from("cspine-triage/implementation"),
            IMPLEMENTATION_CLASS_UID
        );
        assert!(IMPLEMENTATION_VERSION_NAME.len() <= 16);
    }
}
