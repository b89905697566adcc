//! The durable spool: every instance we acknowledge is on disk first, and this module is
//! the one owner of the spool's files and directories over their whole life.
//!
//! Layout: `<spool>/<study uid>/<series uid>/<sop instance uid>.dcm` (Part 10 files; a
//! component that is not a clean UID is replaced by a hash, [`safe_name`]),
//! `<spool>/.tmp/` for instances being received, `<spool>/.rejected/` for files the
//! re-index could not read.
//!
//! The map:
//! - [`store`]: [`Spool`], receiving and committing an instance (the write protocol
//!   below), duplicates and corrected re-sends, the directory cache;
//! - [`incoming`]: an instance being received (memory, then a temp file; size and
//!   free-space limits per chunk);
//! - [`instance`]: the file meta group we write and what we read back from a file;
//! - [`request`]: what the SCP knows before the data set ([`InstanceHeader`]) and why an
//!   instance was not stored ([`StoreError`]);
//! - [`lifecycle`]: after the store: the analysed mark, release, re-index and recovery;
//! - [`janitor`]: the task that marks series whose result is committed and removes the
//!   files the assembler releases, through the same [`Spool`] the SCP stores with.
//!
//! Write protocol (what makes "Success" true after a crash or power loss):
//! 1. the data set is kept, exactly as received, behind our file meta group: in memory
//!    up to [`incoming::WRITE_CHUNK`] bytes, streamed into a temp file in `.tmp/` (same
//!    file system as the final place) beyond that; an instance over
//!    `dicom.max_instance_mb`, or a chunk that would leave less than
//!    `dicom.min_free_space_mb`, is refused (A700) and nothing of it is kept;
//! 2. the declared length of every element, sequence and item is checked against the
//!    bytes received ([`super::lengths`]: a lying length must not make the parse-back
//!    allocate gigabytes), then the data set is parsed back (from memory when it is
//!    there): an unreadable or mismatching data set is refused before anything more is
//!    written;
//! 3. the temp file is written (one write when it was held in memory), `fsync(file)`;
//!    missing directories are created and their parents fsynced;
//! 4. `link(temp, final)` (atomic, never overwrites), `fsync(final directory)`, then the
//!    temp name is removed. The same SOP Instance UID with the same data set is an
//!    idempotent duplicate; with a different data set, `dicom.duplicate_policy` decides
//!    (by default the newer replaces the older by an atomic rename, and the series is
//!    analysed again);
//! 5. only then does the SCP answer C-STORE Success.
//!
//! The calling AE and the receive time travel inside the file: Source Application Entity
//! Title (0002,0016) and Private Information (0002,0102) of the file meta group, so a
//! restart can rebuild every [`StoredInstance`] from the files alone ([`reindex`]).
//!
//! Life cycle after the store: once a result of a series is committed to the outbox, the
//! janitor writes the series' *analysed mark* (`<series dir>/.analysed.json`: the SOP
//! Instance UIDs analysed; [`mark_analysed`]) and keeps its instances, so that late
//! instances can be analysed together with the earlier ones. The assembler releases them
//! ([`Spool::release`]) when it forgets the study (`series.completed_retention_secs`);
//! an emptied series directory, and then its study directory, are removed. A directory
//! removed here is never assumed to exist again: the store recreates it (durably) when a
//! later instance of the study arrives, also one racing with the removal. After a
//! restart [`recover`] tells the instances covered by a mark (analysed: remembered, not
//! analysed again) from the others (to assemble: new series, and instances that arrived
//! after the mark). A series whose build began and never ended (the process was killed
//! while building it, e.g. out of memory) is counted durably ([`begin_attempt`]), so that
//! the assembler can publish it as failed instead of building it again on every restart.

pub mod incoming;
pub mod instance;
pub mod janitor;
pub mod lifecycle;
pub mod request;
pub mod store;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::syntax::is_valid_uid;
use super::StoredInstance;

pub use crate::durable::{create_dir_all_durably, free_space};
pub use incoming::Incoming;
pub use instance::PRIVATE_INFORMATION_CREATOR_UID;
pub use janitor::{keep_spool, MarkRequest, Release, StoodInFor};
pub use lifecycle::{
    begin_attempt, delete_series, end_attempt, mark_analysed, mark_committed, read_mark, recover,
    reindex, AnalysedMark, AnalysedSeries, Recovered,
};
pub use request::{InstanceHeader, StoreError};
pub use store::{DuplicatePolicy, Spool, SpoolOptions, Stored};

/// Instances being received.
const TMP_DIR: &str = ".tmp";
/// Files the re-index could not read, kept for a human.
const REJECTED_DIR: &str = ".rejected";
/// The analysed mark of a series, in its directory.
pub const MARK_FILE: &str = ".analysed.json";
const MARK_TMP: &str = ".analysed.json.tmp";
/// Builds of a series begun and not ended ([`lifecycle::begin_attempt`]), in its directory.
const ATTEMPTS_FILE: &str = ".attempts.json";
const ATTEMPTS_TMP: &str = ".attempts.json.tmp";

/// File-system-safe name for a UID: the UID itself when it is a clean UID, else a hash.
pub fn safe_name(uid: &str) -> String {
    if is_valid_uid(uid) {
        uid.to_string()
    } else {
        let digest = Sha256::digest(uid.as_bytes());
        format!("x{}", &hex::encode(digest)[..40])
    }
}

/// The directory of a series in the spool at `root`.
fn series_dir(root: &Path, study_uid: &str, series_uid: &str) -> PathBuf {
    root.join(safe_name(study_uid)).join(safe_name(series_uid))
}
