//! The analysed source series as result objects need it: the patient and study modules to
//! copy and the instances a report may reference ([`SourceStudy`]), captured from the
//! instance headers ([`super::header::PatientStudy`] is the part one header carries).
//!
//! Every value is peer-supplied and only bounded by the instance size, so each is kept only
//! up to [`MAX_SOURCE_VALUE_BYTES`] (far above any conformant value of these VRs); a longer
//! one is left out and its keyword listed in [`SourceStudy::over_limit`], so that a builder
//! refuses it instead of copying a truncated identifier.

use serde::{Deserialize, Serialize};

use super::header::{InstanceHeader, MAX_SOURCE_VALUE_BYTES, MAX_UID_BYTES};

/// One instance of the source series, as a reference to it names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInstance {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
}

/// The analysed source series: what the DICOM result objects copy (patient and study
/// modules) and reference (its instances). Values as received (trimmed of padding); empty
/// when absent. Taken from the series' first instance (instances of one series share
/// these modules); `instances` lists every instance, sorted by SOP Instance UID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStudy {
    pub patient_name: String,
    pub patient_id: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub study_instance_uid: String,
    pub study_date: String,
    pub study_time: String,
    pub accession_number: String,
    pub referring_physician_name: String,
    pub study_id: String,
    pub study_description: String,
    pub series_instance_uid: String,
    pub modality: String,
    /// (0008,0005) Specific Character Set of the source, all values; empty: the default
    /// repertoire.
    pub specific_character_set: Vec<String>,
    pub instances: Vec<SourceInstance>,
    /// Keywords of attributes whose source value was too long to keep (see the module
    /// doc): left out here, so a builder must refuse rather than copy them.
    pub over_limit: Vec<String>,
}

impl SourceStudy {
    /// Captures the source of a series from its instance headers (the first one for the
    /// patient and study modules). Empty for no headers.
    pub fn from_headers(headers: &[InstanceHeader]) -> SourceStudy {
        let Some(first) = headers.first() else {
            return SourceStudy::default();
        };
        let p = &first.patient_study;
        let mut over_limit = p.over_limit.clone();
        let mut keep = |keyword: &str, value: &str, max: usize| {
            if value.len() > max {
                over_limit.push(keyword.to_owned());
                String::new()
            } else {
                value.to_owned()
            }
        };
        let uid = MAX_UID_BYTES;
        let long = MAX_SOURCE_VALUE_BYTES;
        let patient_id = keep("PatientID", &first.patient_id, long);
        let study_instance_uid = keep("StudyInstanceUID", &first.study_instance_uid, uid);
        let accession_number = keep("AccessionNumber", &first.accession_number, long);
        let series_instance_uid = keep("SeriesInstanceUID", &first.series_instance_uid, uid);
        let modality = keep("Modality", &first.modality, long);
        let mut instances: Vec<SourceInstance> = Vec::with_capacity(headers.len());
        let mut long_uid = false;
        for h in headers {
            if h.sop_class_uid.len() > uid || h.sop_instance_uid.len() > uid {
                long_uid = true;
                continue;
            }
            instances.push(SourceInstance {
                sop_class_uid: h.sop_class_uid.clone(),
                sop_instance_uid: h.sop_instance_uid.clone(),
            });
        }
        if long_uid {
            over_limit.push("SOPInstanceUID".to_owned());
        }
        instances.sort_by(|a, b| a.sop_instance_uid.cmp(&b.sop_instance_uid));
        instances.dedup_by(|a, b| a.sop_instance_uid == b.sop_instance_uid);
        SourceStudy {
            patient_name: p.patient_name.clone(),
            patient_id,
            patient_birth_date: p.patient_birth_date.clone(),
            patient_sex: p.patient_sex.clone(),
            study_instance_uid,
            study_date: p.study_date.clone(),
            study_time: p.study_time.clone(),
            accession_number,
            referring_physician_name: p.referring_physician_name.clone(),
            study_id: p.study_id.clone(),
            study_description: p.study_description.clone(),
            series_instance_uid,
            modality,
            specific_character_set: p.specific_character_set.clone(),
            instances,
            over_limit,
        }
    }

    /// The SOP Class UID of instance `sop_instance_uid` of the series, if it is one.
    pub fn sop_class_of(&self, sop_instance_uid: &str) -> Option<&str> {
        self.instances
            .binary_search_by(|i| i.sop_instance_uid.as_str().cmp(sop_instance_uid))
            .ok()
            .map(|k| self.instances[k].sop_class_uid.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::header::{bounded, PatientStudy};

    fn header(sop: &str) -> InstanceHeader {
        InstanceHeader {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: sop.into(),
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: "1.2.3.4".into(),
            patient_id: "P1".into(),
            patient_study: PatientStudy {
                patient_name: "Doe^Jane".into(),
                ..PatientStudy::default()
            },
            ..InstanceHeader::default()
        }
    }

    #[test]
    fn source_is_the_first_header_and_every_instance_sorted() {
        let s = SourceStudy::from_headers(&[header("1.2.3.4.9"), header("1.2.3.4.1")]);
        assert_eq!(s.patient_name, "Doe^Jane");
        assert_eq!(s.patient_id, "P1");
        let sops: Vec<&str> = s
            .instances
            .iter()
            .map(|i| i.sop_instance_uid.as_str())
            .collect();
        assert_eq!(sops, ["1.2.3.4.1", "1.2.3.4.9"]);
        assert_eq!(
            s.sop_class_of("1.2.3.4.9"),
            Some("1.2.840.10008.5.1.4.1.1.2")
        );
        assert_eq!(s.sop_class_of("1.2.3.4.5"), None);
        assert!(s.over_limit.is_empty());
    }

    #[test]
    fn values_past_the_bound_are_left_out_and_named() {
        let mut h = header("1.2.3.4.1");
        h.patient_id = "9".repeat(MAX_SOURCE_VALUE_BYTES + 1);
        let mut long_sop = header(&format!("1.{}", "2".repeat(MAX_UID_BYTES)));
        long_sop.patient_id = h.patient_id.clone();
        let s = SourceStudy::from_headers(&[h, long_sop]);
        assert_eq!(s.patient_id, "");
        assert_eq!(s.instances.len(), 1);
        assert_eq!(s.over_limit, ["PatientID", "SOPInstanceUID"]);
        let mut over = Vec::new();
        let kept = bounded(
            Some("x".repeat(MAX_SOURCE_VALUE_BYTES + 1)),
            "PatientName",
            &mut over,
        );
        assert_eq!(
            (kept.as_str(), over.as_slice()),
            ("", ["PatientName".to_owned()].as_slice())
        );
    }
}
