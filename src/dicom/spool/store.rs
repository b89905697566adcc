//! [`Spool`]: opening the spool, receiving and committing an instance (steps 1-5 of the
//! write protocol in the [module docs](super)), duplicates and corrected re-sends, and
//! the cache of directories already made durable, which every removal goes through.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::incoming::{check_room, ReceiveLimits, INITIAL_BUFFER};
use super::instance::{file_meta, same_data_set};
use super::request::{InstanceHeader, StoreError};
use super::{lifecycle, safe_name, Incoming, TMP_DIR};
use crate::dicom::{Arrival, StoredInstance};
use crate::durable::{self, create_dir_all_durably, fsync_dir, CreateDirError};

/// Result of a successful store.
#[derive(Debug)]
pub enum Stored {
    New(StoredInstance),
    /// This SOP Instance UID was already in the spool with the same data set; nothing was
    /// written.
    Duplicate(StoredInstance),
    /// This SOP Instance UID was already in the spool with another data set, and
    /// `dicom.duplicate_policy` kept the first one: the new data set was dropped.
    KeptFirst(StoredInstance),
    /// This SOP Instance UID was already in the spool with another data set, and the new
    /// one replaced it (`dicom.duplicate_policy = "replace"`): a corrected re-send.
    Replaced(StoredInstance),
}

/// What to do with an instance whose SOP Instance UID is already in the spool with a
/// different data set (`dicom.duplicate_policy`). The same data set again is always an
/// idempotent Success.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DuplicatePolicy {
    /// The newer version replaces the older (atomic rename) and its series is analysed
    /// again: what a scanner that re-sends a corrected instance expects.
    #[default]
    Replace,
    /// The first version stays; the new one is answered Success and dropped.
    KeepFirst,
}

/// The spool directory and its policy. One per process, shared (`Arc`) by the SCP that
/// stores and the janitor that marks and removes, so that a directory removed by one is
/// never assumed to exist by the other.
#[derive(Debug)]
pub struct Spool {
    root: PathBuf,
    tmp: PathBuf,
    our_ae: String,
    duplicate_policy: DuplicatePolicy,
    /// Study and series directories whose entry in their parent this process has fsynced
    /// ([`Spool::make_dir_durable`]); a directory leaves it before it is removed.
    durable_dirs: Mutex<HashSet<PathBuf>>,
    /// Read by a store from making its directories durable until its file is linked in;
    /// written by a release or delete while it removes emptied directories. A store can
    /// therefore never see its directory vanish between creating it and using it.
    dir_lock: RwLock<()>,
    /// What every instance is received under (shared, so an [`Incoming`] stays small).
    limits: std::sync::Arc<ReceiveLimits>,
}

/// [`Spool::durable_dirs`] is cleared past this many entries (series directories are
/// released over time; a cleared one costs one more fsync when used again).
const DURABLE_DIRS_MAX: usize = 10_000;

/// How often a store retries when a concurrent release removed its directory between
/// creating and using it (each retry recreates it; two races in a row need two releases).
const DIR_RACE_RETRIES: usize = 5;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The options [`Spool::open`] takes from `[dicom]`.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub our_ae: String,
    pub min_free_mb: u64,
    pub max_instance_mb: u64,
    pub duplicate_policy: DuplicatePolicy,
}

impl SpoolOptions {
    /// Defaults for tools and tests: no free-space floor, 1 GiB instances, replace.
    pub fn new(our_ae: &str) -> SpoolOptions {
        SpoolOptions {
            our_ae: our_ae.to_string(),
            min_free_mb: 0,
            max_instance_mb: 1024,
            duplicate_policy: DuplicatePolicy::Replace,
        }
    }
}

impl Spool {
    /// Opens (creating if needed) the spool at `root` with default limits (see
    /// [`SpoolOptions::new`]) and the free-space floor `min_free_mb`.
    pub fn open(root: &Path, our_ae: &str, min_free_mb: u64) -> Result<Spool> {
        Spool::open_with(
            root,
            SpoolOptions {
                min_free_mb,
                ..SpoolOptions::new(our_ae)
            },
        )
    }

    /// Opens (creating if needed) the spool at `root`. Leftovers of interrupted receives
    /// in `.tmp/` are removed: they were never acknowledged.
    pub fn open_with(root: &Path, options: SpoolOptions) -> Result<Spool> {
        create_dir_all_durably(root)
            .with_context(|| format!("cannot create spool directory {}", root.display()))?;
        let tmp = root.join(TMP_DIR);
        if tmp.exists() {
            let mut removed = 0;
            for entry in
                fs::read_dir(&tmp).with_context(|| format!("cannot list {}", tmp.display()))?
            {
                let path = entry?.path();
                fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
                removed += 1;
            }
            if removed > 0 {
                log::info!(
                    "removed {removed} unfinished receive(s) from {}",
                    tmp.display()
                );
            }
        } else {
            fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            fsync_dir(root)?;
        }
        // Fail now, not at the first C-STORE, if the spool is not writable.
        let probe = tmp.join("write-probe");
        fs::File::create(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .with_context(|| format!("spool directory {} is not writable", root.display()))?;
        Ok(Spool {
            root: root.to_path_buf(),
            tmp,
            our_ae: options.our_ae,
            duplicate_policy: options.duplicate_policy,
            durable_dirs: Default::default(),
            dir_lock: RwLock::new(()),
            limits: std::sync::Arc::new(ReceiveLimits {
                max_bytes: options.max_instance_mb.saturating_mul(1 << 20),
                min_free_bytes: options.min_free_mb.saturating_mul(1 << 20),
                spool_root: root.to_path_buf(),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `Err` (with the numbers) when free space is below the configured floor.
    pub fn check_free_space(&self) -> Result<(), StoreError> {
        check_room(&self.limits, 0)
    }

    /// Starts receiving an instance: encodes the file meta group. The temp file is
    /// created only when the instance outgrows memory or is committed.
    pub fn begin(&self, header: InstanceHeader) -> Result<Incoming> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{}-{}.part", std::process::id(), n));
        let meta = file_meta(&header, &self.our_ae)?;
        let mut head = Vec::with_capacity(INITIAL_BUFFER);
        head.resize(128, 0);
        head.extend_from_slice(b"DICM");
        meta.write(&mut head)
            .map_err(|e| anyhow!("cannot encode file meta group: {e}"))?;
        Ok(Incoming::new(header, path, head, self.limits.clone()))
    }

    /// Makes a fully received instance durable (see the module docs), or refuses it.
    /// Blocking: call it off the async executor (`block_in_place` / `spawn_blocking`).
    pub fn commit(&self, mut incoming: Incoming) -> Result<Stored, StoreError> {
        let result = self.commit_inner(&mut incoming);
        // Whatever happened, the temp name goes: on success the data lives under its
        // final name (hard link or rename), on failure it was never acknowledged.
        let _ = fs::remove_file(incoming.tmp_path());
        result
    }

    fn commit_inner(&self, incoming: &mut Incoming) -> Result<Stored, StoreError> {
        let (info, received_at) = incoming.prepare()?;
        let series_dir = self
            .root
            .join(safe_name(&info.study_instance_uid))
            .join(safe_name(&info.series_instance_uid));
        let final_path = series_dir.join(format!("{}.dcm", safe_name(&info.sop_instance_uid)));
        let h = &incoming.header;
        let stored = StoredInstance {
            path: final_path.clone(),
            study_instance_uid: info.study_instance_uid,
            series_instance_uid: info.series_instance_uid,
            sop_instance_uid: info.sop_instance_uid,
            sop_class_uid: info.sop_class_uid,
            calling_ae: h.calling_ae.clone(),
            received_at: received_at.unwrap_or(h.received_at),
            arrival: Arrival::First,
        };
        let io = |what: &str, p: &Path, e: io::Error| {
            StoreError::OutOfResources(anyhow!("{what} {}: {e}", p.display()))
        };
        // fdatasync: the data and what is needed to read it back (size, extents); the
        // name is made durable by the directory fsync below.
        incoming
            .write_out()
            .map_err(|e| StoreError::OutOfResources(e.context("cannot write temp file")))?
            .sync_data()
            .map_err(|e| io("cannot fsync", &incoming.tmp_path, e))?;

        // No release removes a directory while we create and use it (see `dir_lock`).
        let _dirs = self.dir_lock.read().unwrap_or_else(|p| p.into_inner());
        for _ in 0..DIR_RACE_RETRIES {
            if final_path.exists() {
                return self.store_again(incoming, &series_dir, stored);
            }
            self.make_dir_durable(&series_dir)?;
            match fs::hard_link(incoming.tmp_path(), &final_path) {
                Ok(()) => {
                    fsync_dir(&series_dir).map_err(StoreError::OutOfResources)?;
                    return Ok(Stored::New(stored));
                }
                // Another association stored the same instance in the meantime.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return self.store_again(incoming, &series_dir, stored)
                }
                // The janitor removed the (emptied) directory after we made it durable:
                // make it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound && incoming.tmp_path().exists() => {
                    self.forget_dir(&series_dir);
                    continue;
                }
                Err(e) => return Err(io("cannot link into place", &final_path, e)),
            }
        }
        Err(StoreError::OutOfResources(anyhow!(
            "the series directory {} was removed {DIR_RACE_RETRIES} times while storing into it",
            series_dir.display()
        )))
    }

    /// The SOP Instance UID is already in the spool. Its data was fdatasynced before it
    /// was linked, but its name may not be durable yet (an earlier attempt answered A700
    /// after the link, or a run was killed before its directory fsync): Success only once
    /// it is. The same data set is a duplicate; another one follows the duplicate policy.
    fn store_again(
        &self,
        incoming: &Incoming,
        series_dir: &Path,
        mut stored: StoredInstance,
    ) -> Result<Stored, StoreError> {
        self.make_dir_durable(series_dir)?;
        let same = same_data_set(&stored.path, incoming.data_set()).map_err(|e| {
            StoreError::OutOfResources(e.context("cannot compare with the copy in the spool"))
        })?;
        if same {
            fsync_dir(series_dir).map_err(StoreError::OutOfResources)?;
            return Ok(Stored::Duplicate(stored));
        }
        match self.duplicate_policy {
            DuplicatePolicy::KeepFirst => {
                fsync_dir(series_dir).map_err(StoreError::OutOfResources)?;
                Ok(Stored::KeptFirst(stored))
            }
            DuplicatePolicy::Replace => {
                // The analysed mark must not cover the old version any more, or a restart
                // would take the new one as analysed: uncover it first (durably), then
                // replace. A crash in between analyses the old version again: safe.
                lifecycle::uncover(
                    &self.root,
                    &stored.study_instance_uid,
                    &stored.series_instance_uid,
                    &stored.sop_instance_uid,
                )
                .map_err(StoreError::OutOfResources)?;
                fs::rename(incoming.tmp_path(), &stored.path).map_err(|e| {
                    StoreError::OutOfResources(anyhow!(
                        "cannot replace {}: {e}",
                        stored.path.display()
                    ))
                })?;
                fsync_dir(series_dir).map_err(StoreError::OutOfResources)?;
                stored.arrival = Arrival::Correction;
                Ok(Stored::Replaced(stored))
            }
        }
    }

    /// Makes `dir` (below the root) and its parents up to the root exist durably: each is
    /// created if missing and its parent fsynced, once per directory per process, also
    /// when it was already there: another association may have created it and not yet
    /// fsynced its parent, or an earlier run may have died before it did. A parent removed
    /// meanwhile by a release is made again.
    fn make_dir_durable(&self, dir: &Path) -> Result<(), StoreError> {
        let dir_error = |e: anyhow::Error| {
            StoreError::OutOfResources(e.context("cannot make the series directory durable"))
        };
        for _ in 0..DIR_RACE_RETRIES {
            match self.make_dir_durable_once(dir) {
                Ok(()) => return Ok(()),
                Err(CreateDirError::ParentMissing { .. }) => {
                    // Released under us: nothing under the study is durable any more.
                    if let Some(study) = dir.parent() {
                        self.forget_dir(study);
                    }
                    continue;
                }
                Err(e) => return Err(dir_error(e.into())),
            }
        }
        Err(dir_error(anyhow!(
            "{} was removed {DIR_RACE_RETRIES} times while being created",
            dir.display()
        )))
    }

    fn make_dir_durable_once(&self, dir: &Path) -> Result<(), CreateDirError> {
        if self.durable_dirs().contains(dir) {
            return Ok(());
        }
        let parent = dir.parent().unwrap_or(&self.root);
        if parent != self.root && parent.starts_with(&self.root) {
            self.make_dir_durable_once(parent)?;
        }
        durable::create_dir_in(dir, parent)?;
        let mut known = self.durable_dirs();
        if known.len() >= DURABLE_DIRS_MAX {
            known.clear();
        }
        known.insert(dir.to_path_buf());
        Ok(())
    }

    /// `dir` and everything below it are no longer known to be durable (it is being, or
    /// was, removed).
    fn forget_dir(&self, dir: &Path) {
        self.durable_dirs().retain(|d| !d.starts_with(dir));
    }

    fn durable_dirs(&self) -> std::sync::MutexGuard<'_, HashSet<PathBuf>> {
        // Every mutation is a single insert/remove/retain: a poisoned set is still valid.
        self.durable_dirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes instance files of one series ([`lifecycle::release`]); its emptied
    /// directories are removed under `dir_lock` and forgotten as durable, so the next
    /// store into them creates them again.
    pub fn release(
        &self,
        study_uid: &str,
        series_uid: &str,
        paths: &[PathBuf],
        forget: bool,
    ) -> Result<usize> {
        let study_dir = self.root.join(safe_name(study_uid));
        lifecycle::release_with(&self.root, study_uid, series_uid, paths, forget, || {
            let guard = self.dir_lock.write().unwrap_or_else(|p| p.into_inner());
            self.forget_dir(&study_dir);
            guard
        })
    }

    /// Writes the analysed mark of a series ([`lifecycle::mark_analysed`]).
    pub fn mark_analysed(
        &self,
        study_uid: &str,
        series_uid: &str,
        result_id: &str,
        sop_instance_uids: &[String],
        analysed_at: OffsetDateTime,
    ) -> Result<Option<usize>> {
        lifecycle::mark_analysed(
            &self.root,
            study_uid,
            series_uid,
            result_id,
            sop_instance_uids,
            analysed_at,
        )
    }

    /// Deletes a series from the spool (call once its result is durable downstream).
    /// Returns how many instance files were removed.
    pub fn delete_series(&self, study_uid: &str, series_uid: &str) -> Result<usize> {
        let _dirs = self.dir_lock.write().unwrap_or_else(|p| p.into_inner());
        self.forget_dir(&self.root.join(safe_name(study_uid)));
        lifecycle::delete_series(&self.root, study_uid, series_uid)
    }

    #[cfg(test)]
    pub(super) fn known_durable(&self) -> HashSet<PathBuf> {
        self.durable_dirs().clone()
    }
}
