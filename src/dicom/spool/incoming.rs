//! An instance being received: held in memory up to [`WRITE_CHUNK`] bytes, streamed into
//! a temp file in `.tmp/` beyond that, and checked ([`Incoming::prepare`]) before the
//! spool makes it durable. Two limits hold while the bytes arrive, not only when the
//! command starts: the instance size (`dicom.max_instance_mb`) and the spool's free-space
//! floor (`dicom.min_free_space_mb`), checked before each chunk is written. A C-STORE that
//! never ends can therefore neither fill the memory nor the spool's file system (which
//! the outbox and the other scanners share).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use time::OffsetDateTime;

use super::instance::{read_instance_from, DataSetBytes, InstanceInfo, InstanceSource};
use super::request::{InstanceHeader, StoreError};
use crate::dicom::lengths;

/// Received bytes are held in memory up to this size; a larger instance is streamed to
/// its temp file in chunks of this size. An instance that fits (every CT slice) is
/// checked and parsed from memory and written with one call, after the checks: no
/// read-back, no small writes. (Writing each fragment as it arrives, to overlap the
/// page-cache copy with the network, measured slower on a loaded 2-core box.)
pub const WRITE_CHUNK: usize = 4 << 20;
/// First allocation of an instance's buffer: a 512x512 16-bit slice and its header fit,
/// so the usual instance is received without reallocating (and copying) its buffer.
pub(super) const INITIAL_BUFFER: usize = 640 << 10;
/// Data sets up to this size (inflated, for the deflated syntax) are parsed completely
/// before acceptance; larger ones (multi-frame) are parsed up to the pixel data only,
/// which the length check has walked (truncated pixel data is refused either way).
const FULL_PARSE_LIMIT: u64 = 64 << 20;

/// The limits an instance is received under (from `[dicom]`).
#[derive(Debug, Clone)]
pub(super) struct ReceiveLimits {
    /// Largest data set accepted, bytes.
    pub max_bytes: u64,
    /// The spool's free-space floor, bytes, and the directory whose file system it is on.
    pub min_free_bytes: u64,
    pub spool_root: PathBuf,
}

/// An instance being received: a memory buffer and, for an instance larger than
/// [`WRITE_CHUNK`], a temp file holding what the buffer could not.
#[derive(Debug)]
pub struct Incoming {
    pub(super) header: InstanceHeader,
    pub(super) tmp_path: PathBuf,
    /// Where the data set starts in the file (after preamble and file meta group).
    pub(super) data_set_offset: u64,
    file: Option<File>,
    /// Some bytes went to the temp file already: `pending` holds only the rest.
    spilled: bool,
    /// Not written yet: the whole file (preamble, meta group, data set) until it spills.
    pending: Vec<u8>,
    /// Data set bytes received so far.
    received: u64,
    limits: std::sync::Arc<ReceiveLimits>,
    /// First failure; reported (A700) once the whole data set has been drained.
    failed: Option<StoreError>,
}

impl Incoming {
    pub(super) fn new(
        header: InstanceHeader,
        tmp_path: PathBuf,
        head: Vec<u8>,
        limits: std::sync::Arc<ReceiveLimits>,
    ) -> Incoming {
        Incoming {
            header,
            tmp_path,
            data_set_offset: head.len() as u64,
            file: None,
            spilled: false,
            pending: head,
            received: 0,
            limits,
            failed: None,
        }
    }

    pub fn header(&self) -> &InstanceHeader {
        &self.header
    }

    /// Appends a data set fragment. Fragments are buffered and written in large chunks
    /// off the async runtime. Past the size limit, or when a chunk would leave the spool
    /// below its free-space floor, what was received is dropped (memory and temp file)
    /// and the rest of the data set is only counted.
    pub async fn push(&mut self, data: &[u8]) {
        self.received = self.received.saturating_add(data.len() as u64);
        if self.failed.is_some() {
            return;
        }
        if self.received > self.limits.max_bytes {
            self.fail(StoreError::TooLarge {
                limit_mb: self.limits.max_bytes >> 20,
            });
            return;
        }
        self.pending.extend_from_slice(data);
        if self.pending.len() < WRITE_CHUNK {
            return;
        }
        let file = self.file.take();
        let path = self.tmp_path.clone();
        let chunk = std::mem::take(&mut self.pending);
        let limits = self.limits.clone();
        let res = crate::dicom::scp::run_blocking(move || {
            let r = check_room(&limits, chunk.len() as u64).and_then(|()| {
                match file {
                    Some(f) => Ok(f),
                    None => File::create(&path),
                }
                .and_then(|mut f| f.write_all(&chunk).map(|()| f))
                .map_err(|e| {
                    StoreError::OutOfResources(anyhow!("cannot write {}: {e}", path.display()))
                })
            });
            (r, chunk)
        })
        .await;
        self.spilled = true;
        match res {
            Ok((r, mut chunk)) => {
                // The allocation serves the next chunk.
                chunk.clear();
                self.pending = chunk;
                match r {
                    Ok(f) => self.file = Some(f),
                    Err(e) => self.fail(e),
                }
            }
            Err(e) => self.fail(StoreError::OutOfResources(anyhow!(
                "write task failed: {e}"
            ))),
        }
    }

    /// Records the first failure and lets go of what was received: nothing of this
    /// instance will be acknowledged, so nothing of it needs to be kept.
    fn fail(&mut self, e: StoreError) {
        self.pending = Vec::new();
        self.file = None;
        let _ = fs::remove_file(&self.tmp_path);
        self.spilled = true;
        self.failed.get_or_insert(e);
    }

    /// Steps 1-2 of the write protocol: the last bytes written out, every declared
    /// length checked against the bytes received, the data set parsed back, its UIDs
    /// compared with the command's. Nothing is made durable here.
    pub(super) fn prepare(&mut self) -> Result<(InstanceInfo, Option<OffsetDateTime>), StoreError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let in_memory = !self.spilled;
        if !in_memory {
            self.write_out()
                .map_err(|e| StoreError::OutOfResources(e.context("cannot write temp file")))?;
        }
        let h = &self.header;
        // Before dicom-object sees the data set: every declared length must fit in the
        // bytes received (see `lengths`), else the parse-back would allocate what a peer
        // claims (2 GiB, minutes of CPU) instead of failing.
        let cannot = |e: anyhow::Error| StoreError::CannotUnderstand(format!("{e:#}"));
        let (data_set_len, source) = if in_memory {
            let data_set = &self.pending[self.data_set_offset as usize..];
            let len = lengths::check_slice(data_set, &h.transfer_syntax_uid).map_err(cannot)?;
            (len, InstanceSource::Bytes(&self.pending))
        } else {
            let len =
                lengths::check_file(&self.tmp_path, self.data_set_offset, &h.transfer_syntax_uid)
                    .map_err(cannot)?;
            (len, InstanceSource::File(&self.tmp_path))
        };
        let (info, received_at) =
            read_instance_from(source, data_set_len <= FULL_PARSE_LIMIT).map_err(cannot)?;
        if info.sop_instance_uid != h.sop_instance_uid {
            return Err(StoreError::Mismatch(format!(
                "SOP Instance UID in the data set is {:?}, the command says {:?}",
                info.sop_instance_uid, h.sop_instance_uid
            )));
        }
        if info.sop_class_uid != h.sop_class_uid {
            return Err(StoreError::Mismatch(format!(
                "SOP Class UID in the data set is {:?}, the command says {:?}",
                info.sop_class_uid, h.sop_class_uid
            )));
        }
        for (name, v) in [
            ("Study Instance UID", &info.study_instance_uid),
            ("Series Instance UID", &info.series_instance_uid),
        ] {
            if v.is_empty() {
                return Err(StoreError::Mismatch(format!("{name} is missing")));
            }
        }
        Ok((info, received_at))
    }

    /// The received data set (without our file meta group), wherever it is now.
    pub(super) fn data_set(&self) -> DataSetBytes<'_> {
        if self.spilled {
            DataSetBytes::File {
                path: &self.tmp_path,
                offset: self.data_set_offset,
            }
        } else {
            DataSetBytes::Memory(&self.pending[self.data_set_offset as usize..])
        }
    }

    /// What [`super::Spool::commit`] does to a received data set before anything is made
    /// durable (flush, declared lengths, parse-back, UID checks), without the fsync and
    /// link; the temp file stays until [`Incoming::discard`]. For the cargo-fuzz target
    /// `fuzz/fuzz_targets/store_data_set.rs`; the SCP always calls [`super::Spool::commit`].
    #[doc(hidden)]
    pub fn check_received(&mut self) -> Result<(), StoreError> {
        self.prepare().map(|_| ())
    }

    /// Writes what is still in memory to the temp file (creating it if the instance
    /// never spilled) and returns the file. Idempotent.
    pub(super) fn write_out(&mut self) -> Result<&File> {
        if self.file.is_none() {
            if self.spilled {
                bail!("temp file lost after a failed write");
            }
            let f = File::create(&self.tmp_path)
                .with_context(|| format!("cannot create {}", self.tmp_path.display()))?;
            self.file = Some(f);
            self.spilled = true;
        }
        let file = self.file.as_mut().expect("just created");
        file.write_all(&self.pending)
            .with_context(|| format!("cannot write {}", self.tmp_path.display()))?;
        self.pending = Vec::new();
        Ok(file)
    }

    pub(super) fn tmp_path(&self) -> &Path {
        &self.tmp_path
    }

    /// Drops a partial receive (association aborted mid-instance).
    pub fn discard(self) {
        let _ = fs::remove_file(&self.tmp_path);
    }
}

/// `Err` when writing `bytes` more would leave the spool below its free-space floor
/// (`bytes` = 0: when it is below already).
pub(super) fn check_room(limits: &ReceiveLimits, bytes: u64) -> Result<(), StoreError> {
    let free =
        crate::durable::free_space(&limits.spool_root).map_err(StoreError::OutOfResources)?;
    if free < limits.min_free_bytes.saturating_add(bytes) {
        return Err(StoreError::ShortOfSpace {
            free_mb: free >> 20,
            floor_mb: limits.min_free_bytes >> 20,
        });
    }
    Ok(())
}
