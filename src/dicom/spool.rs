//! The durable spool: every instance we acknowledge is on disk first.
//!
//! Layout: `<spool>/<study uid>/<series uid>/<sop instance uid>.dcm` (Part 10 files; a
//! component that is not a clean UID is replaced by a hash), `<spool>/.tmp/` for
//! instances being received, `<spool>/.rejected/` for files the re-index could not read.
//!
//! Write protocol (what makes "Success" true after a crash or power loss):
//! 1. the data set is kept, exactly as received, behind our file meta group: in memory
//!    up to [`WRITE_CHUNK`] bytes, streamed into a temp file in `.tmp/` (same file system
//!    as the final place) beyond that;
//! 2. the declared length of every element, sequence and item is checked against the
//!    bytes received ([`super::lengths`]: a lying length must not make the parse-back
//!    allocate gigabytes), then the data set is parsed back (from memory when it is
//!    there): an unreadable or mismatching data set is refused before anything more is
//!    written;
//! 3. the temp file is written (one write when it was held in memory), `fsync(file)`;
//!    missing directories are created and their parents fsynced;
//! 4. `link(temp, final)` (atomic, never overwrites: a second copy of the same SOP Instance
//!    UID is a no-op), `fsync(final directory)`, then the temp name is removed;
//! 5. only then does the SCP answer C-STORE Success.
//!
//! The calling AE and the receive time travel inside the file: Source Application Entity
//! Title (0002,0016) and Private Information (0002,0102) of the file meta group, so a
//! restart can rebuild every [`StoredInstance`] from the files alone ([`reindex`]).
//!
//! Analysed series stay: once a result of a series is committed to the outbox, the daemon
//! writes the series' *analysed mark* (`<series dir>/.analysed.json`: the SOP Instance
//! UIDs analysed, written to a temp file, fsynced, renamed, directory fsynced:
//! [`mark_analysed`]) and keeps its instances, so that late instances can be analysed
//! together with the earlier ones. The assembler releases them ([`release`]) when it
//! forgets the study (`series.completed_retention_secs`). After a restart [`recover`]
//! tells the instances covered by a mark (analysed: remembered, not analysed again) from
//! the others (to assemble: new series, and instances that arrived after the mark).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{FileMetaTable, OpenFileOptions};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::lengths;
use super::syntax::{is_valid_uid, trim_uid};
use super::StoredInstance;

/// Creator UID of our private file meta information (a UUID-derived `2.25` UID, which
/// needs no registered root).
pub const PRIVATE_INFORMATION_CREATOR_UID: &str = "2.25.163204738215046281437019583215410296871";
const RECEIVED_AT_PREFIX: &str = "received_at=";
const TMP_DIR: &str = ".tmp";
const REJECTED_DIR: &str = ".rejected";
/// The analysed mark of a series, in its directory.
pub const MARK_FILE: &str = ".analysed.json";
const MARK_TMP: &str = ".analysed.json.tmp";
/// Data sets up to this size (inflated, for the deflated syntax) are parsed completely
/// before acceptance; larger ones (multi-frame) are parsed up to the pixel data only,
/// which the length check has walked (truncated pixel data is refused either way).
const FULL_PARSE_LIMIT: u64 = 64 << 20;
/// Received bytes are held in memory up to this size; a larger instance is streamed to
/// its temp file in chunks of this size. An instance that fits (every CT slice) is
/// checked and parsed from memory and written with one call, after the checks: no
/// read-back, no small writes. (Writing each fragment as it arrives, to overlap the
/// page-cache copy with the network, measured slower on a loaded 2-core box.)
const WRITE_CHUNK: usize = 4 << 20;
/// First allocation of an instance's buffer: a 512x512 16-bit slice and its header fit,
/// so the usual instance is received without reallocating (and copying) its buffer.
const INITIAL_BUFFER: usize = 640 << 10;

/// Why an instance was not stored; each maps to one C-STORE status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data set cannot be parsed (C000).
    #[error("cannot understand the data set: {0}")]
    CannotUnderstand(String),
    /// The data set does not match the command (A900).
    #[error("data set does not match the request: {0}")]
    Mismatch(String),
    /// Disk full, I/O error, below the free-space floor (A700).
    #[error("out of resources: {0:#}")]
    OutOfResources(anyhow::Error),
}

/// What the SCP knows about an instance before its data set arrives.
#[derive(Debug, Clone)]
pub struct InstanceHeader {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub calling_ae: String,
    pub received_at: OffsetDateTime,
}

/// Result of a successful store.
#[derive(Debug)]
pub enum Stored {
    New(StoredInstance),
    /// This SOP Instance UID was already in the spool; nothing was written.
    Duplicate(StoredInstance),
}

/// The spool directory and its policy.
#[derive(Debug)]
pub struct Spool {
    root: PathBuf,
    tmp: PathBuf,
    our_ae: String,
    min_free_bytes: u64,
    /// Study and series directories whose entry in their parent this process has fsynced
    /// ([`Spool::make_dir_durable`]).
    durable_dirs: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
}

/// [`Spool::durable_dirs`] is cleared past this many entries (series directories are
/// released over time; a cleared one costs one more fsync when used again).
const DURABLE_DIRS_MAX: usize = 10_000;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Spool {
    /// Opens (creating if needed) the spool at `root`. Leftovers of interrupted receives
    /// in `.tmp/` are removed: they were never acknowledged.
    pub fn open(root: &Path, our_ae: &str, min_free_mb: u64) -> Result<Spool> {
        create_dir_all_durably(root)
            .with_context(|| format!("cannot create spool directory {}", root.display()))?;
        let tmp = root.join(TMP_DIR);
        if tmp.exists() {
            for entry in
                fs::read_dir(&tmp).with_context(|| format!("cannot list {}", tmp.display()))?
            {
                let path = entry?.path();
                log::info!("removing unfinished receive {}", path.display());
                fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        } else {
            fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            fsync_dir(root)?;
        }
        // Fail now, not at the first C-STORE, if the spool is not writable.
        let probe = tmp.join("write-probe");
        File::create(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .with_context(|| format!("spool directory {} is not writable", root.display()))?;
        Ok(Spool {
            root: root.to_path_buf(),
            tmp,
            our_ae: our_ae.to_string(),
            min_free_bytes: min_free_mb.saturating_mul(1024 * 1024),
            durable_dirs: Default::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `Err` (with the numbers) when free space is below the configured floor.
    pub fn check_free_space(&self) -> Result<()> {
        let free = free_space(&self.root)?;
        if free < self.min_free_bytes {
            return Err(anyhow!(
                "spool {} has {} MB free, below dicom.min_free_space_mb = {} MB",
                self.root.display(),
                free / (1024 * 1024),
                self.min_free_bytes / (1024 * 1024)
            ));
        }
        Ok(())
    }

    /// Starts receiving an instance: encodes the file meta group. The temp file is
    /// created only when the instance outgrows memory ([`WRITE_CHUNK`]) or is committed.
    pub fn begin(&self, header: InstanceHeader) -> Result<Incoming> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{}-{}.part", std::process::id(), n));
        let meta = file_meta(&header, &self.our_ae)?;
        let mut head = Vec::with_capacity(INITIAL_BUFFER);
        head.resize(128, 0);
        head.extend_from_slice(b"DICM");
        meta.write(&mut head)
            .map_err(|e| anyhow!("cannot encode file meta group: {e}"))?;
        Ok(Incoming {
            header,
            tmp_path: path,
            data_set_offset: head.len() as u64,
            file: None,
            spilled: false,
            pending: head,
            failed: None,
        })
    }

    /// Makes a fully received instance durable (see the module docs), or refuses it.
    /// Blocking: call it off the async executor (`block_in_place` / `spawn_blocking`).
    pub fn commit(&self, mut incoming: Incoming) -> Result<Stored, StoreError> {
        let result = self.commit_inner(&mut incoming);
        // Whatever happened, the temp name goes: on success the data lives under its
        // final name (hard link), on failure it was never acknowledged.
        let _ = fs::remove_file(&incoming.tmp_path);
        result
    }

    fn commit_inner(&self, incoming: &mut Incoming) -> Result<Stored, StoreError> {
        let (info, received_at) = incoming.prepare()?;
        let h = &incoming.header;

        let series_dir = self
            .root
            .join(safe_name(&info.study_instance_uid))
            .join(safe_name(&info.series_instance_uid));
        let final_path = series_dir.join(format!("{}.dcm", safe_name(&info.sop_instance_uid)));
        let stored = StoredInstance {
            path: final_path.clone(),
            study_instance_uid: info.study_instance_uid,
            series_instance_uid: info.series_instance_uid,
            sop_instance_uid: info.sop_instance_uid,
            sop_class_uid: info.sop_class_uid,
            calling_ae: h.calling_ae.clone(),
            received_at: received_at.unwrap_or(h.received_at),
        };
        let io = |what: &str, p: &Path, e: io::Error| {
            StoreError::OutOfResources(anyhow!("{what} {}: {e}", p.display()))
        };
        let dir_error = |e: anyhow::Error| {
            StoreError::OutOfResources(e.context("cannot make the series directory durable"))
        };
        // Already here: its data was fdatasynced before it was linked, but its name may not
        // be durable yet (an earlier attempt answered A700 after the link, or a run was
        // killed before its directory fsync): Success only once it is.
        let duplicate = |stored: StoredInstance| -> Result<Stored, StoreError> {
            self.make_dir_durable(&series_dir).map_err(dir_error)?;
            fsync_dir(&series_dir).map_err(StoreError::OutOfResources)?;
            Ok(Stored::Duplicate(stored))
        };
        if final_path.exists() {
            return duplicate(stored);
        }

        // fdatasync: the data and what is needed to read it back (size, extents); the
        // name is made durable by the directory fsync below.
        let tmp_path = incoming.tmp_path.clone();
        incoming
            .write_out()
            .map_err(|e| StoreError::OutOfResources(e.context("cannot write temp file")))?
            .sync_data()
            .map_err(|e| io("cannot fsync", &tmp_path, e))?;
        self.make_dir_durable(&series_dir).map_err(dir_error)?;
        match fs::hard_link(&incoming.tmp_path, &final_path) {
            Ok(()) => {}
            // Another association stored the same instance in the meantime.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return duplicate(stored),
            Err(e) => return Err(io("cannot link into place", &final_path, e)),
        }
        fsync_dir(&series_dir).map_err(StoreError::OutOfResources)?;
        Ok(Stored::New(stored))
    }

    /// Makes `dir` (below the root) and its parents up to the root exist durably: each is
    /// created if missing and its parent fsynced, once per directory per process, also
    /// when it was already there: another association may have created it and not yet
    /// fsynced its parent, or an earlier run may have died before it did.
    fn make_dir_durable(&self, dir: &Path) -> Result<()> {
        if self
            .durable_dirs
            .lock()
            .expect("not poisoned")
            .contains(dir)
        {
            return Ok(());
        }
        let parent = dir.parent().context("directory without parent")?;
        if parent != self.root && parent.starts_with(&self.root) {
            self.make_dir_durable(parent)?;
        }
        create_dir_in(dir, parent, &mut |d: &Path| fsync_dir(d))?;
        let mut known = self.durable_dirs.lock().expect("not poisoned");
        if known.len() >= DURABLE_DIRS_MAX {
            known.clear();
        }
        known.insert(dir.to_path_buf());
        Ok(())
    }

    /// Deletes a series from the spool (call once its result is durable downstream).
    /// Returns how many instance files were removed.
    pub fn delete_series(&self, study_uid: &str, series_uid: &str) -> Result<usize> {
        delete_series(&self.root, study_uid, series_uid)
    }
}

/// An instance being received: a memory buffer and, for an instance larger than
/// [`WRITE_CHUNK`], a temp file holding what the buffer could not.
#[derive(Debug)]
pub struct Incoming {
    header: InstanceHeader,
    tmp_path: PathBuf,
    /// Where the data set starts in the file (after preamble and file meta group).
    data_set_offset: u64,
    file: Option<File>,
    /// Some bytes went to the temp file already: `pending` holds only the rest.
    spilled: bool,
    /// Not written yet: the whole file (preamble, meta group, data set) until it spills.
    pending: Vec<u8>,
    /// First write error; reported as A700 once the whole data set has been drained.
    failed: Option<anyhow::Error>,
}

impl Incoming {
    pub fn header(&self) -> &InstanceHeader {
        &self.header
    }

    /// Appends a data set fragment. Fragments are buffered and written in large chunks
    /// off the async runtime.
    pub async fn push(&mut self, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        self.pending.extend_from_slice(data);
        if self.pending.len() >= WRITE_CHUNK {
            let file = self.file.take();
            let path = self.tmp_path.clone();
            let chunk = std::mem::take(&mut self.pending);
            let res = super::scp::run_blocking(move || {
                let r = match file {
                    Some(f) => Ok(f),
                    None => File::create(&path),
                }
                .and_then(|mut f| f.write_all(&chunk).map(|()| f));
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
                        Err(e) => {
                            self.failed =
                                Some(anyhow!("cannot write {}: {e}", self.tmp_path.display()))
                        }
                    }
                }
                Err(e) => self.failed = Some(anyhow!("write task failed: {e}")),
            }
        }
    }

    /// Steps 1-2 of the write protocol: the last bytes written out, every declared
    /// length checked against the bytes received, the data set parsed back, its UIDs
    /// compared with the command's. Nothing is made durable here.
    fn prepare(&mut self) -> Result<(InstanceInfo, Option<OffsetDateTime>), StoreError> {
        if let Some(e) = self.failed.take() {
            return Err(StoreError::OutOfResources(e));
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

    /// What [`Spool::commit`] does to a received data set before anything is made
    /// durable (flush, declared lengths, parse-back, UID checks), without the fsync and
    /// link; the temp file stays until [`Incoming::discard`]. For the cargo-fuzz target
    /// `fuzz/fuzz_targets/store_data_set.rs`; the SCP always calls [`Spool::commit`].
    #[doc(hidden)]
    pub fn check_received(&mut self) -> Result<(), StoreError> {
        self.prepare().map(|_| ())
    }

    /// Writes what is still in memory to the temp file (creating it if the instance
    /// never spilled) and returns the file. Idempotent.
    fn write_out(&mut self) -> Result<&File> {
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

    /// Drops a partial receive (association aborted mid-instance).
    pub fn discard(self) {
        let _ = fs::remove_file(&self.tmp_path);
    }
}

fn file_meta(h: &InstanceHeader, our_ae: &str) -> Result<FileMetaTable> {
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

struct InstanceInfo {
    study_instance_uid: String,
    series_instance_uid: String,
    sop_instance_uid: String,
    sop_class_uid: String,
    calling_ae: String,
    /// Of the file meta group: how the data set is encoded, and where it starts.
    transfer_syntax_uid: String,
    data_set_offset: u64,
}

/// Where a Part 10 file (preamble, meta group, data set) is read from.
enum InstanceSource<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

/// Parses a spool file: identifying UIDs, calling AE, receive time (if recorded).
fn read_instance(path: &Path, full: bool) -> Result<(InstanceInfo, Option<OffsetDateTime>)> {
    read_instance_from(InstanceSource::File(path), full)
}

/// [`read_instance`] of a file, or of its bytes in memory.
fn read_instance_from(
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
fn recheck_instance(path: &Path) -> Result<(InstanceInfo, Option<OffsetDateTime>)> {
    let (info, received_at) = read_instance(path, false)?;
    lengths::check_file(path, info.data_set_offset, &info.transfer_syntax_uid)?;
    Ok((info, received_at))
}

/// Moves a spool file that failed its re-check to `.rejected/`, under a name not taken
/// there yet: rejected files are kept for a human, never overwritten.
fn quarantine(root: &Path, path: &Path) -> Result<PathBuf> {
    let rejected = root.join(REJECTED_DIR);
    fs::create_dir_all(&rejected)
        .with_context(|| format!("cannot create {}", rejected.display()))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut dest = rejected.join(&*name);
    let mut n = 1;
    while dest.exists() {
        dest = rejected.join(format!("{name}.{n}"));
        n += 1;
    }
    fs::rename(path, &dest)
        .with_context(|| format!("cannot move {} to {}", path.display(), dest.display()))?;
    fsync_dir(&rejected)?;
    if let Some(parent) = path.parent() {
        fsync_dir(parent)?;
    }
    Ok(dest)
}

/// Bytes an unprivileged writer can still use on the file system of `dir`.
pub fn free_space(dir: &Path) -> Result<u64> {
    let st =
        nix::sys::statvfs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// File-system-safe name for a UID: the UID itself when it is a clean UID, else a hash.
pub fn safe_name(uid: &str) -> String {
    if is_valid_uid(uid) {
        uid.to_string()
    } else {
        let digest = Sha256::digest(uid.as_bytes());
        format!("x{}", &hex::encode(digest)[..40])
    }
}

/// Recovers every finished instance in the spool, oldest first. Leftover temp files
/// are removed (never acknowledged). Every instance file is re-checked (parsed, and its
/// declared lengths checked against its size: [`recheck_instance`]); one that fails is
/// logged as an error and moved to `.rejected/` (kept for a human under a unique name,
/// not fed to the pipeline). Safe after `kill -9`.
pub fn reindex(root: &Path) -> Result<Vec<StoredInstance>> {
    let tmp = root.join(TMP_DIR);
    if tmp.is_dir() {
        for entry in fs::read_dir(&tmp)? {
            let path = entry?.path();
            log::info!("removing unfinished receive {}", path.display());
            let _ = fs::remove_file(&path);
        }
    }
    let mut out = Vec::new();
    if !root.is_dir() {
        return Ok(out);
    }
    for study in sorted_dirs(root)? {
        for series in sorted_dirs(&study)? {
            for entry in fs::read_dir(&series)
                .with_context(|| format!("cannot list {}", series.display()))?
            {
                let path = entry?.path();
                if path.extension().and_then(|e| e.to_str()) != Some("dcm") {
                    continue;
                }
                match recheck_instance(&path) {
                    Ok((info, received_at)) => {
                        let received_at = received_at
                            .or_else(|| {
                                fs::metadata(&path)
                                    .and_then(|m| m.modified())
                                    .ok()
                                    .map(OffsetDateTime::from)
                            })
                            .unwrap_or_else(OffsetDateTime::now_utc);
                        out.push(StoredInstance {
                            path,
                            study_instance_uid: info.study_instance_uid,
                            series_instance_uid: info.series_instance_uid,
                            sop_instance_uid: info.sop_instance_uid,
                            sop_class_uid: info.sop_class_uid,
                            calling_ae: info.calling_ae,
                            received_at,
                        })
                    }
                    Err(e) => {
                        let dest = quarantine(root, &path)?;
                        log::error!(
                            "spool file {} failed its re-check at start-up ({e:#}): moved to \
                             {}, kept for a human; it is not analysed",
                            path.display(),
                            dest.display()
                        );
                    }
                }
            }
        }
    }
    out.sort_by_key(|i| i.received_at);
    Ok(out)
}

/// The durable "analysed" mark of a series (`<series dir>/.analysed.json`): the instances
/// of the series that a result committed to the outbox has analysed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysedMark {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    /// When the (last) result was committed.
    #[serde(with = "time::serde::rfc3339")]
    pub analysed_at: OffsetDateTime,
    /// Id of the last result committed for the series.
    pub result_id: String,
    /// Every SOP Instance UID analysed by a committed result of the series (the union over
    /// its results), sorted, without repeats.
    pub sop_instance_uids: Vec<String>,
}

impl AnalysedMark {
    pub fn covers(&self, sop_instance_uid: &str) -> bool {
        self.sop_instance_uids
            .binary_search_by(|s| s.as_str().cmp(sop_instance_uid))
            .is_ok()
    }
}

fn series_dir(root: &Path, study_uid: &str, series_uid: &str) -> PathBuf {
    root.join(safe_name(study_uid)).join(safe_name(series_uid))
}

/// Reads the analysed mark in `series_dir`; `None` when there is none or it is unreadable
/// (logged: the series is then analysed again, which is the safe side).
pub fn read_mark(series_dir: &Path) -> Option<AnalysedMark> {
    let path = series_dir.join(MARK_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!(
                "cannot read {}: {e}; the series is analysed again",
                path.display()
            );
            return None;
        }
    };
    match serde_json::from_slice::<AnalysedMark>(&bytes) {
        Ok(mut mark) => {
            // Sorted for `covers`, whoever wrote it.
            mark.sop_instance_uids.sort_unstable();
            mark.sop_instance_uids.dedup();
            Some(mark)
        }
        Err(e) => {
            log::warn!(
                "{} is not a valid analysed mark ({e}); the series is analysed again",
                path.display()
            );
            None
        }
    }
}

/// Records durably that a result analysing `sop_instance_uids` of a series is committed:
/// the series' mark becomes the union of its previous instances and these (temp file,
/// fsync, rename, directory fsync). Returns how many instances the mark names, or `None`
/// when the series is not in the spool (nothing to keep).
pub fn mark_analysed(
    root: &Path,
    study_uid: &str,
    series_uid: &str,
    result_id: &str,
    sop_instance_uids: &[String],
    analysed_at: OffsetDateTime,
) -> Result<Option<usize>> {
    let dir = series_dir(root, study_uid, series_uid);
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut sops: Vec<String> = read_mark(&dir)
        .map(|m| m.sop_instance_uids)
        .unwrap_or_default();
    sops.extend(sop_instance_uids.iter().cloned());
    sops.sort_unstable();
    sops.dedup();
    let mark = AnalysedMark {
        study_instance_uid: study_uid.to_string(),
        series_instance_uid: series_uid.to_string(),
        analysed_at,
        result_id: result_id.to_string(),
        sop_instance_uids: sops,
    };
    let tmp = dir.join(MARK_TMP);
    let json = serde_json::to_vec(&mark).context("cannot encode the analysed mark")?;
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()
    };
    write().with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, dir.join(MARK_FILE))
        .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    fsync_dir(&dir)?;
    Ok(Some(mark.sop_instance_uids.len()))
}

/// Removes instance files of one series (`paths`, which must lie in the series
/// directory; missing ones are fine). With `forget`, or once no instance is left, the
/// series' analysed mark goes too, after the files (a crash in between leaves a mark that
/// covers what is left: remembered as analysed, not analysed again), and an empty series
/// (and study) directory is removed. Returns how many files were removed.
pub fn release(
    root: &Path,
    study_uid: &str,
    series_uid: &str,
    paths: &[PathBuf],
    forget: bool,
) -> Result<usize> {
    let dir = series_dir(root, study_uid, series_uid);
    let mut n = 0;
    for path in paths {
        if path.parent() != Some(dir.as_path()) {
            log::warn!(
                "not removing {}: not in the spool directory of series {series_uid}",
                path.display()
            );
            continue;
        }
        match fs::remove_file(path) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow!("cannot remove {}: {e}", path.display())),
        }
    }
    if !dir.is_dir() {
        return Ok(n);
    }
    if n > 0 {
        fsync_dir(&dir)?;
    }
    let instances_left = fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .any(|e| e.path().extension().and_then(|x| x.to_str()) == Some("dcm"));
    if forget || !instances_left {
        for name in [MARK_FILE, MARK_TMP] {
            match fs::remove_file(dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow!("cannot remove {}: {e}", dir.join(name).display())),
            }
        }
    }
    if !instances_left {
        remove_empty_series_dir(root, &dir)?;
    } else {
        fsync_dir(&dir)?;
    }
    Ok(n)
}

/// Removes an empty series directory, and its study directory once empty too.
fn remove_empty_series_dir(root: &Path, dir: &Path) -> Result<()> {
    match fs::remove_dir(dir) {
        Ok(()) => {}
        // Something arrived meanwhile: it stays, and so does the directory.
        Err(_)
            if fs::read_dir(dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false) =>
        {
            return fsync_dir(dir)
        }
        Err(e) => return Err(anyhow!("cannot remove {}: {e}", dir.display())),
    }
    let study_dir = dir.parent().context("series directory without parent")?;
    // Another series of the study may still be arriving: only remove an empty study dir.
    if fs::remove_dir(study_dir).is_ok() {
        fsync_dir(root)
    } else {
        fsync_dir(study_dir)
    }
}

/// A series whose instances in the spool are all analysed (see [`recover`]).
#[derive(Debug, Clone)]
pub struct AnalysedSeries {
    pub mark: AnalysedMark,
    /// Its instances in the spool, all covered by the mark.
    pub instances: Vec<StoredInstance>,
}

/// What a restart finds in the spool.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Instances to assemble, oldest first: those of series without a mark, and those that
    /// arrived after their series' mark (the series is then analysed again, whole).
    pub instances: Vec<StoredInstance>,
    /// Instances covered by their series' analysed mark, by series: already analysed,
    /// their results are in the outbox (or delivered). Kept, not analysed again.
    pub analysed: Vec<AnalysedSeries>,
}

/// [`reindex`], then sorts the instances by their series' analysed marks (see
/// [`Recovered`]). A mark left without any instance (a crash during a release) is removed.
pub fn recover(root: &Path) -> Result<Recovered> {
    let all = reindex(root)?;
    let mut marks: std::collections::BTreeMap<PathBuf, Option<AnalysedSeries>> = Default::default();
    let mut out = Recovered::default();
    for instance in all {
        let dir = instance
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let entry = marks.entry(dir.clone()).or_insert_with(|| {
            read_mark(&dir).map(|mark| AnalysedSeries {
                mark,
                instances: Vec::new(),
            })
        });
        match entry {
            Some(series) if series.mark.covers(&instance.sop_instance_uid) => {
                series.instances.push(instance)
            }
            _ => out.instances.push(instance),
        }
    }
    out.analysed = marks
        .into_values()
        .flatten()
        .filter(|s| !s.instances.is_empty())
        .collect();
    // Marks of series without any instance left.
    if root.is_dir() {
        for study in sorted_dirs(root)? {
            for series in sorted_dirs(&study)? {
                if series.join(MARK_FILE).exists() && !has_instances(&series)? {
                    log::info!(
                        "removing the analysed mark of released series {}",
                        series.display()
                    );
                    for name in [MARK_FILE, MARK_TMP] {
                        let _ = fs::remove_file(series.join(name));
                    }
                    remove_empty_series_dir(root, &series)?;
                }
            }
        }
    }
    Ok(out)
}

/// A crash between committing a result to the outbox and writing its series' analysed
/// mark leaves the series unmarked although its result waits in the outbox: recovered as
/// is, the series would be analysed again and its id published a second time, with other
/// `timings`. This marks each series of `recovered.instances` for which `committed_id`
/// (given the series and the SOP Instance UIDs the spool holds of it, marked ones
/// included) names a committed result, and moves its instances to `analysed`. Call it
/// before the outbox publishes anything, so that a waiting entry is still there to find.
pub fn mark_committed(
    root: &Path,
    mut recovered: Recovered,
    committed_id: impl Fn(&str, &[String]) -> Option<String>,
) -> Result<Recovered> {
    let key = |study: &str, series: &str| (study.to_owned(), series.to_owned());
    let mut unmarked: std::collections::BTreeMap<(String, String), Vec<StoredInstance>> =
        Default::default();
    for i in std::mem::take(&mut recovered.instances) {
        unmarked
            .entry(key(&i.study_instance_uid, &i.series_instance_uid))
            .or_default()
            .push(i);
    }
    let mut keep = Vec::new();
    for ((study, series), instances) in unmarked {
        let earlier = recovered.analysed.iter().position(|a| {
            a.mark.study_instance_uid == study && a.mark.series_instance_uid == series
        });
        let mut sops: Vec<String> = instances
            .iter()
            .map(|i| i.sop_instance_uid.clone())
            .collect();
        if let Some(a) = earlier {
            sops.extend(recovered.analysed[a].mark.sop_instance_uids.iter().cloned());
        }
        sops.sort_unstable();
        sops.dedup();
        let Some(id) = committed_id(&series, &sops) else {
            keep.push(instances);
            continue;
        };
        let now = OffsetDateTime::now_utc();
        mark_analysed(root, &study, &series, &id, &sops, now)?;
        log::info!(
            "series {series} of study {study}: result {id} waits in the outbox but the series \
             was not marked analysed (a crash in between): marked now, not analysed again"
        );
        let mark = AnalysedMark {
            study_instance_uid: study,
            series_instance_uid: series,
            analysed_at: now,
            result_id: id,
            sop_instance_uids: sops,
        };
        match earlier {
            Some(a) => {
                recovered.analysed[a].mark = mark;
                recovered.analysed[a].instances.extend(instances);
            }
            None => recovered.analysed.push(AnalysedSeries { mark, instances }),
        }
    }
    // Oldest first again, as `recover` orders them.
    recovered.instances = keep.into_iter().flatten().collect();
    recovered.instances.sort_by_key(|i| i.received_at);
    Ok(recovered)
}

fn has_instances(dir: &Path) -> Result<bool> {
    Ok(fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .any(|e| e.path().extension().and_then(|x| x.to_str()) == Some("dcm")))
}

/// Deletes one series directory from the spool at `root` (and its study directory
/// once empty). Returns how many instance files were removed.
pub fn delete_series(root: &Path, study_uid: &str, series_uid: &str) -> Result<usize> {
    let study_dir = root.join(safe_name(study_uid));
    let series_dir = study_dir.join(safe_name(series_uid));
    if !series_dir.exists() {
        return Ok(0);
    }
    let mut n = 0;
    for entry in fs::read_dir(&series_dir)
        .with_context(|| format!("cannot list {}", series_dir.display()))?
    {
        let path = entry?.path();
        fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        n += 1;
    }
    fs::remove_dir(&series_dir)
        .with_context(|| format!("cannot remove {}", series_dir.display()))?;
    // Another series of the study may still be arriving: only remove an empty study dir.
    if fs::remove_dir(&study_dir).is_ok() {
        fsync_dir(root)?;
    } else {
        fsync_dir(&study_dir)?;
    }
    Ok(n)
}

fn sorted_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Creates `dir` and any missing ancestors (like `fs::create_dir_all`) and makes each
/// one's entry in its parent durable: the parent of every directory created here is
/// fsynced, and so is the parent of `dir` when `dir` already existed (an earlier run may
/// have died between its mkdir and that fsync). Without this, everything later made
/// durable *inside* `dir` (spool instances, outbox entries) is lost with `dir` itself at a
/// power cut: `benches/power_cut.py` found it. For the spool root and the outbox directory.
pub fn create_dir_all_durably(dir: &Path) -> Result<()> {
    create_dir_all_syncing(dir, &mut |d: &Path| fsync_dir(d))
}

fn create_dir_all_syncing(dir: &Path, sync_dir: &mut dyn FnMut(&Path) -> Result<()>) -> Result<()> {
    let parent_of = |d: &Path| -> PathBuf {
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    let mut missing = Vec::new();
    let mut p = dir;
    while !p.is_dir() {
        missing.push(p);
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => break,
        }
    }
    if missing.is_empty() {
        return sync_dir(&parent_of(dir));
    }
    for d in missing.into_iter().rev() {
        create_dir_in(d, &parent_of(d), sync_dir)?;
    }
    Ok(())
}

/// Creates `dir` (or finds it already there) and makes its entry in `parent` durable.
fn create_dir_in(
    dir: &Path,
    parent: &Path,
    sync_dir: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => bail!("cannot create {}: {e}", dir.display()),
    }
    sync_dir(parent)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_names() {
        assert_eq!(safe_name("1.2.3"), "1.2.3");
        let bad = safe_name("../../etc/passwd");
        assert!(bad.starts_with('x') && !bad.contains('/') && bad.len() == 41);
        assert_ne!(safe_name("a"), safe_name("b"));
    }

    #[test]
    fn the_spool_root_is_made_durable_in_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("a").join("spool");
        let mut synced = Vec::new();
        create_dir_all_syncing(&root, &mut |d: &Path| {
            synced.push(d.to_path_buf());
            fsync_dir(d)
        })
        .unwrap();
        assert!(root.is_dir());
        // Each new directory's parent, outermost first.
        assert_eq!(synced, vec![dir.path().to_path_buf(), dir.path().join("a")]);
        // Already there (an earlier run may have died before the fsync): its parent again.
        synced.clear();
        create_dir_all_syncing(&root, &mut |d: &Path| {
            synced.push(d.to_path_buf());
            fsync_dir(d)
        })
        .unwrap();
        assert_eq!(synced, vec![dir.path().join("a")]);
        // What the spool and the outbox call.
        create_dir_all_durably(&dir.path().join("b/c")).unwrap();
        assert!(dir.path().join("b/c").is_dir());
    }

    #[test]
    fn free_space_floor() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
        spool.check_free_space().unwrap();
        let spool = Spool::open(dir.path(), "CSPINE", u64::MAX / (1 << 21)).unwrap();
        let err = spool.check_free_space().unwrap_err().to_string();
        assert!(err.contains("min_free_space_mb"), "{err}");
    }

    fn dataset(study: &str, series: &str, sop: &str) -> Vec<u8> {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        use dicom_object::InMemDicomObject;
        use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2"),
            ),
            DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(sop)),
            DataElement::new(
                tags::STUDY_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(study),
            ),
            DataElement::new(
                tags::SERIES_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(series),
            ),
        ]);
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
            .unwrap();
        out
    }

    fn header(sop: &str) -> InstanceHeader {
        InstanceHeader {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: sop.into(),
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            calling_ae: "CTSCANNER".into(),
            received_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
        }
    }

    fn store(spool: &Spool, sop: &str, data: &[u8]) -> Result<Stored, StoreError> {
        let mut incoming = spool.begin(header(sop)).unwrap();
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(incoming.push(data));
        spool.commit(incoming)
    }

    #[test]
    fn a_series_whose_result_is_committed_but_not_marked_is_marked_at_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
        for (series, sop) in [
            ("1.2.3.4", "1.2.3.4.1"),
            ("1.2.3.4", "1.2.3.4.2"),
            ("1.2.3.5", "1.2.3.5.1"),
        ] {
            store(&spool, sop, &dataset("1.2.3", series, sop)).unwrap();
        }
        // Only series 1.2.3.4 has a result waiting in the outbox, for both its instances.
        let recovered = mark_committed(dir.path(), recover(dir.path()).unwrap(), |series, sops| {
            (series == "1.2.3.4" && sops == ["1.2.3.4.1", "1.2.3.4.2"]).then(|| "id-4".to_string())
        })
        .unwrap();
        let left: Vec<&str> = recovered
            .instances
            .iter()
            .map(|i| i.sop_instance_uid.as_str())
            .collect();
        assert_eq!(
            left,
            ["1.2.3.5.1"],
            "the other series is assembled as before"
        );
        assert_eq!(recovered.analysed.len(), 1);
        assert_eq!(recovered.analysed[0].mark.result_id, "id-4");
        assert_eq!(recovered.analysed[0].instances.len(), 2);
        // Durable: the next recovery finds the mark by itself.
        let again = recover(dir.path()).unwrap();
        assert_eq!(again.analysed.len(), 1);
        assert_eq!(
            again.analysed[0].mark.sop_instance_uids,
            ["1.2.3.4.1", "1.2.3.4.2"]
        );
        assert_eq!(again.instances.len(), 1);
    }

    #[test]
    fn directories_left_by_an_earlier_run_are_made_durable_before_success() {
        let dir = tempfile::tempdir().unwrap();
        // What a run killed between its mkdirs and their parents' fsyncs leaves behind.
        fs::create_dir_all(dir.path().join("1.2.3/1.2.3.4")).unwrap();
        let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
        let ds = dataset("1.2.3", "1.2.3.4", "1.2.3.4.5");
        assert!(matches!(
            store(&spool, "1.2.3.4.5", &ds),
            Ok(Stored::New(_))
        ));
        let known = spool.durable_dirs.lock().unwrap().clone();
        assert_eq!(
            known,
            [dir.path().join("1.2.3"), dir.path().join("1.2.3/1.2.3.4")]
                .into_iter()
                .collect(),
            "both existing levels had their parents fsynced"
        );
        // A restart: the same instance again is a duplicate, answered once its directory
        // is durable in this process too.
        drop(spool);
        let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
        assert!(matches!(
            store(&spool, "1.2.3.4.5", &ds),
            Ok(Stored::Duplicate(_))
        ));
        assert_eq!(spool.durable_dirs.lock().unwrap().len(), 2);
    }

    #[test]
    fn commit_reindex_duplicate_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
        let ds = dataset("1.2.3", "1.2.3.4", "1.2.3.4.5");
        let Ok(Stored::New(first)) = store(&spool, "1.2.3.4.5", &ds) else {
            panic!("not stored")
        };
        assert!(first.path.ends_with("1.2.3/1.2.3.4/1.2.3.4.5.dcm"));
        assert!(matches!(
            store(&spool, "1.2.3.4.5", &ds),
            Ok(Stored::Duplicate(_))
        ));
        // Command and data set disagree: refused, nothing left behind.
        assert!(matches!(
            store(&spool, "9.9", &ds),
            Err(StoreError::Mismatch(_))
        ));
        assert!(matches!(
            store(&spool, "1.2.3.4.6", &ds[..ds.len() - 3]),
            Err(StoreError::CannotUnderstand(_))
        ));
        assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);

        let found = reindex(dir.path()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].calling_ae, "CTSCANNER");
        assert_eq!(found[0].received_at, header("x").received_at);
        assert_eq!(found[0].series_instance_uid, "1.2.3.4");

        // An instance larger than the write chunk is streamed to disk in pieces.
        let big = {
            use dicom_core::{DataElement, PrimitiveValue, VR};
            use dicom_object::InMemDicomObject;
            use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;
            let mut obj = InMemDicomObject::read_dataset_with_ts(
                &dataset("1.2.3", "1.2.3.4", "1.2.3.4.7")[..],
                &EXPLICIT_VR_LITTLE_ENDIAN.erased(),
            )
            .unwrap();
            obj.put(DataElement::new(
                tags::PIXEL_DATA,
                VR::OB,
                PrimitiveValue::from(vec![7u8; WRITE_CHUNK + 1000]),
            ));
            let mut out = Vec::new();
            obj.write_dataset_with_ts(&mut out, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
                .unwrap();
            out
        };
        let mut incoming = spool.begin(header("1.2.3.4.7")).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        for piece in big.chunks(65536) {
            rt.block_on(incoming.push(piece));
        }
        let Ok(Stored::New(stored)) = spool.commit(incoming) else {
            panic!("big instance not stored")
        };
        assert!(fs::metadata(&stored.path).unwrap().len() > big.len() as u64);

        assert_eq!(spool.delete_series("1.2.3", "1.2.3.4").unwrap(), 2);
        assert!(!dir.path().join("1.2.3").exists());
        assert!(reindex(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_declared_length_beyond_the_data_is_refused_quickly_and_nothing_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
        let mut ds = dataset("1.2.3", "1.2.3.4", "1.2.3.4.5");
        // Pixel Data, OB, declared 0x7FFFFFFE bytes, 4 present (benches/fuzz_network.py).
        ds.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
        ds.extend_from_slice(&0x7FFF_FFFEu32.to_le_bytes());
        ds.extend_from_slice(b"abcd");
        let t = std::time::Instant::now();
        let Err(StoreError::CannotUnderstand(why)) = store(&spool, "1.2.3.4.5", &ds) else {
            panic!("accepted")
        };
        assert!(t.elapsed().as_secs() < 2, "took {:?}", t.elapsed());
        assert!(
            why.contains("element (7FE0,0010) OB at offset")
                && why.contains("declares 2147483646 bytes, but only 4 follow"),
            "{why}"
        );
        assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);
        assert!(reindex(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn reindex_moves_unreadable_files_aside() {
        let dir = tempfile::tempdir().unwrap();
        let series = dir.path().join("1.2").join("1.2.3");
        fs::create_dir_all(&series).unwrap();
        fs::write(series.join("1.2.3.4.dcm"), b"not dicom").unwrap();
        assert!(reindex(dir.path()).unwrap().is_empty());
        assert!(dir.path().join(REJECTED_DIR).join("1.2.3.4.dcm").is_file());
        // The same name rejected again (another series): both are kept.
        fs::write(series.join("1.2.3.4.dcm"), b"not dicom either").unwrap();
        assert!(reindex(dir.path()).unwrap().is_empty());
        assert_eq!(
            fs::read(dir.path().join(REJECTED_DIR).join("1.2.3.4.dcm.1")).unwrap(),
            b"not dicom either"
        );
    }

    #[test]
    fn reindex_rejects_a_spool_file_cut_short_in_its_pixel_data() {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        use dicom_object::InMemDicomObject;
        use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
        let ts = EXPLICIT_VR_LITTLE_ENDIAN.erased();
        let with_pixels = |sop: &str| {
            let mut obj =
                InMemDicomObject::read_dataset_with_ts(&dataset("1.2.3", "1.2.3.4", sop)[..], &ts)
                    .unwrap();
            obj.put(DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::from(vec![3u8; 4096]),
            ));
            let mut out = Vec::new();
            obj.write_dataset_with_ts(&mut out, &ts).unwrap();
            out
        };
        let stored = |sop: &str| match store(&spool, sop, &with_pixels(sop)) {
            Ok(Stored::New(i)) => i,
            other => panic!("not stored: {other:?}"),
        };
        let (good, cut) = (stored("1.2.3.4.1"), stored("1.2.3.4.2"));
        let len = fs::metadata(&cut.path).unwrap().len();
        File::options()
            .write(true)
            .open(&cut.path)
            .unwrap()
            .set_len(len - 1000)
            .unwrap();
        let found = reindex(dir.path()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, good.path);
        assert!(!cut.path.exists());
        assert!(dir
            .path()
            .join(REJECTED_DIR)
            .join("1.2.3.4.2.dcm")
            .is_file());
    }

    #[test]
    fn open_removes_leftover_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(TMP_DIR)).unwrap();
        fs::write(dir.path().join(TMP_DIR).join("1-1.part"), b"partial").unwrap();
        Spool::open(dir.path(), "CSPINE", 0).unwrap();
        assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn analysed_mark_recover_and_release() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let spool = Spool::open(root, "CSPINE", 0).unwrap();
        let sops = ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"];
        let mut paths = Vec::new();
        for sop in &sops[..2] {
            let Ok(Stored::New(i)) = store(&spool, sop, &dataset("1.2.3", "1.2.3.4", sop)) else {
                panic!("not stored")
            };
            paths.push(i.path);
        }
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_100).unwrap();
        let two: Vec<String> = sops[..2].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            mark_analysed(root, "1.2.3", "1.2.3.4", "id1", &two, at).unwrap(),
            Some(2)
        );
        // No spool directory for it: nothing to mark.
        assert_eq!(
            mark_analysed(root, "1.2.3", "9.9", "id0", &two, at).unwrap(),
            None
        );
        let series_dir = root.join("1.2.3").join("1.2.3.4");
        let mark = read_mark(&series_dir).unwrap();
        assert_eq!(mark.result_id, "id1");
        assert_eq!(mark.analysed_at, at);
        assert!(mark.covers("1.2.3.4.1") && !mark.covers("1.2.3.4.3"));

        // Everything in the spool is analysed: remembered, nothing to assemble.
        let r = recover(root).unwrap();
        assert!(r.instances.is_empty(), "{:?}", r.instances);
        assert_eq!(r.analysed.len(), 1);
        assert_eq!(r.analysed[0].instances.len(), 2);
        assert_eq!(r.analysed[0].mark, mark);

        // A late instance after the mark: it is to be assembled (the series re-opens).
        let Ok(Stored::New(late)) = store(&spool, sops[2], &dataset("1.2.3", "1.2.3.4", sops[2]))
        else {
            panic!("not stored")
        };
        let r = recover(root).unwrap();
        assert_eq!(r.instances.len(), 1);
        assert_eq!(r.instances[0].sop_instance_uid, sops[2]);
        assert_eq!(r.analysed[0].instances.len(), 2);

        // The revision's mark is the union of what was analysed.
        let at2 = at + time::Duration::seconds(5);
        assert_eq!(
            mark_analysed(root, "1.2.3", "1.2.3.4", "id2", &[sops[2].to_string()], at2).unwrap(),
            Some(3)
        );
        let r = recover(root).unwrap();
        assert!(r.instances.is_empty());
        assert_eq!(r.analysed[0].instances.len(), 3);
        assert_eq!(r.analysed[0].mark.result_id, "id2");
        assert_eq!(
            fs::read_dir(&series_dir).unwrap().count(),
            4,
            "3 instances + mark"
        );

        // A partial release (not forgetting) keeps the mark while instances are left.
        assert_eq!(
            release(root, "1.2.3", "1.2.3.4", &paths[..1], false).unwrap(),
            1
        );
        assert!(series_dir.join(MARK_FILE).is_file());
        // A path outside the series directory is never removed.
        let outside = root.join("elsewhere.dcm");
        fs::write(&outside, b"x").unwrap();
        assert_eq!(
            release(
                root,
                "1.2.3",
                "1.2.3.4",
                std::slice::from_ref(&outside),
                true
            )
            .unwrap(),
            0
        );
        assert!(outside.is_file());
        // Forgetting: files, then the mark, then the empty directories.
        let rest = [paths[1].clone(), late.path.clone(), paths[0].clone()];
        assert_eq!(release(root, "1.2.3", "1.2.3.4", &rest, true).unwrap(), 2);
        assert!(!root.join("1.2.3").exists());
        assert!(recover(root).unwrap().analysed.is_empty());
    }

    #[test]
    fn forgetting_keeps_an_instance_that_arrived_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let spool = Spool::open(root, "CSPINE", 0).unwrap();
        let store_one = |sop: &str| match store(&spool, sop, &dataset("1.2.3", "1.2.3.4", sop)) {
            Ok(Stored::New(i)) => i,
            _ => panic!("not stored"),
        };
        let known = store_one("1.2.3.4.1");
        let at = OffsetDateTime::now_utc();
        mark_analysed(root, "1.2.3", "1.2.3.4", "id", &["1.2.3.4.1".into()], at).unwrap();
        // Stored after the assembler decided to forget the study: not in the release.
        store_one("1.2.3.4.2");
        assert_eq!(
            release(root, "1.2.3", "1.2.3.4", &[known.path], true).unwrap(),
            1
        );
        let r = recover(root).unwrap();
        assert!(r.analysed.is_empty(), "the mark went with the study");
        assert_eq!(r.instances.len(), 1, "the newcomer is assembled");
        assert_eq!(r.instances[0].sop_instance_uid, "1.2.3.4.2");
    }

    #[test]
    fn recover_cleans_a_mark_without_instances_and_ignores_a_bad_mark() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let spool = Spool::open(root, "CSPINE", 0).unwrap();
        // A crash after the files of a forgotten series were removed, before its mark.
        let gone = root.join("1.2.3").join("1.2.3.5");
        fs::create_dir_all(&gone).unwrap();
        fs::write(gone.join(MARK_FILE), b"{}").unwrap();
        // An unreadable mark: the series is assembled (analysed again), the safe side.
        let Ok(Stored::New(_)) = store(
            &spool,
            "1.2.3.4.1",
            &dataset("1.2.3", "1.2.3.4", "1.2.3.4.1"),
        ) else {
            panic!("not stored")
        };
        fs::write(
            root.join("1.2.3").join("1.2.3.4").join(MARK_FILE),
            b"not json",
        )
        .unwrap();
        let r = recover(root).unwrap();
        assert!(r.analysed.is_empty());
        assert_eq!(r.instances.len(), 1);
        assert!(
            !gone.exists(),
            "the orphan mark and its directory are removed"
        );
    }
}
