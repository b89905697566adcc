//! Reading a result object's Part 10 bytes: the checks made before it is queued
//! ([`check`]) and its data set encoded in the transfer syntax an association accepted
//! ([`data_set_in`]).

use dicom_encoding::TransferSyntaxIndex;
use dicom_object::DefaultDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::error::ObjectProblem;
use super::link::trim_uid;
use crate::report::ResultObject;

/// Checks the UIDs (they name queue files) and that `part10` is a readable Part 10 file
/// whose meta group names the same SOP class and instance as the struct.
pub fn check(object: &ResultObject) -> Result<(), ObjectProblem> {
    for (field, value) in [
        ("sop_class_uid", &object.sop_class_uid),
        ("sop_instance_uid", &object.sop_instance_uid),
        ("series_instance_uid", &object.series_instance_uid),
        ("study_instance_uid", &object.study_instance_uid),
    ] {
        if !is_uid(value) {
            return Err(ObjectProblem::BadUid {
                field,
                value: value.clone(),
            });
        }
    }
    let file = parse(&object.part10)?;
    let meta = file.meta();
    for (field, in_struct, in_file) in [
        (
            "sop_class_uid",
            &object.sop_class_uid,
            &meta.media_storage_sop_class_uid,
        ),
        (
            "sop_instance_uid",
            &object.sop_instance_uid,
            &meta.media_storage_sop_instance_uid,
        ),
    ] {
        if trim_uid(in_file) != in_struct {
            return Err(ObjectProblem::UidMismatch {
                field,
                in_struct: in_struct.clone(),
                in_file: trim_uid(in_file).to_owned(),
            });
        }
    }
    Ok(())
}

/// The data set of `part10` encoded in `transfer_syntax` (a native uncompressed syntax).
pub fn data_set_in(part10: &[u8], transfer_syntax: &str) -> anyhow::Result<Vec<u8>> {
    let file = parse(part10)?;
    let ts = TransferSyntaxRegistry
        .get(transfer_syntax)
        .ok_or_else(|| anyhow::anyhow!("unknown transfer syntax {transfer_syntax}"))?;
    let mut out = Vec::with_capacity(part10.len());
    file.write_dataset_with_ts(&mut out, ts)?;
    Ok(out)
}

fn parse(part10: &[u8]) -> Result<DefaultDicomObject, ObjectProblem> {
    if part10.len() < 132 || &part10[128..132] != b"DICM" {
        return Err(ObjectProblem::NotPart10);
    }
    dicom_object::from_reader(&part10[128..]).map_err(|e| ObjectProblem::Unreadable(e.to_string()))
}

/// A UID as PS3.5 9.1 allows: 1 to 64 characters, digits and dots.
fn is_uid(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && !value.starts_with('.')
        && !value.ends_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids() {
        assert!(is_uid("1.2.840.10008.5.1.4.1.1.7"));
        for bad in ["", "1.2.", "../x", "1.2 3", &"1".repeat(65)] {
            assert!(!is_uid(bad), "{bad:?}");
        }
    }
}
