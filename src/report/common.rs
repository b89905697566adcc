//! What every result object shares: the patient and study modules copied from the source
//! series, a new series of the source study, equipment, SOP common, the references to the
//! source instances, and the Part 10 file (Explicit VR Little Endian).

use dicom_core::VR;
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::text::SpecificCharacterSet;
use dicom_object::meta::FileMetaTableBuilder;
use time::macros::format_description;
use time::OffsetDateTime;

use super::config::ReportConfig;
use super::dataset::{put_seq, put_str, sop_ref, Item};
use super::error::ReportError;
use super::object::{ResultObject, ResultObjectKind};
use super::uid::{instance_uid, series_uid, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};
use crate::result::{ResultMessage, SourceInstance, SourceStudy};

/// What names one object and its series.
#[derive(Debug, Clone)]
pub struct Identity {
    pub kind: ResultObjectKind,
    pub sop_class_uid: &'static str,
    pub modality: &'static str,
    /// (0020,0011) Series Number of the new series.
    pub series_number: i32,
    pub series_description: &'static str,
}

impl Identity {
    pub fn series_instance_uid(&self, result_id: &str) -> String {
        series_uid(result_id, self.kind)
    }

    pub fn sop_instance_uid(&self, result_id: &str) -> String {
        instance_uid(result_id, self.kind)
    }
}

/// Checks that the source carries what every object copies or references.
pub fn check_source(source: &SourceStudy) -> Result<(), ReportError> {
    if let Some(keyword) = source.over_limit.first() {
        return Err(ReportError::SourceValueTooLong(keyword.clone()));
    }
    if source.study_instance_uid.is_empty() {
        return Err(ReportError::MissingSource("Study Instance UID"));
    }
    if source.series_instance_uid.is_empty() {
        return Err(ReportError::MissingSource("Series Instance UID"));
    }
    if source.instances.is_empty() {
        return Err(ReportError::MissingSource("instances"));
    }
    Ok(())
}

/// The moment the objects describe: when inference ended (else when the series was
/// complete, else now), so that a rebuild of the same result writes the same dates.
pub fn content_moment(msg: &ResultMessage) -> OffsetDateTime {
    let t = &msg.result.timings;
    t.inference_end
        .or(t.series_complete)
        .unwrap_or_else(OffsetDateTime::now_utc)
        .to_offset(time::UtcOffset::UTC)
}

fn da(t: OffsetDateTime) -> String {
    t.format(format_description!("[year][month][day]"))
        .unwrap_or_default()
}

fn tm(t: OffsetDateTime) -> String {
    t.format(format_description!(
        "[hour][minute][second].[subsecond digits:6]"
    ))
    .unwrap_or_default()
}

/// Specific Character Set to write: the source's when every text we write is ASCII or
/// the source's single character set is one dicom-object encodes; else UTF-8 (ISO_IR 192),
/// which holds every decoded value.
fn character_set(source: &SourceStudy) -> Vec<String> {
    let texts = [
        &source.patient_name,
        &source.patient_id,
        &source.referring_physician_name,
        &source.study_description,
        &source.study_id,
        &source.accession_number,
    ];
    let ascii = texts.iter().all(|s| s.is_ascii());
    let known_single = source.specific_character_set.len() == 1
        && SpecificCharacterSet::from_code(&source.specific_character_set[0]).is_some();
    if ascii || known_single {
        source.specific_character_set.clone()
    } else {
        vec!["ISO_IR 192".to_owned()]
    }
}

/// A new data set with SOP Common, Patient, General Study, the new series (General
/// Series or its SR / KO specialisation), General Equipment and the instance's content
/// date and time.
pub fn base_dataset(id: &Identity, msg: &ResultMessage, cfg: &ReportConfig) -> Item {
    let s = &msg.source;
    let result_id = &msg.result.id;
    let when = content_moment(msg);
    let (date, time) = (da(when), tm(when));
    let mut obj = Item::new_empty();
    let charset = character_set(s);
    if !charset.is_empty() {
        put_str(
            &mut obj,
            tags::SPECIFIC_CHARACTER_SET,
            VR::CS,
            &charset.join("\\"),
        );
    }
    // SOP Common
    put_str(&mut obj, tags::SOP_CLASS_UID, VR::UI, id.sop_class_uid);
    put_str(
        &mut obj,
        tags::SOP_INSTANCE_UID,
        VR::UI,
        &id.sop_instance_uid(result_id),
    );
    put_str(&mut obj, tags::INSTANCE_CREATION_DATE, VR::DA, &date);
    put_str(&mut obj, tags::INSTANCE_CREATION_TIME, VR::TM, &time);
    put_str(&mut obj, tags::TIMEZONE_OFFSET_FROM_UTC, VR::SH, "+0000");
    // Patient (copied)
    put_str(&mut obj, tags::PATIENT_NAME, VR::PN, &s.patient_name);
    put_str(&mut obj, tags::PATIENT_ID, VR::LO, &s.patient_id);
    put_str(
        &mut obj,
        tags::PATIENT_BIRTH_DATE,
        VR::DA,
        &s.patient_birth_date,
    );
    put_str(&mut obj, tags::PATIENT_SEX, VR::CS, &s.patient_sex);
    // General Study (copied)
    put_str(
        &mut obj,
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        &s.study_instance_uid,
    );
    put_str(&mut obj, tags::STUDY_DATE, VR::DA, &s.study_date);
    put_str(&mut obj, tags::STUDY_TIME, VR::TM, &s.study_time);
    put_str(
        &mut obj,
        tags::REFERRING_PHYSICIAN_NAME,
        VR::PN,
        &s.referring_physician_name,
    );
    put_str(&mut obj, tags::STUDY_ID, VR::SH, &s.study_id);
    put_str(
        &mut obj,
        tags::ACCESSION_NUMBER,
        VR::SH,
        &s.accession_number,
    );
    if !s.study_description.is_empty() {
        put_str(
            &mut obj,
            tags::STUDY_DESCRIPTION,
            VR::LO,
            &s.study_description,
        );
    }
    // The new series
    put_str(&mut obj, tags::MODALITY, VR::CS, id.modality);
    put_str(
        &mut obj,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        &id.series_instance_uid(result_id),
    );
    put_str(
        &mut obj,
        tags::SERIES_NUMBER,
        VR::IS,
        &id.series_number.to_string(),
    );
    put_str(&mut obj, tags::SERIES_DATE, VR::DA, &date);
    put_str(&mut obj, tags::SERIES_TIME, VR::TM, &time);
    put_str(
        &mut obj,
        tags::SERIES_DESCRIPTION,
        VR::LO,
        id.series_description,
    );
    put_str(&mut obj, tags::INSTANCE_NUMBER, VR::IS, "1");
    put_str(&mut obj, tags::CONTENT_DATE, VR::DA, &date);
    put_str(&mut obj, tags::CONTENT_TIME, VR::TM, &time);
    // General Equipment
    put_str(&mut obj, tags::MANUFACTURER, VR::LO, &cfg.manufacturer);
    if let Some(institution) = &cfg.institution_name {
        put_str(&mut obj, tags::INSTITUTION_NAME, VR::LO, institution);
    }
    if let Some(station) = &cfg.station_name {
        put_str(&mut obj, tags::STATION_NAME, VR::SH, station);
    }
    put_str(
        &mut obj,
        tags::MANUFACTURER_MODEL_NAME,
        VR::LO,
        "cspine-triage",
    );
    let model = &msg.result.model;
    let software = [
        format!("cspine-triage {}", env!("CARGO_PKG_VERSION")),
        lo(&format!("{} {}", model.name, model.version)),
    ];
    put_str(
        &mut obj,
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        &software.join("\\"),
    );
    obj
}

/// `s` as an LO value: at most 64 characters, without the value separator.
pub fn lo(s: &str) -> String {
    s.replace('\\', "/").chars().take(64).collect()
}

/// One item of a Hierarchical SOP Instance Reference sequence (PS3.3 C.17.2.1): the
/// source study, its series and the given instances of it.
pub fn evidence(source: &SourceStudy, instances: &[&SourceInstance]) -> Item {
    let mut series = Item::new_empty();
    put_str(
        &mut series,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        &source.series_instance_uid,
    );
    put_seq(
        &mut series,
        tags::REFERENCED_SOP_SEQUENCE,
        instances
            .iter()
            .map(|i| sop_ref(&i.sop_class_uid, &i.sop_instance_uid))
            .collect(),
    );
    let mut study = Item::new_empty();
    put_str(
        &mut study,
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        &source.study_instance_uid,
    );
    put_seq(&mut study, tags::REFERENCED_SERIES_SEQUENCE, vec![series]);
    study
}

/// The Part 10 file of `obj` (Explicit VR Little Endian) as a [`ResultObject`].
pub fn finish(id: &Identity, msg: &ResultMessage, obj: Item) -> Result<ResultObject, ReportError> {
    let encode = |message: String| ReportError::Encode {
        kind: id.kind,
        message,
    };
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
                .implementation_version_name(IMPLEMENTATION_VERSION_NAME),
        )
        .map_err(|e| encode(e.to_string()))?;
    let mut part10 = Vec::new();
    file.write_all(&mut part10)
        .map_err(|e| encode(e.to_string()))?;
    let result_id = &msg.result.id;
    Ok(ResultObject {
        kind: id.kind,
        sop_class_uid: id.sop_class_uid.to_owned(),
        sop_instance_uid: id.sop_instance_uid(result_id),
        series_instance_uid: id.series_instance_uid(result_id),
        study_instance_uid: msg.source.study_instance_uid.clone(),
        part10,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(charset: &[&str], name: &str) -> SourceStudy {
        SourceStudy {
            patient_name: name.into(),
            specific_character_set: charset.iter().map(|s| s.to_string()).collect(),
            ..SourceStudy::default()
        }
    }

    #[test]
    fn the_source_character_set_is_kept_when_it_can_encode_the_values() {
        assert!(character_set(&source(&[], "Doe^Jane")).is_empty());
        assert_eq!(
            character_set(&source(&["ISO_IR 100"], "Müller")),
            ["ISO_IR 100"]
        );
        // ISO 2022 with code extensions and non-ASCII text: written as UTF-8 instead.
        assert_eq!(
            character_set(&source(&["", "ISO 2022 IR 87"], "山田^太郎")),
            ["ISO_IR 192"]
        );
        assert_eq!(
            character_set(&source(&["", "ISO 2022 IR 87"], "Yamada^Taro")),
            ["", "ISO 2022 IR 87"]
        );

        // dicom-object encodes the values in the character set written.
        let mut obj = Item::new_empty();
        put_str(&mut obj, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100");
        put_str(&mut obj, tags::SOP_CLASS_UID, VR::UI, "1.2.3");
        put_str(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.4");
        put_str(&mut obj, tags::PATIENT_NAME, VR::PN, "Müller^Jürgen");
        let id = Identity {
            kind: ResultObjectKind::StructuredReport,
            sop_class_uid: "1.2.3",
            modality: "SR",
            series_number: 1,
            series_description: "",
        };
        let msg = ResultMessage {
            result: serde_json::from_value(serde_json::json!({
                "schema": "", "id": "abc", "status": "negative", "study_instance_uid": "",
                "series_instance_uid": "", "instances": 0, "accession_number": "",
                "patient_ref": "", "vertebrae": {}, "patient": null, "key_slice": null,
                "model": {"name": "m", "version": "1", "sha256": ""}, "runtime": "cpu",
                "device": "", "site": "", "timings": {
                    "first_instance_received": null, "last_instance_received": null,
                    "series_complete": null, "inference_start": null, "inference_end": null,
                    "published": null }
            }))
            .unwrap(),
            patient_id: String::new(),
            key_image_png: None,
            sop_instance_uids: Vec::new(),
            failed_better: Vec::new(),
            source: SourceStudy::default(),
        };
        let file = finish(&id, &msg, obj).unwrap().part10;
        let latin1 = b"M\xfcller^J\xfcrgen";
        assert!(file.windows(latin1.len()).any(|w| w == latin1));
    }
}
