//! DIMSE command sets (PS3.7): the requests we understand and the responses we send.
//! Command sets are always Implicit VR Little Endian, whatever the presentation context.

use anyhow::{bail, Context, Result};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

use super::syntax::trim_uid;

pub const C_STORE_RQ: u16 = 0x0001;
pub const C_STORE_RSP: u16 = 0x8001;
pub const C_ECHO_RQ: u16 = 0x0030;
pub const C_ECHO_RSP: u16 = 0x8030;
/// Command Data Set Type value meaning "no data set follows".
pub const NO_DATA_SET: u16 = 0x0101;
/// Largest command set we collect. A command set is a handful of short elements (a
/// C-STORE-RQ is about 150 bytes), but its fragments are gathered in memory until the
/// last one: without a cap a peer that never sends the last fragment grows the
/// association's memory without limit.
pub const MAX_COMMAND_SET_LEN: usize = 64 * 1024;

/// `Err` (the reason, for the log and the A-ABORT) when a command set would grow to
/// `len` bytes, more than [`MAX_COMMAND_SET_LEN`]. Called before each fragment is kept.
pub fn check_command_set_len(len: usize) -> Result<(), String> {
    if len > MAX_COMMAND_SET_LEN {
        return Err(format!(
            "command set of more than {MAX_COMMAND_SET_LEN} bytes ({len} received so far); \
             a command set is a few hundred bytes"
        ));
    }
    Ok(())
}

/// C-STORE / C-ECHO status codes (PS3.4 B.2.3, PS3.7 C).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: SOP Class not supported (the command's class is not the context's).
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Unrecognized operation (a command we do not serve).
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// Refused: Out of Resources (spool full or write failed).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: Data Set does not match SOP Class (or its SOP Instance UID).
    pub const DATA_SET_DOES_NOT_MATCH: u16 = 0xA900;
    /// Error: Cannot understand (unparseable data set).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

/// The fields of a request command set that we act on.
#[derive(Debug, Clone)]
pub struct Command {
    pub command_field: u16,
    pub message_id: u16,
    pub affected_sop_class_uid: String,
    pub affected_sop_instance_uid: String,
    pub has_data_set: bool,
}

impl Command {
    /// Decodes a complete command set (all its P-DATA fragments concatenated).
    pub fn parse(bytes: &[u8]) -> Result<Command> {
        // A peer's lengths are checked first: dicom-object allocates what they declare.
        super::lengths::check_bytes(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .context("command set is not valid Implicit VR Little Endian")?;
        let obj =
            InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
                .context("command set is not valid Implicit VR Little Endian")?;
        let u16_of = |tag| -> Result<Option<u16>> {
            match obj.element_opt(tag)? {
                Some(e) => {
                    Ok(Some(e.to_int::<u16>().with_context(|| {
                        format!("command element {tag} is not a number")
                    })?))
                }
                None => Ok(None),
            }
        };
        let str_of = |tag| -> Result<String> {
            Ok(match obj.element_opt(tag)? {
                Some(e) => trim_uid(&e.to_str()?).to_string(),
                None => String::new(),
            })
        };
        let Some(command_field) = u16_of(tags::COMMAND_FIELD)? else {
            bail!("command set has no Command Field (0000,0100)")
        };
        Ok(Command {
            command_field,
            message_id: u16_of(tags::MESSAGE_ID)?.unwrap_or(0),
            affected_sop_class_uid: str_of(tags::AFFECTED_SOP_CLASS_UID)?,
            affected_sop_instance_uid: str_of(tags::AFFECTED_SOP_INSTANCE_UID)?,
            has_data_set: u16_of(tags::COMMAND_DATA_SET_TYPE)?.unwrap_or(NO_DATA_SET)
                != NO_DATA_SET,
        })
    }
}

/// Encodes the response to `rq` (C-STORE-RSP, C-ECHO-RSP, or a generic response with the
/// request's command field | 0x8000) with `status` and an optional error comment.
///
/// A response has no Specific Character Set, so its text must encode in the default
/// repertoire. The request's UIDs were decoded with whatever character set the *peer*
/// declared (a command set may carry (0008,0005) too): a UID that is not plain ASCII is
/// left out of the response (the SCU matches responses by message ID). Before this, such
/// a request made the encoder fail and the association task panic without an answer
/// (found by the `command_set` fuzz target; `tests/fixtures/fuzz/command_set-latin2-uid.bin`).
/// Error comments quote peer values too (the SOP class of a refused command, parse
/// errors): their characters outside ASCII become `?`.
pub fn response(rq: &Command, status: u16, error_comment: Option<&str>) -> Vec<u8> {
    let mut elements = vec![
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(rq.command_field | 0x8000),
        ),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            PrimitiveValue::from(rq.message_id),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(NO_DATA_SET),
        ),
        DataElement::new(tags::STATUS, VR::US, PrimitiveValue::from(status)),
    ];
    if echoable(&rq.affected_sop_class_uid) {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(even_uid(&rq.affected_sop_class_uid)),
        ));
    }
    if !rq.affected_sop_instance_uid.is_empty() && echoable(&rq.affected_sop_instance_uid) {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(even_uid(&rq.affected_sop_instance_uid)),
        ));
    }
    if let Some(comment) = error_comment {
        // LO: at most 64 characters, no backslash, default repertoire.
        let mut c: String = comment
            .chars()
            .filter(|c| *c != '\\' && !c.is_control())
            .map(|c| if c.is_ascii() { c } else { '?' })
            .take(64)
            .collect();
        if c.len() % 2 == 1 {
            c.push(' ');
        }
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(c),
        ));
    }
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::with_capacity(256);
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("a command set of ASCII text and numbers always encodes");
    out
}

/// A request UID we can echo: printable ASCII, one value (no backslash).
fn echoable(uid: &str) -> bool {
    uid.chars().all(|c| c.is_ascii_graphic() && c != '\\')
}

/// UI values are padded to even length with a NUL.
fn even_uid(uid: &str) -> String {
    let mut s = uid.to_string();
    if s.len() % 2 == 1 {
        s.push('\0');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lying_command_sets_are_refused_before_parsing() {
        let rq = Command {
            command_field: C_ECHO_RQ,
            message_id: 1,
            affected_sop_class_uid: "1.2.840.10008.1.1".into(),
            affected_sop_instance_uid: String::new(),
            has_data_set: false,
        };
        let good = response(&rq, status::SUCCESS, None);
        Command::parse(&good).unwrap();
        // Affected SOP Class UID (the first element after the group length) claims 2 GB.
        let mut bad = good.clone();
        bad[12 + 4..12 + 8].copy_from_slice(&0x7FFF_FFF0u32.to_le_bytes());
        let e = format!("{:#}", Command::parse(&bad).unwrap_err());
        assert!(e.contains("element (0000,0002) UI"), "{e}");
        // Thousands of nested undefined-length sequences would overflow the stack.
        let mut deep = good;
        for _ in 0..5000 {
            deep.extend_from_slice(&[0x09, 0, 0x10, 0, 0xff, 0xff, 0xff, 0xff]);
            deep.extend_from_slice(&[0xfe, 0xff, 0x00, 0xe0, 0xff, 0xff, 0xff, 0xff]);
        }
        let e = format!("{:#}", Command::parse(&deep).unwrap_err());
        assert!(e.contains("nested more than"), "{e}");
    }

    #[test]
    fn command_sets_are_capped() {
        check_command_set_len(0).unwrap();
        check_command_set_len(MAX_COMMAND_SET_LEN).unwrap();
        let e = check_command_set_len(MAX_COMMAND_SET_LEN + 1).unwrap_err();
        assert!(
            e.contains("command set of more than 65536 bytes (65537 received so far)"),
            "{e}"
        );
    }

    /// Regression: the `command_set` fuzz target's crash, minimised. A command set that
    /// declares Specific Character Set "ISO_IR_101" (Latin-2) and carries bytes >= 0x80
    /// in its Affected SOP Class UID parses into characters the default repertoire cannot
    /// encode; `response` panicked ("unrepresentable character") instead of answering.
    #[test]
    fn requests_with_non_ascii_uids_or_comments_still_get_a_response() {
        let bytes = include_bytes!("../../tests/fixtures/fuzz/command_set-latin2-uid.bin");
        let rq = Command::parse(bytes).unwrap();
        assert!(!rq.affected_sop_class_uid.is_ascii(), "{rq:?}");
        let rsp = Command::parse(&response(&rq, status::SUCCESS, None)).unwrap();
        assert_eq!(rsp.command_field, rq.command_field | 0x8000);
        assert_eq!(rsp.affected_sop_class_uid, ""); // left out, not mangled

        // An error comment quoting a data set value decoded as UTF-8 (ISO_IR 192).
        let rq = Command {
            command_field: C_STORE_RQ,
            message_id: 3,
            affected_sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            affected_sop_instance_uid: "1.2.3".into(),
            has_data_set: true,
        };
        let comment = "SOP Instance UID in the data set is \"1.2.\u{20ac}\u{3b1}\", the command says \"1.2.3\"";
        let bytes = response(&rq, status::DATA_SET_DOES_NOT_MATCH, Some(comment));
        let obj =
            InMemDicomObject::read_dataset_with_ts(&bytes[..], &IMPLICIT_VR_LITTLE_ENDIAN.erased())
                .unwrap();
        let echoed = obj.element(tags::ERROR_COMMENT).unwrap().to_str().unwrap();
        assert!(
            echoed.starts_with("SOP Instance UID in the data set is \"1.2.??\""),
            "{echoed}"
        );
        assert_eq!(
            Command::parse(&bytes).unwrap().affected_sop_instance_uid,
            "1.2.3"
        );
    }

    #[test]
    fn response_round_trips() {
        let rq = Command {
            command_field: C_STORE_RQ,
            message_id: 7,
            affected_sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            affected_sop_instance_uid: "1.2.3".into(),
            has_data_set: true,
        };
        let bytes = response(&rq, status::CANNOT_UNDERSTAND, Some("bad \\ data"));
        let obj =
            InMemDicomObject::read_dataset_with_ts(&bytes[..], &IMPLICIT_VR_LITTLE_ENDIAN.erased())
                .unwrap();
        assert_eq!(
            obj.element(tags::STATUS).unwrap().to_int::<u16>().unwrap(),
            0xC000
        );
        assert_eq!(
            obj.element(tags::COMMAND_FIELD)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            C_STORE_RSP
        );
        let parsed = Command::parse(&bytes).unwrap();
        assert_eq!(parsed.message_id, 0); // responses carry MessageIDBeingRespondedTo
        assert_eq!(parsed.affected_sop_instance_uid, "1.2.3");
        assert!(!parsed.has_data_set);
        assert!(obj
            .element(tags::ERROR_COMMENT)
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("bad  data"));
    }
}
