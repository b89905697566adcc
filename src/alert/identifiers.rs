//! Which DICOM identifiers a published result carries, and in what form
//! (`[alert.identifiers]`).
//!
//! A result names its study and series by their UIDs, the order by its accession number
//! and the key slices by their SOP Instance UIDs. Each of these four fields is published
//! per [`Publication`]: `clear` (as received, the default: today's payload), `hmac` (the
//! same keyed hash as `patient_ref`: HMAC-SHA256 with the site key, 64 lowercase hex
//! digits, stable on this box; empty stays empty) or `omit` (the field is left out).
//! The outbox holds what is published, so nothing in it is clearer than on the broker.
//! Everything here acts on the published document only: the rest of the daemon (spool,
//! committed marks, logs on the box) keeps the identifiers as received.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::patient_ref::HmacKey;
use crate::result::TriageResult;

/// How one identifier field is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Publication {
    /// As received (default).
    #[default]
    Clear,
    /// HMAC-SHA256 with the site key (`alert.patient_ref_key_file`), lowercase hex.
    Hmac,
    /// Left out of the result.
    Omit,
}

/// `[alert.identifiers]`: the publication of each identifier field of a result. Every key
/// defaults to `clear`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentifierConfig {
    /// `accession_number`.
    pub accession_number: Publication,
    /// `study_instance_uid`.
    pub study_instance_uid: Publication,
    /// `series_instance_uid`.
    pub series_instance_uid: Publication,
    /// `sop_instance_uid` of `key_slice` and of `vertebrae.<C1..C7>.key_slice`.
    pub sop_instance_uid: Publication,
}

impl IdentifierConfig {
    fn modes(&self) -> [Publication; 4] {
        [
            self.accession_number,
            self.study_instance_uid,
            self.series_instance_uid,
            self.sop_instance_uid,
        ]
    }

    /// Whether any field is hashed (the site key is needed).
    pub fn needs_key(&self) -> bool {
        self.modes().contains(&Publication::Hmac)
    }

    fn omits_any(&self) -> bool {
        self.modes().contains(&Publication::Omit)
    }
}

/// [`IdentifierConfig`] with its key loaded: turns a result into its published JSON.
#[derive(Debug, Clone)]
pub struct Identifiers {
    config: IdentifierConfig,
    /// Loaded only when some field is `hmac`.
    key: Option<HmacKey>,
}

impl Identifiers {
    /// Loads the key (see [`HmacKey::load`]) only when some field is `hmac`.
    pub fn load(
        config: IdentifierConfig,
        key_file: Option<&Path>,
        default_key_file: &Path,
    ) -> Result<Identifiers> {
        let key = if config.needs_key() {
            Some(HmacKey::load(key_file, default_key_file)?)
        } else {
            None
        };
        Ok(Identifiers { config, key })
    }

    /// With every field `clear`: the result is published as it is.
    pub fn clear() -> Identifiers {
        Identifiers {
            config: IdentifierConfig::default(),
            key: None,
        }
    }

    /// With the key given (tests, and callers that hold the key already).
    pub fn with_key(config: IdentifierConfig, key: HmacKey) -> Identifiers {
        Identifiers {
            config,
            key: Some(key),
        }
    }

    /// The published JSON of `result`. With every field `clear` (the default) it is
    /// exactly `serde_json::to_vec(result)`; with `omit` fields the remaining keys come in
    /// name order (JSON objects are unordered).
    pub fn to_json(&self, result: &TriageResult) -> Vec<u8> {
        let mut result = result.clone();
        let hash = |mode: Publication, value: &mut String| {
            if mode == Publication::Hmac && !value.is_empty() {
                let key = self
                    .key
                    .as_ref()
                    .expect("Identifiers::load loads a key for hmac");
                *value = key.hex_digest(value);
            }
        };
        let c = self.config;
        hash(c.accession_number, &mut result.accession_number);
        hash(c.study_instance_uid, &mut result.study_instance_uid);
        hash(c.series_instance_uid, &mut result.series_instance_uid);
        let vertebra_slices = result
            .vertebrae
            .values_mut()
            .filter_map(|v| v.key_slice.as_mut());
        for slice in result.key_slice.iter_mut().chain(vertebra_slices) {
            hash(c.sop_instance_uid, &mut slice.sop_instance_uid);
        }
        if !c.omits_any() {
            return serde_json::to_vec(&result).expect("a TriageResult always serialises");
        }

        let mut doc = serde_json::to_value(&result).expect("a TriageResult always serialises");
        let top = doc
            .as_object_mut()
            .expect("a TriageResult is a JSON object");
        for (mode, field) in [
            (c.accession_number, "accession_number"),
            (c.study_instance_uid, "study_instance_uid"),
            (c.series_instance_uid, "series_instance_uid"),
        ] {
            if mode == Publication::Omit {
                top.remove(field);
            }
        }
        if c.sop_instance_uid == Publication::Omit {
            let drop_uid = |slice: Option<&mut serde_json::Value>| {
                if let Some(slice) = slice.and_then(serde_json::Value::as_object_mut) {
                    slice.remove("sop_instance_uid");
                }
            };
            drop_uid(top.get_mut("key_slice"));
            if let Some(vertebrae) = top.get_mut("vertebrae").and_then(|v| v.as_object_mut()) {
                for vertebra in vertebrae.values_mut() {
                    drop_uid(vertebra.get_mut("key_slice"));
                }
            }
        }
        serde_json::to_vec(&doc).expect("a JSON value always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::{KeySlice, ModelInfo, Status, Timings, VertebraResult};

    fn result() -> TriageResult {
        let slice = KeySlice {
            sop_instance_uid: "1.2.3.4.5".into(),
            z_mm: -10.0,
        };
        TriageResult {
            schema: crate::result::SCHEMA_V1.into(),
            id: "abc".into(),
            status: Status::Positive,
            reason: None,
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: "1.2.3.4".into(),
            instances: 2,
            interpolated_gaps: None,
            accession_number: String::new(),
            patient_ref: String::new(),
            vertebrae: [(
                "C2".to_owned(),
                VertebraResult {
                    probability: 0.9,
                    flagged: true,
                    z_range_mm: Some([-20.0, 0.0]),
                    key_slice: Some(slice.clone()),
                },
            )]
            .into(),
            not_covered: Some(Vec::new()),
            patient: None,
            key_slice: Some(slice),
            model: ModelInfo {
                name: "m".into(),
                version: "1".into(),
                sha256: "00".repeat(32),
            },
            runtime: "cpu".into(),
            device: "d".into(),
            site: "s".into(),
            timings: Timings::default(),
            dicom_objects: Vec::new(),
        }
    }

    fn all(mode: Publication) -> IdentifierConfig {
        IdentifierConfig {
            accession_number: mode,
            study_instance_uid: mode,
            series_instance_uid: mode,
            sop_instance_uid: mode,
        }
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn clear_is_the_result_as_it_is() {
        let r = result();
        assert_eq!(
            Identifiers::clear().to_json(&r),
            serde_json::to_vec(&r).unwrap()
        );
        let config: IdentifierConfig = toml::from_str("").unwrap();
        assert_eq!(config, IdentifierConfig::default());
        assert!(!config.needs_key());
    }

    #[test]
    fn hmac_hashes_each_field_with_the_site_key_and_keeps_empty_ones_empty() {
        let key = HmacKey::new(b"0123456789abcdef".to_vec());
        let doc =
            json(&Identifiers::with_key(all(Publication::Hmac), key.clone()).to_json(&result()));
        assert_eq!(doc["study_instance_uid"], key.hex_digest("1.2.3"));
        assert_eq!(doc["series_instance_uid"], key.hex_digest("1.2.3.4"));
        assert_eq!(
            doc["key_slice"]["sop_instance_uid"],
            key.hex_digest("1.2.3.4.5")
        );
        assert_eq!(
            doc["vertebrae"]["C2"]["key_slice"]["sop_instance_uid"],
            key.hex_digest("1.2.3.4.5")
        );
        assert_eq!(doc["accession_number"], "");
        assert_eq!(doc["id"], "abc", "the id is not an identifier field");
    }

    #[test]
    fn omit_leaves_only_the_chosen_fields_out() {
        let config = IdentifierConfig {
            study_instance_uid: Publication::Omit,
            sop_instance_uid: Publication::Omit,
            ..IdentifierConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let ids = Identifiers::load(config, None, &dir.path().join("k")).unwrap();
        assert!(
            !dir.path().join("k").exists(),
            "no key is made for clear and omit"
        );
        let doc = json(&ids.to_json(&result()));
        assert!(doc.get("study_instance_uid").is_none());
        assert_eq!(doc["series_instance_uid"], "1.2.3.4");
        assert_eq!(doc["accession_number"], "");
        assert_eq!(doc["key_slice"], serde_json::json!({ "z_mm": -10.0 }));
        assert_eq!(
            doc["vertebrae"]["C2"]["key_slice"],
            serde_json::json!({ "z_mm": -10.0 })
        );
    }
}
