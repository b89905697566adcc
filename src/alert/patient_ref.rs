//! `patient_ref`: the patient reference put into published results.
//!
//! By default the DICOM Patient ID (0010,0020) never leaves the box: results carry
//! HMAC-SHA256(key, Patient ID) in lowercase hex, so a dashboard can group results of one
//! patient without learning who it is, and nobody without the key can test a guessed ID.
//! The key lives in a file (`alert.patient_ref_key_file`); when none is configured one is
//! generated on first start next to the outbox and kept, so references stay stable across
//! restarts. `patient_ref = "raw"` publishes the Patient ID itself (for sites whose broker
//! is inside the clinical network and whose dashboards need it).
//!
//! The same key ([`HmacKey`]) hashes the identifiers that `[alert.identifiers]` publishes
//! as `hmac` (see [`super::identifiers`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// How `patient_ref` is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatientRefMode {
    /// HMAC-SHA256 of the Patient ID with the site key (default).
    #[default]
    Pseudonymised,
    /// The Patient ID as received.
    Raw,
}

/// Minimum key length accepted from a key file.
const MIN_KEY_BYTES: usize = 16;

/// The site's HMAC key: keyed hashes of identifiers that stay stable on this box.
#[derive(Clone)]
pub struct HmacKey(Vec<u8>);

impl std::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.write_str("HmacKey(<redacted>)")
    }
}

impl HmacKey {
    pub fn new(key: Vec<u8>) -> HmacKey {
        HmacKey(key)
    }

    /// Loads the key from `key_file`, or from `default_key_file`, which is created with a
    /// fresh random key (mode 0600) if it does not exist yet.
    pub fn load(key_file: Option<&Path>, default_key_file: &Path) -> Result<HmacKey> {
        let key = match key_file {
            Some(path) => read_key(path)?,
            None if default_key_file.exists() => read_key(default_key_file)?,
            None => {
                generate_key(default_key_file)?;
                log::info!(
                    "generated the HMAC key {} for patient_ref and hashed identifiers (keep \
                     it with the box's backups: without it new results get different values)",
                    default_key_file.display()
                );
                read_key(default_key_file)?
            }
        };
        Ok(HmacKey(key))
    }

    /// HMAC-SHA256 of `value`, lowercase hex (64 digits).
    pub fn hex_digest(&self, value: &str) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(value.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// Turns Patient IDs into `patient_ref` values.
#[derive(Debug, Clone)]
pub struct PatientRefs {
    mode: PatientRefMode,
    key: HmacKey,
}

impl PatientRefs {
    pub fn raw() -> PatientRefs {
        PatientRefs {
            mode: PatientRefMode::Raw,
            key: HmacKey(Vec::new()),
        }
    }

    pub fn with_key(key: Vec<u8>) -> PatientRefs {
        PatientRefs {
            mode: PatientRefMode::Pseudonymised,
            key: HmacKey(key),
        }
    }

    /// Raw mode needs no key; pseudonymised mode loads it with [`HmacKey::load`].
    pub fn load(
        mode: PatientRefMode,
        key_file: Option<&Path>,
        default_key_file: &Path,
    ) -> Result<PatientRefs> {
        Ok(match mode {
            PatientRefMode::Raw => PatientRefs::raw(),
            PatientRefMode::Pseudonymised => PatientRefs {
                mode,
                key: HmacKey::load(key_file, default_key_file)?,
            },
        })
    }

    /// The `patient_ref` for a Patient ID. An empty Patient ID gives an empty reference
    /// (hashing it would make every anonymous patient look like the same person).
    pub fn reference(&self, patient_id: &str) -> String {
        let patient_id = patient_id.trim();
        if patient_id.is_empty() {
            return String::new();
        }
        match self.mode {
            PatientRefMode::Raw => patient_id.to_owned(),
            PatientRefMode::Pseudonymised => self.key.hex_digest(patient_id),
        }
    }
}

fn read_key(path: &Path) -> Result<Vec<u8>> {
    let text = fs::read(path)
        .with_context(|| format!("cannot read the patient_ref key file {}", path.display()))?;
    let key = text.trim_ascii().to_vec();
    ensure!(
        key.len() >= MIN_KEY_BYTES,
        "patient_ref key file {} holds {} bytes, at least {MIN_KEY_BYTES} are needed \
         (e.g. `openssl rand -hex 32 > {}`)",
        path.display(),
        key.len(),
        path.display()
    );
    Ok(key)
}

/// 32 random bytes as hex, written atomically with mode 0600.
fn generate_key(path: &Path) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir: PathBuf = dir.map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(file, "{}", hex::encode(key))?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(&dir)?.sync_all()
    };
    write().with_context(|| format!("cannot create the patient_ref key file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonymised_refs_are_keyed_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("patient-ref.key");
        let refs = PatientRefs::load(PatientRefMode::Pseudonymised, None, &default).unwrap();
        let r1 = refs.reference("12345");
        assert_eq!(r1.len(), 64);
        assert!(!r1.contains("12345"));
        // Same key file on the next start: same reference.
        let again = PatientRefs::load(PatientRefMode::Pseudonymised, None, &default).unwrap();
        assert_eq!(again.reference("12345"), r1);
        // Another key: another reference.
        let other = PatientRefs::with_key(b"another key of enough bytes".to_vec());
        assert_ne!(other.reference("12345"), r1);
        assert_eq!(refs.reference("  "), "");
        let mode = fs::metadata(&default).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        // Key "Jefe", data "what do ya want for nothing?" (RFC 4231, test case 2).
        let refs = PatientRefs::with_key(b"Jefe".to_vec());
        assert_eq!(
            refs.reference("what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn raw_mode_and_short_keys() {
        assert_eq!(PatientRefs::raw().reference("PID-7"), "PID-7");
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short.key");
        fs::write(&short, "abc\n").unwrap();
        let err =
            PatientRefs::load(PatientRefMode::Pseudonymised, Some(&short), &short).unwrap_err();
        assert!(format!("{err:#}").contains("at least 16"), "{err:#}");
    }
}
