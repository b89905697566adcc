//! What a spool file holds besides the data set as received: the file meta group we write
//! (with the calling AE and the receive time), and what is read back from a file or from
//! the bytes of an instance still in memory.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{FileMetaTable, OpenFileOptions};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::request::InstanceHeader;
use crate::dicom::lengths;
use crate::dicom::syntax::trim_uid;

/// Creator UID of our private file meta information (a UUID-derived `2.25` UID, which
/// needs no registered root).
pub const PRIVATE_INFORMATION_CREATOR_UID: &str = "2.25.163204738215046281437019583215410296871";
const RECEIVED_AT_PREFIX: &str = "received_at=";

pub(super) fn file_meta(h: &InstanceHeader, our_ae: &str) -> Result<FileMetaTable> {
    let received = h
        .received_at
        .format(&Rfc3339)
        .context("cannot format receive time")?;
    FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(h.sop_class_uid.as_str())
        .media_storage_sop_instance_uid(h.sop_instance_uid.as_str())
        .transfer_syntax(h.transfer_syntax_uid.as_str())
        .source_application_entity_title(h.calling_ae.as_str())
        .receiving_application_entity_title(our_ae)
        .private_information_creator_uid(PRIVATE_INFORMATION_CREATOR_UID)
        .private_information(format!("{RECEIVED_AT_PREFIX}{received}").into_bytes())
        .build()
        .map_err(|e| anyhow!("cannot build file meta group: {e}"))
}

pub(super) struct InstanceInfo {
    pub(super) study_instance_uid: String,
    pub(super) series_instance_uid: String,
    pub(super) sop_instance_uid: String,
    pub(super) sop_class_uid: String,
    pub(super) calling_ae: String,
    /// Of the file meta group: how the data set is encoded, and where it starts.
    pub(super) transfer_syntax_uid: String,
    pub(super) data_set_offset: u64,
}

/// Where a Part 10 file (preamble, meta group, data set) is read from.
pub(super) enum InstanceSource<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

/// Parses a spool file: identifying UIDs, calling AE, receive time (if recorded).
pub(super) fn read_instance(
    path: &Path,
    full: bool,
) -> Result<(InstanceInfo, Option<OffsetDateTime>)> {
    read_instance_from(InstanceSource::File(path), full)
}

/// [`read_instance`] of a file, or of its bytes in memory.
pub(super) fn read_instance_from(
    src: InstanceSource<'_>,
    full: bool,
) -> Result<(InstanceInfo, Option<OffsetDateTime>)> {
    let mut opts = OpenFileOptions::new();
    if !full {
        opts = opts.read_until(tags::PIXEL_DATA);
    }
    let obj = match src {
        InstanceSource::File(path) => opts.open_file(path),
        InstanceSource::Bytes(bytes) => opts.read_preamble(ReadPreamble::Always).from_reader(bytes),
    }
    .map_err(|e| anyhow!("{e}"))?;
    let text = |tag| -> String {
        obj.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok().map(|s| trim_uid(s.trim()).to_string()))
            .unwrap_or_default()
    };
    let meta = obj.meta();
    let received_at = meta
        .private_information
        .as_deref()
        .filter(|_| {
            meta.private_information_creator_uid
                .as_deref()
                .map(trim_uid)
                == Some(PRIVATE_INFORMATION_CREATOR_UID)
        })
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| {
            s.trim_end_matches(['\0', ' '])
                .strip_prefix(RECEIVED_AT_PREFIX)
        })
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok());
    let info = InstanceInfo {
        study_instance_uid: text(tags::STUDY_INSTANCE_UID),
        series_instance_uid: text(tags::SERIES_INSTANCE_UID),
        sop_instance_uid: text(tags::SOP_INSTANCE_UID),
        sop_class_uid: text(tags::SOP_CLASS_UID),
        calling_ae: meta
            .source_application_entity_title()
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
            .unwrap_or_default(),
        transfer_syntax_uid: trim_uid(meta.transfer_syntax()).to_string(),
        // Preamble, "DICM", the group length element (12 bytes), then the group.
        data_set_offset: 128 + 4 + 12 + u64::from(meta.information_group_length),
    };
    Ok((info, received_at))
}

/// What the re-index asks of a spool file before it trusts it again: the file meta group
/// and the data set up to the pixel data parse, and every declared length of the whole
/// data set fits in the file ([`lengths::check_file`]), so a file cut short (a failing
/// disk, a copy or a crash outside the write protocol) is caught here and not halfway
/// through a series' analysis.
pub(super) fn recheck_instance(path: &Path) -> Result<(InstanceInfo, Option<OffsetDateTime>)> {
    let (info, received_at) = read_instance(path, false)?;
    lengths::check_file(path, info.data_set_offset, &info.transfer_syntax_uid)?;
    Ok((info, received_at))
}

/// Whether the data set of the spool file at `path` (after its own file meta group) is,
/// byte for byte, `data_set`: a re-sent instance is then a duplicate, otherwise a
/// corrected version. Streams the file; reads no more than `data_set.len()` bytes.
pub(super) fn same_data_set(path: &Path, data_set: DataSetBytes<'_>) -> Result<bool> {
    let (info, _) = read_instance(path, false)?;
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata()?.len().saturating_sub(info.data_set_offset);
    if len != data_set.len()? {
        return Ok(false);
    }
    file.seek(SeekFrom::Start(info.data_set_offset))?;
    let mut other = data_set.reader()?;
    let (mut a, mut b) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    loop {
        let n = read_full(&mut file, &mut a)?;
        let m = read_full(&mut other, &mut b[..n.max(1)])?;
        if n != m || a[..n] != b[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// The data set of an instance being committed: in memory, or in its temp file from an
/// offset.
pub(super) enum DataSetBytes<'a> {
    Memory(&'a [u8]),
    File { path: &'a Path, offset: u64 },
}

impl DataSetBytes<'_> {
    fn len(&self) -> Result<u64> {
        Ok(match self {
            DataSetBytes::Memory(b) => b.len() as u64,
            DataSetBytes::File { path, offset } => std::fs::metadata(path)
                .with_context(|| format!("cannot stat {}", path.display()))?
                .len()
                .saturating_sub(*offset),
        })
    }

    fn reader(&self) -> Result<Box<dyn Read + '_>> {
        Ok(match self {
            DataSetBytes::Memory(b) => Box::new(*b),
            DataSetBytes::File { path, offset } => {
                let mut f =
                    File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
                f.seek(SeekFrom::Start(*offset))?;
                Box::new(f)
            }
        })
    }
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
