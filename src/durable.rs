//! Durable file-system steps shared by the two stores that promise "nothing acknowledged
//! is lost": the DICOM spool ([`crate::dicom::spool`]) and the alert outbox
//! ([`crate::alert::outbox`]).
//!
//! Each helper does one step of a crash-safe protocol and says which `fsync`s make it
//! durable: a file's data is durable after its own `fsync`, its *name* only after its
//! directory's, and a new directory's name only after its parent's. `tests/reliability/power_cut.py`
//! (a real power cut under qemu) found each of the missing directory fsyncs once.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// `fsync` of a directory: makes the names created, renamed or removed in it durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))
}

/// Creates `dir` and any missing ancestors (like `fs::create_dir_all`) and makes each
/// one's entry in its parent durable: the parent of every directory created here is
/// fsynced, and so is the parent of `dir` when `dir` already existed (an earlier run may
/// have died between its mkdir and that fsync). Without this, everything later made
/// durable *inside* `dir` is lost with `dir` itself at a power cut.
pub fn create_dir_all_durably(dir: &Path) -> Result<()> {
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
        return fsync_dir(&parent_of(dir));
    }
    for d in missing.into_iter().rev() {
        create_dir_in(d, &parent_of(d))?;
    }
    Ok(())
}

/// Why [`create_dir_in`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateDirError {
    /// The parent is gone (removed by a concurrent clean-up): the caller may recreate it.
    #[error("cannot create {dir}: its parent directory does not exist")]
    ParentMissing { dir: PathBuf },
    #[error("cannot create {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
    #[error(transparent)]
    Sync(anyhow::Error),
}

/// Creates `dir` (or finds it already there) and makes its entry in `parent` durable.
pub fn create_dir_in(dir: &Path, parent: &Path) -> Result<(), CreateDirError> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CreateDirError::ParentMissing {
                dir: dir.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(CreateDirError::Io {
                dir: dir.to_path_buf(),
                source,
            })
        }
    }
    fsync_dir(parent).map_err(CreateDirError::Sync)
}

/// Replaces (or creates) `dir/name` atomically and durably: a temp file `dir/tmp_name`
/// written and fsynced, renamed over `name`, then `dir` fsynced. A crash leaves either the
/// old content or the new one, never a mix; the temp file is removed on error.
pub fn write_atomically(dir: &Path, name: &str, tmp_name: &str, parts: &[&[u8]]) -> Result<()> {
    let tmp = dir.join(tmp_name);
    let path = dir.join(name);
    let write = || -> io::Result<()> {
        let mut file = File::create(&tmp)?;
        for part in parts {
            file.write_all(part)?;
        }
        file.sync_all()?;
        fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    fsync_dir(dir)
}

/// Moves a damaged file into `quarantine_dir` (created if needed) for a human, under its
/// own name or, when that is taken, `name.1`, `name.2`, ...: a quarantined file is never
/// overwritten. Both directories are fsynced. Returns where the file now is.
pub fn quarantine(path: &Path, quarantine_dir: &Path) -> Result<PathBuf> {
    create_dir_all_durably(quarantine_dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut dest = quarantine_dir.join(&*name);
    let mut n = 1;
    while dest.exists() {
        dest = quarantine_dir.join(format!("{name}.{n}"));
        n += 1;
        if n > 100_000 {
            bail!(
                "{} holds too many copies of {name}",
                quarantine_dir.display()
            );
        }
    }
    fs::rename(path, &dest)
        .with_context(|| format!("cannot move {} to {}", path.display(), dest.display()))?;
    fsync_dir(quarantine_dir)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        for content in ["a", "b", "c"] {
            let f = dir.path().join("bad.entry");
            fs::write(&f, content).unwrap();
            quarantine(&f, &q).unwrap();
        }
        let mut names: Vec<String> = fs::read_dir(&q)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["bad.entry", "bad.entry.1", "bad.entry.2"]);
        assert_eq!(fs::read_to_string(q.join("bad.entry")).unwrap(), "a");
    }

    #[test]
    fn create_dir_in_a_removed_parent_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("gone");
        let err = create_dir_in(&parent.join("x"), &parent).unwrap_err();
        assert!(matches!(err, CreateDirError::ParentMissing { .. }));
    }

    #[test]
    fn write_atomically_replaces() {
        let dir = tempfile::tempdir().unwrap();
        write_atomically(dir.path(), "m.json", "m.json.tmp", &[b"1"]).unwrap();
        write_atomically(dir.path(), "m.json", "m.json.tmp", &[b"2", b"3"]).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join("m.json")).unwrap(), "23");
        assert!(!dir.path().join("m.json.tmp").exists());
    }
}
