//! `[report]`: which results get DICOM result objects for PACS, and what they say about
//! who made them.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use crate::result::Status;

/// Which results get DICOM result objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectSelection {
    /// Positive results only (the default): PACS sees the flagged studies.
    #[default]
    Positives,
    /// Every result, negative, indeterminate and failed ones included (each says so).
    All,
    /// None: nothing is built or sent to PACS.
    None,
}

impl ObjectSelection {
    /// Whether a result with this status gets objects.
    pub fn selects(self, status: Status) -> bool {
        match self {
            ObjectSelection::Positives => status == Status::Positive,
            ObjectSelection::All => true,
            ObjectSelection::None => false,
        }
    }
}

/// `[report]` section: the DICOM result objects built for PACS (see docs/ALERTS.md, "DICOM
/// results for PACS"). Every key is optional.
///
/// - `objects`: `"positives"` (default), `"all"` or `"none"`: which results get objects.
///   A selected result gets a Comprehensive SR (TID 1500) always, a Key Object Selection
///   when it has key slices, and a Secondary Capture of its key image when
///   `secondary_capture` is on and it has one.
/// - `secondary_capture`: `true` (default): also the key image, with "AI TRIAGE IMAGE -
///   NOT FOR DIAGNOSIS" burned in (Burned In Annotation = YES).
/// - `manufacturer`: (0008,0070) Manufacturer of the objects, default `"cspine-triage"`.
/// - `institution_name`: (0008,0080) Institution Name; unset (default): left out.
/// - `station_name`: (0008,1010) Station Name; unset (default): left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReportConfig {
    pub objects: ObjectSelection,
    pub secondary_capture: bool,
    pub manufacturer: String,
    pub institution_name: Option<String>,
    pub station_name: Option<String>,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig {
            objects: ObjectSelection::Positives,
            secondary_capture: true,
            manufacturer: "cspine-triage".into(),
            institution_name: None,
            station_name: None,
        }
    }
}

impl ReportConfig {
    /// Whether a result with this status gets objects.
    pub fn selects(&self, status: Status) -> bool {
        self.objects.selects(status)
    }

    pub fn validate(&self) -> Result<()> {
        // LO is 64 characters, SH 16; no backslash (value separator) or control characters.
        for (key, value, max) in [
            ("report.manufacturer", Some(&self.manufacturer), 64),
            (
                "report.institution_name",
                self.institution_name.as_ref(),
                64,
            ),
            ("report.station_name", self.station_name.as_ref(), 16),
        ] {
            if let Some(value) = value {
                ensure!(
                    value.chars().count() <= max
                        && !value.contains('\\')
                        && !value.chars().any(char::is_control),
                    "{key} must be at most {max} characters, without '\\' or control \
                     characters, got {value:?}"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_select_positives_and_parse_from_toml() {
        let c = ReportConfig::default();
        c.validate().unwrap();
        assert!(c.selects(Status::Positive));
        assert!(!c.selects(Status::Negative));
        let all: ReportConfig = toml::from_str("objects = \"all\"").unwrap();
        assert!(Status::ALL.iter().all(|&s| all.selects(s)));
        let none: ReportConfig =
            toml::from_str("objects = \"none\"\nsecondary_capture = false").unwrap();
        assert!(Status::ALL.iter().all(|&s| !none.selects(s)));
        assert!(toml::from_str::<ReportConfig>("objects = \"some\"").is_err());
        let long = ReportConfig {
            station_name: Some("x".repeat(17)),
            ..ReportConfig::default()
        };
        assert!(long.validate().is_err());
    }
}
