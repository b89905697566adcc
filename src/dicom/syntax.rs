//! The SOP classes and transfer syntaxes we negotiate.
//!
//! We accept a transfer syntax only if the volume builder can decode its pixel data
//! (dicom-pixeldata with the native JPEG/RLE codecs, CharLS and OpenJPEG). Anything else
//! is refused at negotiation ("transfer syntaxes not supported"), so the SCU can fall
//! back to another syntax instead of us accepting an instance we would later drop.

pub const VERIFICATION: &str = "1.2.840.10008.1.1";
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const ENHANCED_CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2.1";
pub const MR_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.4";
pub const ENHANCED_MR_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.4.1";

/// Accepted by default. MR is stored too (a PACS routing a whole study must not see
/// failures for it); the series assembler skips non-CT series with a recorded reason.
pub const DEFAULT_STORAGE_SOP_CLASSES: &[&str] = &[
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    ENHANCED_MR_IMAGE_STORAGE,
];

pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// JPEG Extended (1.2.840.10008.1.2.4.51) is deliberately absent: CT uses it with 12-bit
/// samples, which dicom-pixeldata 0.10 cannot decode. Accepting it would acknowledge
/// instances the series stage must then fail; refused, the scanner falls back to a
/// syntax we can decode.
///
/// Transfer syntaxes whose pixel data we can decode, in our order of preference
/// (the SCU's order of proposal decides within one presentation context).
pub const ACCEPTED_TRANSFER_SYNTAXES: &[(&str, &str)] = &[
    (EXPLICIT_VR_LE, "Explicit VR Little Endian"),
    (IMPLICIT_VR_LE, "Implicit VR Little Endian"),
    (
        "1.2.840.10008.1.2.1.99",
        "Deflated Explicit VR Little Endian",
    ),
    ("1.2.840.10008.1.2.5", "RLE Lossless"),
    ("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)"),
    ("1.2.840.10008.1.2.4.57", "JPEG Lossless (Process 14)"),
    (
        "1.2.840.10008.1.2.4.70",
        "JPEG Lossless SV1 (Process 14, Selection Value 1)",
    ),
    ("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless"),
    ("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless"),
    ("1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless"),
    ("1.2.840.10008.1.2.4.91", "JPEG 2000"),
];

pub fn is_accepted_transfer_syntax(uid: &str) -> bool {
    let uid = trim_uid(uid);
    ACCEPTED_TRANSFER_SYNTAXES.iter().any(|(ts, _)| *ts == uid)
}

/// UIDs on the wire are padded to even length with NUL (and sometimes spaces).
pub fn trim_uid(uid: &str) -> &str {
    uid.trim_end_matches(['\0', ' '])
}

/// A DICOM UID: 1 to 64 characters, digits and dots, no empty component.
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_accepted_syntax_is_known_to_the_registry_with_a_pixel_codec() {
        use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
        use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
        for (uid, name) in ACCEPTED_TRANSFER_SYNTAXES {
            let ts = TransferSyntaxRegistry
                .get(uid)
                .unwrap_or_else(|| panic!("{name} ({uid}) missing from the registry"));
            assert!(!ts.is_unsupported(), "{name}: data set codec missing");
            assert!(
                !ts.is_unsupported_pixel_encapsulation(),
                "{name}: pixel data codec missing"
            );
        }
    }

    #[test]
    fn uids() {
        assert!(is_valid_uid("1.2.840.10008.1.2"));
        assert!(!is_valid_uid("1..2"));
        assert!(!is_valid_uid("../etc"));
        assert!(!is_valid_uid(""));
        assert_eq!(trim_uid("1.2\0"), "1.2");
        assert!(is_accepted_transfer_syntax("1.2.840.10008.1.2.4.90\0"));
        assert!(!is_accepted_transfer_syntax("1.2.840.10008.1.2.2"));
    }
}
