//! A small tmpfs to fill up ([`Tmpfs`], [`fill_up`]): a real ENOSPC, where this process
//! may mount one.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on the spool directory, unmounted on drop.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// `Err(why)` where this process cannot mount (not root, no CAP_SYS_ADMIN, a container
    /// without mount rights).
    pub fn mount(dir: &Path, mib: u64) -> Result<Tmpfs, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not running as root".into());
        }
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// [`Tmpfs::mount`], or `None` after printing `SKIPPED <what>: <why>` (the test then
    /// returns: it needs a tmpfs).
    pub fn mount_or_skip(dir: &Path, mib: u64, what: &str) -> Option<Tmpfs> {
        Tmpfs::mount(dir, mib)
            .inspect_err(|why| eprintln!("SKIPPED {what}: {why}"))
            .ok()
    }

    pub fn free_bytes(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.dir).unwrap();
        st.blocks_available() as u64 * st.fragment_size() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Fills the file system of `dir` (a small tmpfs) with `dir/.filler` until a write fails
/// with ENOSPC: not one page is left for anyone else.
pub fn fill_up(dir: &Path) -> PathBuf {
    use std::io::Write;
    let filler = dir.join(".filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    for size in [1 << 16, 1 << 12, 1] {
        let chunk = vec![0x5a_u8; size];
        loop {
            match f.write(&chunk) {
                Ok(n) if n == chunk.len() => {}
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", dir.display()),
            }
        }
    }
    filler
}
