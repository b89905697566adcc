//! One destination's durable delivery queue: a directory with one file per SOP Instance
//! UID still to be sent there.
//!
//! An entry is `<SOP Instance UID>.entry`: a JSON header line ([`Header`]: sequence
//! number, UIDs, enqueue time, length and SHA-256 of the body) followed by the Part 10
//! bytes. It is written through [`crate::durable::write_atomically`] (temp file, fsync,
//! rename, directory fsync), so once [`Queue::add`] returns it survives a crash or power
//! cut. The file name makes "one entry per (destination, SOP Instance UID)" hold across
//! restarts: adding a UID that is already queued keeps the first entry. Entries are sent
//! in sequence order (oldest first); the sequence survives restarts through the headers.
//!
//! An entry leaves the directory in one of three ways: removed after the destination
//! stored it, moved to `rejected/` when the destination refused it for good (see
//! [`super::status`]), or moved to `corrupt/` when its file is damaged. Both folders are
//! for a human: an entry moved back into the queue directory is sent after the next
//! start.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::durable;
use crate::report::{ResultObject, ResultObjectKind};

const ENTRY_EXT: &str = "entry";
const TMP_EXT: &str = "tmp";
const FORMAT: u32 = 1;
/// Where permanently refused entries go.
pub const REJECTED_DIR: &str = "rejected";
/// Where damaged entries go.
pub const CORRUPT_DIR: &str = "corrupt";

/// What the queue knows about an entry without reading its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    pub seq: u64,
    pub kind: ResultObjectKind,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// When it was queued, milliseconds since the Unix epoch.
    pub enqueued_unix_ms: u64,
}

/// Whether [`Queue::add`] wrote a new entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    New,
    /// This SOP Instance UID is already waiting here; the first entry is kept.
    AlreadyQueued,
}

/// How much waits in a queue (cheap: read from memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueDepth {
    pub entries: usize,
    /// Age of the oldest waiting entry; `None` when the queue is empty.
    pub oldest_age: Option<Duration>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: u32,
    seq: u64,
    kind: ResultObjectKind,
    sop_class_uid: String,
    sop_instance_uid: String,
    enqueued_unix_ms: u64,
    len: u64,
    /// SHA-256 (hex) of the Part 10 bytes.
    sha256: String,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<u64, EntryMeta>,
    by_uid: HashMap<String, u64>,
    next_seq: u64,
}

/// An opened queue directory. The caller holds the lock that keeps other processes out
/// (see `Delivery::open`).
pub struct Queue {
    dir: PathBuf,
    state: Mutex<State>,
    /// Signalled when entries are added.
    pub(crate) added: tokio::sync::Notify,
}

impl Queue {
    /// Opens (creating it durably) the queue in `dir` and indexes what a previous run
    /// left. Leftover temp files (a crash mid-write: never reported as queued) are
    /// deleted; damaged entries are moved to `corrupt/` with an error in the log.
    pub fn open(dir: &Path) -> Result<Queue> {
        durable::create_dir_all_durably(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut state = State {
            next_seq: 1,
            ..State::default()
        };
        for dirent in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let path = dirent?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some(TMP_EXT) => fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?,
                Some(ENTRY_EXT) => match verify(&path) {
                    Ok(meta) => {
                        state.next_seq = state.next_seq.max(meta.seq + 1);
                        state.by_uid.insert(meta.sop_instance_uid.clone(), meta.seq);
                        state.entries.insert(meta.seq, meta);
                    }
                    Err(err) => move_aside(dir, &path, CORRUPT_DIR, &err)?,
                },
                _ => {}
            }
        }
        Ok(Queue {
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
            added: tokio::sync::Notify::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Durably queues `object` (fsynced, file and directory, before it returns).
    /// Blocking file I/O.
    pub fn add(&self, object: &ResultObject) -> Result<Added> {
        let mut state = self.state();
        if state.by_uid.contains_key(&object.sop_instance_uid) {
            return Ok(Added::AlreadyQueued);
        }
        let seq = state.next_seq;
        let meta = EntryMeta {
            seq,
            kind: object.kind,
            sop_class_uid: object.sop_class_uid.clone(),
            sop_instance_uid: object.sop_instance_uid.clone(),
            enqueued_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
        };
        let header = Header {
            format: FORMAT,
            seq,
            kind: meta.kind,
            sop_class_uid: meta.sop_class_uid.clone(),
            sop_instance_uid: meta.sop_instance_uid.clone(),
            enqueued_unix_ms: meta.enqueued_unix_ms,
            len: object.part10.len() as u64,
            sha256: hex::encode(Sha256::digest(&object.part10)),
        };
        let mut line = serde_json::to_vec(&header)?;
        line.push(b'\n');
        let name = entry_name(&object.sop_instance_uid);
        durable::write_atomically(
            &self.dir,
            &name,
            &format!("{name}.{TMP_EXT}"),
            &[&line, &object.part10],
        )?;
        state.next_seq = seq + 1;
        state.by_uid.insert(meta.sop_instance_uid.clone(), seq);
        state.entries.insert(seq, meta);
        Ok(Added::New)
    }

    /// The waiting entries, oldest first.
    pub fn pending(&self) -> Vec<EntryMeta> {
        self.state().entries.values().cloned().collect()
    }

    pub fn depth(&self) -> QueueDepth {
        let state = self.state();
        let oldest_age = state.entries.values().next().map(|oldest| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64;
            Duration::from_millis(now.saturating_sub(oldest.enqueued_unix_ms))
        });
        QueueDepth {
            entries: state.entries.len(),
            oldest_age,
        }
    }

    /// The Part 10 bytes of a waiting entry, checked against the header's SHA-256.
    pub fn load(&self, meta: &EntryMeta) -> Result<Vec<u8>> {
        let path = self.dir.join(entry_name(&meta.sop_instance_uid));
        let mut reader = BufReader::new(
            File::open(&path).with_context(|| format!("cannot open {}", path.display()))?,
        );
        let header = parse_header(&mut reader, &path)?;
        let mut body = Vec::new();
        reader
            .read_to_end(&mut body)
            .with_context(|| format!("cannot read {}", path.display()))?;
        check_body(&header, &body, &path)?;
        Ok(body)
    }

    /// Removes a delivered entry. A removal lost to a crash only means one more (identical)
    /// C-STORE of the same SOP Instance, which a PACS stores once.
    pub fn remove(&self, meta: &EntryMeta) -> Result<()> {
        let path = self.dir.join(entry_name(&meta.sop_instance_uid));
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
        self.forget(meta);
        durable::fsync_dir(&self.dir)
    }

    /// Moves an entry the destination refused for good to `rejected/`, logging an error.
    pub fn reject(&self, meta: &EntryMeta, why: &anyhow::Error) -> Result<()> {
        let path = self.dir.join(entry_name(&meta.sop_instance_uid));
        move_aside(&self.dir, &path, REJECTED_DIR, why)?;
        self.forget(meta);
        Ok(())
    }

    /// Moves a damaged entry to `corrupt/`, logging an error.
    pub fn set_aside_damaged(&self, meta: &EntryMeta, why: &anyhow::Error) -> Result<()> {
        let path = self.dir.join(entry_name(&meta.sop_instance_uid));
        move_aside(&self.dir, &path, CORRUPT_DIR, why)?;
        self.forget(meta);
        Ok(())
    }

    fn forget(&self, meta: &EntryMeta) {
        let mut state = self.state();
        if state.entries.remove(&meta.seq).is_some() {
            state.by_uid.remove(&meta.sop_instance_uid);
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every mutation is one insert or remove after its file operation: a panic while
        // holding the lock leaves consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// UIDs are checked (digits and dots, at most 64) before anything is queued, so the UID is
/// a safe file name.
fn entry_name(sop_instance_uid: &str) -> String {
    format!("{sop_instance_uid}.{ENTRY_EXT}")
}

fn parse_header(reader: &mut impl BufRead, path: &Path) -> Result<Header> {
    let mut line = Vec::new();
    // A header is a few hundred bytes; a longer first line is damage, not a header.
    reader
        .by_ref()
        .take(4096)
        .read_until(b'\n', &mut line)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let header: Header = serde_json::from_slice(&line)
        .with_context(|| format!("{} has no valid header", path.display()))?;
    ensure!(
        header.format == FORMAT,
        "{} has format {}, this version reads {FORMAT}",
        path.display(),
        header.format
    );
    Ok(header)
}

fn check_body(header: &Header, body: &[u8], path: &Path) -> Result<()> {
    if body.len() as u64 != header.len {
        bail!(
            "{} is truncated: {} bytes of Part 10 data, the header says {}",
            path.display(),
            body.len(),
            header.len
        );
    }
    if hex::encode(Sha256::digest(body)) != header.sha256 {
        bail!("{} fails its SHA-256 check", path.display());
    }
    Ok(())
}

/// Reads a whole entry at start-up, so damage is found before it is sent.
fn verify(path: &Path) -> Result<EntryMeta> {
    let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut reader = &data[..];
    let header = parse_header(&mut reader, path)?;
    check_body(&header, reader, path)?;
    ensure!(
        path.file_name().and_then(|n| n.to_str()) == Some(&entry_name(&header.sop_instance_uid)),
        "{} holds SOP Instance {}",
        path.display(),
        header.sop_instance_uid
    );
    Ok(EntryMeta {
        seq: header.seq,
        kind: header.kind,
        sop_class_uid: header.sop_class_uid,
        sop_instance_uid: header.sop_instance_uid,
        enqueued_unix_ms: header.enqueued_unix_ms,
    })
}

fn move_aside(dir: &Path, path: &Path, folder: &str, why: &anyhow::Error) -> Result<()> {
    let target = durable::quarantine(path, &dir.join(folder))?;
    log::error!(
        "PACS delivery: {why:#}; entry moved to {} (it will not be sent)",
        target.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(uid: &str, body: &[u8]) -> ResultObject {
        ResultObject {
            kind: ResultObjectKind::StructuredReport,
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.33".into(),
            sop_instance_uid: uid.into(),
            series_instance_uid: "1.2.3".into(),
            study_instance_uid: "1.2".into(),
            part10: body.to_vec(),
        }
    }

    #[test]
    fn add_is_idempotent_ordered_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(dir.path()).unwrap();
        assert_eq!(queue.add(&object("1.9.2", b"b")).unwrap(), Added::New);
        assert_eq!(queue.add(&object("1.9.1", b"a")).unwrap(), Added::New);
        assert_eq!(
            queue.add(&object("1.9.2", b"other")).unwrap(),
            Added::AlreadyQueued
        );
        assert_eq!(queue.depth().entries, 2);
        drop(queue);

        let queue = Queue::open(dir.path()).unwrap();
        let uids: Vec<_> = queue
            .pending()
            .into_iter()
            .map(|m| m.sop_instance_uid)
            .collect();
        assert_eq!(uids, ["1.9.2", "1.9.1"]);
        let first = &queue.pending()[0];
        assert_eq!(queue.load(first).unwrap(), b"b");
        queue.remove(first).unwrap();
        assert_eq!(queue.add(&object("1.9.3", b"c")).unwrap(), Added::New);
        assert_eq!(queue.pending().last().unwrap().seq, 3);
    }

    #[test]
    fn damaged_entries_and_rejections_are_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(dir.path()).unwrap();
        queue.add(&object("1.9.1", b"abc")).unwrap();
        queue.add(&object("1.9.2", b"def")).unwrap();
        queue.add(&object("1.9.3", b"ghi")).unwrap();
        let rejected = queue.pending()[2].clone();
        queue
            .reject(&rejected, &anyhow::anyhow!("status C000"))
            .unwrap();
        drop(queue);
        let path = dir.path().join("1.9.1.entry");
        let mut data = fs::read(&path).unwrap();
        *data.last_mut().unwrap() ^= 1;
        fs::write(&path, data).unwrap();
        fs::write(dir.path().join("1.9.4.entry.tmp"), b"half").unwrap();

        let queue = Queue::open(dir.path()).unwrap();
        let uids: Vec<_> = queue
            .pending()
            .into_iter()
            .map(|m| m.sop_instance_uid)
            .collect();
        assert_eq!(uids, ["1.9.2"]);
        assert!(dir.path().join(CORRUPT_DIR).join("1.9.1.entry").exists());
        assert!(dir.path().join(REJECTED_DIR).join("1.9.3.entry").exists());
        assert!(!dir.path().join("1.9.4.entry.tmp").exists());
    }
}
