//! The durable outbox: the source of truth for every result that still has to reach the
//! broker.
//!
//! rumqttc keeps unacknowledged QoS 1 publishes only in memory and drops them on a reconnect
//! without a session, so a result is first written here (one file per result, fsynced,
//! atomically renamed, directory fsynced) and only removed after the broker acknowledged
//! every publish of it. After a reconnect or a restart everything still here is published
//! again, in sequence order.
//!
//! One file per entry, named `<seq, 20 digits>.entry`:
//! a JSON header line ([`Header`]) followed by the result JSON and the key image PNG bytes.
//! The header carries a SHA-256 of the body so a damaged file is recognised (and moved to
//! `corrupt/`, with an error in the log) instead of being published.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::events::{CommitFailure, Event, Events};
use crate::heartbeat::Heartbeat;

/// How long a commit that failed with an I/O error waits before it is tried again.
const COMMIT_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

const ENTRY_EXT: &str = "entry";
const TMP_EXT: &str = "tmp";
const FORMAT: u32 = 1;

/// How much the outbox may hold before new results wait (backpressure upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    pub max_entries: usize,
    pub max_bytes: u64,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            max_entries: 10_000,
            max_bytes: 512 * 1024 * 1024,
        }
    }
}

/// What the outbox knows about an entry without reading its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    pub seq: u64,
    pub id: String,
    /// Published on the `alert` topic too.
    pub positive: bool,
    pub has_key_image: bool,
    /// Size of the file on disk.
    pub file_bytes: u64,
}

/// One result as it is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub id: String,
    pub positive: bool,
    /// The exact payload of the `result` (and `alert`) publish: every re-delivery of this
    /// entry is byte-identical.
    pub result_json: Vec<u8>,
    pub key_image_png: Option<Vec<u8>>,
}

/// Result of [`Outbox::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Fsynced as a new entry with this sequence number.
    Added(u64),
    /// An entry with the same id is still waiting for delivery; it is kept, the new one is
    /// not stored (one entry per id).
    AlreadyQueued(u64),
}

impl CommitOutcome {
    pub fn seq(self) -> u64 {
        match self {
            CommitOutcome::Added(seq) | CommitOutcome::AlreadyQueued(seq) => seq,
        }
    }
}

/// Why [`Outbox::commit`] did not store a result.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(
        "outbox is full ({entries} entries, {bytes} bytes; limits {max_entries} entries, \
         {max_bytes} bytes)"
    )]
    Full {
        entries: usize,
        bytes: u64,
        max_entries: usize,
        max_bytes: u64,
    },
    #[error(transparent)]
    Io(#[from] anyhow::Error),
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: u32,
    seq: u64,
    id: String,
    positive: bool,
    result_len: u64,
    key_image_len: Option<u64>,
    /// SHA-256 (hex) of the body: result JSON followed by the key image.
    sha256: String,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<u64, EntryMeta>,
    by_id: HashMap<String, u64>,
    bytes: u64,
    next_seq: u64,
}

struct Shared {
    dir: PathBuf,
    /// Exclusive lock on `dir/.lock` for as long as the outbox is open: two processes
    /// publishing and deleting the same entries would confuse each other.
    _lock: nix::fcntl::Flock<File>,
    limits: OutboxLimits,
    state: Mutex<State>,
    /// Signalled when an entry is removed (space for waiting results).
    space: tokio::sync::Notify,
}

/// Handle to an opened outbox directory; cheap to clone, shared between the task that
/// commits results and the one that publishes them.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("dir", &self.shared.dir)
            .field("len", &self.len())
            .finish()
    }
}

impl Outbox {
    /// Opens (creating it if needed) the outbox in `dir` and indexes the entries left by a
    /// previous run. Leftover temporary files (a crash during a write: never acknowledged
    /// upstream) are deleted; damaged entries are moved to `dir/corrupt/` and logged.
    pub fn open(dir: &Path, limits: OutboxLimits) -> Result<Outbox> {
        // Durable in its parent too, or a power cut takes committed entries with it.
        crate::durable::create_dir_all_durably(dir)
            .with_context(|| format!("cannot create outbox directory {}", dir.display()))?;
        let lock_path = dir.join(".lock");
        let lock_file = File::create(&lock_path)
            .with_context(|| format!("cannot create {}", lock_path.display()))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| {
                anyhow::anyhow!(
                    "outbox {} is in use by another process ({errno}); \
                     is another cspine-triage running with the same alert.outbox_dir?",
                    dir.display()
                )
            })?;
        let mut state = State {
            next_seq: 1,
            ..State::default()
        };
        let listing = fs::read_dir(dir)
            .with_context(|| format!("cannot read outbox directory {}", dir.display()))?;
        for dirent in listing {
            let path = dirent?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some(TMP_EXT) => {
                    fs::remove_file(&path).with_context(|| {
                        format!("cannot remove unfinished outbox file {}", path.display())
                    })?;
                }
                Some(ENTRY_EXT) => match read_header(&path).and_then(|h| verify(&path, h)) {
                    Ok(meta) => {
                        state.next_seq = state.next_seq.max(meta.seq + 1);
                        state.bytes += meta.file_bytes;
                        if let Some(&other) = state.by_id.get(&meta.id) {
                            // Cannot happen through `commit`; keep the older one.
                            log::warn!(
                                "outbox entries {other} and {} share id {}: keeping both",
                                meta.seq,
                                meta.id
                            );
                        } else {
                            state.by_id.insert(meta.id.clone(), meta.seq);
                        }
                        state.entries.insert(meta.seq, meta);
                    }
                    Err(err) => quarantine(dir, &path, &err)?,
                },
                _ => {}
            }
        }
        if !state.entries.is_empty() {
            log::info!(
                "outbox {}: {} result(s) from a previous run still to publish",
                dir.display(),
                state.entries.len()
            );
        }
        Ok(Outbox {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                _lock: lock,
                limits,
                state: Mutex::new(state),
                space: tokio::sync::Notify::new(),
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn limits(&self) -> OutboxLimits {
        self.shared.limits
    }

    /// Number of entries waiting for delivery.
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes on disk of the waiting entries.
    pub fn bytes(&self) -> u64 {
        self.state().bytes
    }

    /// When the oldest waiting entry was committed (its file's modification time).
    pub fn oldest_committed(&self) -> Option<time::OffsetDateTime> {
        let seq = *self.state().entries.keys().next()?;
        let modified = std::fs::metadata(self.entry_path(seq))
            .ok()?
            .modified()
            .ok()?;
        Some(modified.into())
    }

    /// The waiting entries, oldest first.
    pub fn pending(&self) -> Vec<EntryMeta> {
        self.state().entries.values().cloned().collect()
    }

    /// The first waiting entry with a sequence number above `seq`.
    pub fn next_after(&self, seq: u64) -> Option<EntryMeta> {
        self.state()
            .entries
            .range(seq + 1..)
            .next()
            .map(|(_, m)| m.clone())
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.state().entries.contains_key(&seq)
    }

    /// Durably stores a result. Returns once the entry is fsynced and its directory entry
    /// too: from then on it survives a crash or power loss and will be published.
    ///
    /// Blocking (file I/O); from async code use `tokio::task::spawn_blocking`.
    pub fn commit(
        &self,
        id: &str,
        positive: bool,
        result_json: &[u8],
        key_image_png: Option<&[u8]>,
    ) -> Result<CommitOutcome, CommitError> {
        // Holding the lock across the write keeps sequence numbers and files in one order
        // and makes "same id twice" race-free; commits are rare (one per series).
        let mut state = self.state();
        if let Some(&seq) = state.by_id.get(id) {
            return Ok(CommitOutcome::AlreadyQueued(seq));
        }
        let mut body = Vec::with_capacity(result_json.len() + key_image_png.map_or(0, |p| p.len()));
        body.extend_from_slice(result_json);
        if let Some(png) = key_image_png {
            body.extend_from_slice(png);
        }
        let seq = state.next_seq;
        let header = Header {
            format: FORMAT,
            seq,
            id: id.to_owned(),
            positive,
            result_len: result_json.len() as u64,
            key_image_len: key_image_png.map(|p| p.len() as u64),
            sha256: hex::encode(Sha256::digest(&body)),
        };
        let mut header_line = serde_json::to_vec(&header).map_err(anyhow::Error::from)?;
        header_line.push(b'\n');
        let file_bytes = (header_line.len() + body.len()) as u64;

        let limits = self.shared.limits;
        let full_entries = state.entries.len() >= limits.max_entries;
        // A single result larger than the byte limit is still accepted into an empty outbox:
        // refusing it forever would lose it.
        let full_bytes = !state.entries.is_empty() && state.bytes + file_bytes > limits.max_bytes;
        if full_entries || full_bytes {
            return Err(CommitError::Full {
                entries: state.entries.len(),
                bytes: state.bytes,
                max_entries: limits.max_entries,
                max_bytes: limits.max_bytes,
            });
        }

        let path = self.entry_path(seq);
        write_durably(&self.shared.dir, &path, &[&header_line, &body])?;

        state.next_seq = seq + 1;
        state.bytes += file_bytes;
        state.by_id.insert(id.to_owned(), seq);
        state.entries.insert(
            seq,
            EntryMeta {
                seq,
                id: id.to_owned(),
                positive,
                has_key_image: key_image_png.is_some(),
                file_bytes,
            },
        );
        Ok(CommitOutcome::Added(seq))
    }

    /// Like [`Outbox::commit`], but waits (without blocking the runtime) while the outbox is
    /// full, so a full outbox stops the upstream channel instead of dropping anything.
    /// `result_json` is called for each attempt, so a timestamp it embeds is the moment of
    /// the attempt that succeeds.
    /// I/O errors (disk full, read-only file system) are logged, recorded on `events`
    /// ([`Event::OutboxCommitRetry`]) and retried every 5 s: a result that was handed to
    /// us is never dropped.
    pub async fn commit_waiting(
        &self,
        heartbeat: &Heartbeat,
        events: &Events,
        id: &str,
        positive: bool,
        result_json: impl Fn() -> Vec<u8> + Send + Sync + 'static,
        key_image_png: Option<Vec<u8>>,
    ) -> CommitOutcome {
        let result_json = Arc::new(result_json);
        let key_image_png = Arc::new(key_image_png);
        let mut logged_full = false;
        loop {
            // Register for the "space" signal before looking, so a removal between the
            // look and the wait is not missed.
            let space = self.shared.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();

            let this = self.clone();
            let (id_, json, png) = (id.to_owned(), result_json.clone(), key_image_png.clone());
            let outcome = tokio::task::spawn_blocking(move || {
                this.commit(&id_, positive, &json(), png.as_deref())
            })
            .await
            .unwrap_or_else(|join| Err(CommitError::Io(anyhow::anyhow!("{join}"))));
            match outcome {
                Ok(committed) => {
                    if logged_full {
                        log::info!("outbox has room again; result {id} committed");
                    }
                    return committed;
                }
                Err(full @ CommitError::Full { .. }) => {
                    if !logged_full {
                        log::warn!(
                            "{full}: result {id} waits, and so does everything upstream, \
                             until the broker acknowledges older results \
                             (nothing is dropped; see alert.outbox_max_entries/_bytes)"
                        );
                        logged_full = true;
                    }
                    // Also wake up now and then in case of an external cleanup.
                    heartbeat
                        .wait_for(space, std::time::Duration::from_secs(5))
                        .await;
                }
                Err(CommitError::Io(err)) => {
                    log::error!(
                        "cannot write result {id} to the outbox {}: {err:#}; retrying in {} s \
                         (upstream waits)",
                        self.shared.dir.display(),
                        COMMIT_RETRY.as_secs()
                    );
                    events.emit(Event::OutboxCommitRetry {
                        result_id: id.to_owned(),
                        reason: CommitFailure::of(&err),
                        retry_in_secs: COMMIT_RETRY.as_secs_f64(),
                    });
                    heartbeat
                        .wait_for(std::future::pending::<()>(), COMMIT_RETRY)
                        .await;
                }
            }
        }
    }

    /// Reads an entry back for publishing.
    pub fn load(&self, seq: u64) -> Result<Entry> {
        let path = self.entry_path(seq);
        let file = File::open(&path)
            .with_context(|| format!("cannot open outbox entry {}", path.display()))?;
        let mut reader = BufReader::new(file);
        let header = parse_header(&mut reader, &path)?;
        let mut body = Vec::new();
        reader
            .read_to_end(&mut body)
            .with_context(|| format!("cannot read outbox entry {}", path.display()))?;
        check_body(&header, &body, &path)?;
        let key_image_png = header
            .key_image_len
            .map(|_| body.split_off(header.result_len as usize));
        Ok(Entry {
            seq: header.seq,
            id: header.id,
            positive: header.positive,
            result_json: body,
            key_image_png,
        })
    }

    /// Removes a delivered entry (after the broker acknowledged all of its publishes) and
    /// returns what it was. Removing an entry that is already gone is not an error (`None`).
    pub fn remove(&self, seq: u64) -> Result<Option<EntryMeta>> {
        let removed = {
            let mut state = self.state();
            let Some(meta) = state.entries.remove(&seq) else {
                return Ok(None);
            };
            state.bytes -= meta.file_bytes;
            if state.by_id.get(&meta.id) == Some(&seq) {
                state.by_id.remove(&meta.id);
            }
            let path = self.entry_path(seq);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot remove delivered outbox entry {}", path.display())
                    })
                }
            }
            // A removal lost to a crash only means one more (identical) delivery.
            sync_dir(&self.shared.dir)?;
            meta
        };
        self.shared.space.notify_waiters();
        Ok(Some(removed))
    }

    /// Moves an unreadable entry aside so it no longer blocks delivery, logging an error.
    pub fn quarantine(&self, seq: u64, why: &anyhow::Error) -> Result<()> {
        let path = self.entry_path(seq);
        quarantine(&self.shared.dir, &path, why)?;
        let mut state = self.state();
        if let Some(meta) = state.entries.remove(&seq) {
            state.bytes -= meta.file_bytes;
            if state.by_id.get(&meta.id) == Some(&seq) {
                state.by_id.remove(&meta.id);
            }
        }
        drop(state);
        self.shared.space.notify_waiters();
        Ok(())
    }

    fn entry_path(&self, seq: u64) -> PathBuf {
        self.shared.dir.join(format!("{seq:020}.{ENTRY_EXT}"))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every mutation is a
        // single insert/remove after the file operation), so poisoning is ignored.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// temp file + write + fsync + rename + directory fsync.
fn write_durably(dir: &Path, path: &Path, parts: &[&[u8]]) -> Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = format!("{name}.{TMP_EXT}");
    crate::durable::write_atomically(dir, &name, &tmp, parts)
        .with_context(|| format!("cannot write outbox entry {}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    crate::durable::fsync_dir(dir)
}

fn parse_header(reader: &mut impl BufRead, path: &Path) -> Result<Header> {
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .with_context(|| format!("cannot read outbox entry {}", path.display()))?;
    let header: Header = serde_json::from_slice(&line)
        .with_context(|| format!("outbox entry {} has no valid header", path.display()))?;
    ensure!(
        header.format == FORMAT,
        "outbox entry {} has format {}, this version reads {FORMAT}",
        path.display(),
        header.format
    );
    Ok(header)
}

fn check_body(header: &Header, body: &[u8], path: &Path) -> Result<()> {
    let expected = header.result_len + header.key_image_len.unwrap_or(0);
    if body.len() as u64 != expected {
        bail!(
            "outbox entry {} is truncated: {} body bytes, header says {expected}",
            path.display(),
            body.len()
        );
    }
    if hex::encode(Sha256::digest(body)) != header.sha256 {
        bail!("outbox entry {} fails its SHA-256 check", path.display());
    }
    Ok(())
}

fn read_header(path: &Path) -> Result<Header> {
    let file =
        File::open(path).with_context(|| format!("cannot open outbox entry {}", path.display()))?;
    parse_header(&mut BufReader::new(file), path)
}

/// Checks the whole file at start-up so a damaged entry is found before it is published.
fn verify(path: &Path, header: Header) -> Result<EntryMeta> {
    let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let body_start = data
        .iter()
        .position(|&b| b == b'\n')
        .map_or(data.len(), |p| p + 1);
    check_body(&header, &data[body_start..], path)?;
    let name_seq = path
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse::<u64>().ok());
    ensure!(
        name_seq == Some(header.seq),
        "outbox entry {} has sequence number {} in its header",
        path.display(),
        header.seq
    );
    Ok(EntryMeta {
        seq: header.seq,
        id: header.id,
        positive: header.positive,
        has_key_image: header.key_image_len.is_some(),
        file_bytes: data.len() as u64,
    })
}

/// Moves a damaged entry to `dir/corrupt/` (never overwriting an earlier one there).
fn quarantine(dir: &Path, path: &Path, why: &anyhow::Error) -> Result<()> {
    let target = crate::durable::quarantine(path, &dir.join("corrupt"))?;
    log::error!(
        "damaged outbox entry: {why:#}; moved to {} for inspection (it will not be published)",
        target.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_entries: usize, max_bytes: u64) -> OutboxLimits {
        OutboxLimits {
            max_entries,
            max_bytes,
        }
    }

    #[test]
    fn commit_load_remove_and_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        assert_eq!(
            outbox
                .commit("a", true, b"{\"id\":\"a\"}", Some(b"PNG"))
                .unwrap(),
            CommitOutcome::Added(1)
        );
        assert_eq!(
            outbox.commit("b", false, b"{\"id\":\"b\"}", None).unwrap(),
            CommitOutcome::Added(2)
        );
        // Same id again: one entry.
        assert_eq!(
            outbox
                .commit("a", true, b"{\"id\":\"a\",\"x\":1}", None)
                .unwrap(),
            CommitOutcome::AlreadyQueued(1)
        );
        let a = outbox.load(1).unwrap();
        assert_eq!(a.result_json, b"{\"id\":\"a\"}");
        assert_eq!(a.key_image_png.as_deref(), Some(&b"PNG"[..]));
        assert!(a.positive);

        drop(outbox);
        let reopened = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        let ids: Vec<_> = reopened.pending().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, ["a", "b"]);
        reopened.remove(1).unwrap();
        assert_eq!(reopened.next_after(0).unwrap().id, "b");
        assert_eq!(
            reopened.commit("c", false, b"{}", None).unwrap(),
            CommitOutcome::Added(3)
        );
        drop(reopened);
        let again = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        let seqs: Vec<_> = again.pending().into_iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [2, 3]);
        // After delivery the id may be committed again (a re-sent series).
        again.remove(2).unwrap();
        assert_eq!(
            again.commit("b", false, b"{}", None).unwrap(),
            CommitOutcome::Added(4)
        );
    }

    #[test]
    fn full_outbox_refuses_until_space() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), limits(2, u64::MAX)).unwrap();
        outbox.commit("a", false, b"{}", None).unwrap();
        outbox.commit("b", false, b"{}", None).unwrap();
        assert!(matches!(
            outbox.commit("c", false, b"{}", None),
            Err(CommitError::Full { entries: 2, .. })
        ));
        outbox.remove(1).unwrap();
        assert_eq!(
            outbox.commit("c", false, b"{}", None).unwrap(),
            CommitOutcome::Added(3)
        );

        // Byte limit: an oversized entry is still taken into an empty outbox.
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), limits(100, 10)).unwrap();
        outbox.commit("big", false, &[b'x'; 100], None).unwrap();
        assert!(matches!(
            outbox.commit("next", false, b"{}", None),
            Err(CommitError::Full { .. })
        ));
    }

    #[test]
    fn damaged_and_unfinished_files_are_handled_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        outbox.commit("a", false, b"{\"id\":\"a\"}", None).unwrap();
        outbox.commit("b", false, b"{\"id\":\"b\"}", None).unwrap();
        drop(outbox);
        // Flip a body byte of entry 1; leave a temp file as a crash mid-write would.
        let path = dir.path().join(format!("{:020}.entry", 1));
        let mut data = fs::read(&path).unwrap();
        *data.last_mut().unwrap() ^= 0x20;
        fs::write(&path, data).unwrap();
        fs::write(dir.path().join("00000000000000000003.entry.tmp"), b"half").unwrap();

        let outbox = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        let ids: Vec<_> = outbox.pending().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, ["b"]);
        assert!(dir
            .path()
            .join("corrupt")
            .join(path.file_name().unwrap())
            .exists());
        assert!(!dir.path().join("00000000000000000003.entry.tmp").exists());
        // Sequence numbers keep growing past what is on disk.
        assert_eq!(
            outbox.commit("c", false, b"{}", None).unwrap(),
            CommitOutcome::Added(3)
        );
    }

    #[test]
    fn one_process_per_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        let err = Outbox::open(dir.path(), OutboxLimits::default()).unwrap_err();
        assert!(format!("{err:#}").contains("in use"), "{err:#}");
        drop(outbox);
        Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
    }

    #[tokio::test]
    async fn commit_waiting_resumes_when_space_frees() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), limits(1, u64::MAX)).unwrap();
        outbox.commit("a", false, b"{}", None).unwrap();
        let waiter = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                let heartbeat = Heartbeat::new(
                    "alert",
                    std::time::Duration::from_secs(120),
                    std::time::Instant::now(),
                );
                let events = crate::events::Events::default();
                outbox
                    .commit_waiting(&heartbeat, &events, "b", false, || b"{}".to_vec(), None)
                    .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !waiter.is_finished(),
            "commit must wait while the outbox is full"
        );
        outbox.remove(1).unwrap();
        let committed = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("commit resumes after a removal")
            .unwrap();
        assert_eq!(committed, CommitOutcome::Added(2));
    }
}
