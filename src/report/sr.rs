//! The structured report of a result: an Imaging Measurement Report (TID 1500).
//!
//! SOP class: Comprehensive SR. TID 1500 allows Enhanced SR or Comprehensive SR; neither
//! coordinates (which would need Comprehensive) nor anything Enhanced-only is used, and
//! Comprehensive SR is the one PACS and viewers most widely store and render.
//!
//! Content: the language, the device observer (the model), the procedure reported, the
//! algorithm identification (TID 4019: name, version, sha256 as parameters), the image
//! library (the key slices), one measurement group per vertebra C1-C7 (probability,
//! flagged, its key slice) and one for the patient-level finding, and the qualitative
//! evaluations: the triage status, the reason for an indeterminate or failed result, and
//! "Triage aid, not for diagnosis; model trained on synthetic data."

use dicom_core::VR;
use dicom_dictionary_std::{tags, uids};

use super::common::{base_dataset, evidence, finish, Identity};
use super::config::ReportConfig;
use super::dataset::{
    code, coded, container, image, num, put_root, put_seq, put_str, text, uidref, Code, Item, Rel,
    PRIVATE_SCHEME,
};
use super::error::ReportError;
use super::object::{ResultObject, ResultObjectKind};
use super::uid::{derived_uid, uid_from};
use crate::result::{ResultMessage, Status};

/// The disclaimer every report carries.
pub const DISCLAIMER: &str = "Triage aid, not for diagnosis; model trained on synthetic data.";

pub const IDENTITY: Identity = Identity {
    kind: ResultObjectKind::StructuredReport,
    sop_class_uid: uids::COMPREHENSIVE_SR_STORAGE,
    modality: "SR",
    series_number: 9901,
    series_description: "AI triage report (not for diagnosis)",
};

const REPORT: Code = code("126000", "DCM", "Imaging Measurement Report");
const LANGUAGE: Code = code("121049", "DCM", "Language of Content Item and Descendants");
const EN_US: Code = code("en-US", "RFC5646", "English (United States)");
const OBSERVER_TYPE: Code = code("121005", "DCM", "Observer Type");
const DEVICE: Code = code("121007", "DCM", "Device");
const DEVICE_UID: Code = code("121012", "DCM", "Device Observer UID");
const DEVICE_NAME: Code = code("121013", "DCM", "Device Observer Name");
const DEVICE_MANUFACTURER: Code = code("121014", "DCM", "Device Observer Manufacturer");
const DEVICE_MODEL: Code = code("121015", "DCM", "Device Observer Model Name");
const PROCEDURE_REPORTED: Code = code("121058", "DCM", "Procedure reported");
const CT: Code = code("77477000", "SCT", "Computed tomography");
const ALGORITHM_NAME: Code = code("111001", "DCM", "Algorithm Name");
const ALGORITHM_VERSION: Code = code("111003", "DCM", "Algorithm Version");
const ALGORITHM_PARAMETERS: Code = code("111002", "DCM", "Algorithm Parameters");
const IMAGE_LIBRARY: Code = code("111028", "DCM", "Image Library");
const IMAGE_LIBRARY_GROUP: Code = code("126200", "DCM", "Image Library Group");
const MEASUREMENTS: Code = code("126010", "DCM", "Imaging Measurements");
const MEASUREMENT_GROUP: Code = code("125007", "DCM", "Measurement Group");
const TRACKING_ID: Code = code("112039", "DCM", "Tracking Identifier");
const TRACKING_UID: Code = code("112040", "DCM", "Tracking Unique Identifier");
const FINDING: Code = code("121071", "DCM", "Finding");
const FRACTURE: Code = code("72704001", "SCT", "Fracture");
const FINDING_SITE: Code = code("363698007", "SCT", "Finding Site");
const CERVICAL_SPINE: Code = code("122494005", "SCT", "Cervical spine");
const PROBABILITY: Code = code("122157", "DCM", "Probability");
const NO_UNITS: Code = code("1", "UCUM", "no units");
const SOURCE: Code = code("121112", "DCM", "Source of Measurement");
const QUALITATIVE: Code = code("126011", "DCM", "Qualitative Evaluations");
const COMMENT: Code = code("121106", "DCM", "Comment");
const YES: Code = code("373066001", "SCT", "Yes");
const NO: Code = code("373067005", "SCT", "No");
const FLAGGED: Code = code("FLAGGED", PRIVATE_SCHEME, "Flagged by triage model");
const THRESHOLD: Code = code("THRESHOLD", PRIVATE_SCHEME, "Decision threshold");
const STATUS: Code = code("STATUS", PRIVATE_SCHEME, "Triage status");
const REASON: Code = code("REASON", PRIVATE_SCHEME, "Reason");
const KEY_SLICE: Code = code("KEY_SLICE", PRIVATE_SCHEME, "Key slice");

/// C1..C7 and their SNOMED CT codes (DICOM CID 7151).
const VERTEBRAE: [(&str, Code); 7] = [
    ("C1", code("14806007", "SCT", "C1 vertebra")),
    ("C2", code("39976000", "SCT", "C2 vertebra")),
    ("C3", code("113205007", "SCT", "C3 vertebra")),
    ("C4", code("5329002", "SCT", "C4 vertebra")),
    ("C5", code("36978003", "SCT", "C5 vertebra")),
    ("C6", code("36054005", "SCT", "C6 vertebra")),
    ("C7", code("87391001", "SCT", "C7 vertebra")),
];

fn yes_no(flag: bool) -> Code {
    if flag {
        YES
    } else {
        NO
    }
}

/// The key slices a result names (overall first, then per vertebra), without repeats.
pub fn key_slices(msg: &ResultMessage) -> Vec<&str> {
    let r = &msg.result;
    let mut out: Vec<&str> = Vec::new();
    let all = r
        .key_slice
        .iter()
        .chain(r.vertebrae.values().filter_map(|v| v.key_slice.as_ref()));
    for k in all {
        if !out.contains(&k.sop_instance_uid.as_str()) {
            out.push(&k.sop_instance_uid);
        }
    }
    out
}

/// An IMAGE item of source instance `sop`, which must be in the source series.
fn source_image(msg: &ResultMessage, name: Option<Code>, sop: &str) -> Result<Item, ReportError> {
    let class = msg
        .source
        .sop_class_of(sop)
        .ok_or_else(|| ReportError::UnknownKeySlice(sop.to_owned()))?;
    Ok(image(Rel::Contains, name, class, sop))
}

/// Builds the structured report of `msg` (its source checked by the caller).
pub fn build(msg: &ResultMessage, cfg: &ReportConfig) -> Result<ResultObject, ReportError> {
    let r = &msg.result;
    let mut content = vec![
        coded(Rel::HasConceptMod, LANGUAGE, EN_US),
        coded(Rel::HasObsContext, OBSERVER_TYPE, DEVICE),
        uidref(
            Rel::HasObsContext,
            DEVICE_UID,
            &uid_from(&format!("model/{}", r.model.sha256)),
        ),
        text(Rel::HasObsContext, DEVICE_NAME, &r.model.name),
        text(Rel::HasObsContext, DEVICE_MANUFACTURER, &cfg.manufacturer),
        text(
            Rel::HasObsContext,
            DEVICE_MODEL,
            &format!("{} {}", r.model.name, r.model.version),
        ),
        coded(Rel::HasConceptMod, PROCEDURE_REPORTED, CT),
        text(Rel::HasConceptMod, ALGORITHM_NAME, &r.model.name),
        text(Rel::HasConceptMod, ALGORITHM_VERSION, &r.model.version),
        text(
            Rel::HasConceptMod,
            ALGORITHM_PARAMETERS,
            &format!("sha256={}", r.model.sha256),
        ),
    ];

    let keys = key_slices(msg);
    let library: Vec<Item> = keys
        .iter()
        .map(|sop| source_image(msg, None, sop))
        .collect::<Result<_, _>>()?;
    let group = if library.is_empty() {
        vec![]
    } else {
        vec![container(Rel::Contains, IMAGE_LIBRARY_GROUP, library)]
    };
    content.push(container(Rel::Contains, IMAGE_LIBRARY, group));

    let mut measurements = Vec::new();
    for (name, site) in VERTEBRAE {
        let Some(v) = r.vertebrae.get(name) else {
            continue;
        };
        let mut g = vec![
            text(Rel::HasObsContext, TRACKING_ID, &format!("{name} vertebra")),
            uidref(
                Rel::HasObsContext,
                TRACKING_UID,
                &derived_uid(&r.id, &format!("tracking/{name}")),
            ),
            coded(Rel::HasConceptMod, FINDING, FRACTURE),
            coded(Rel::HasConceptMod, FINDING_SITE, site),
            num(
                Rel::Contains,
                PROBABILITY,
                f64::from(v.probability),
                NO_UNITS,
            ),
            coded(Rel::Contains, FLAGGED, yes_no(v.flagged)),
        ];
        if let Some(k) = &v.key_slice {
            g.push(source_image(msg, Some(SOURCE), &k.sop_instance_uid)?);
        }
        measurements.push(container(Rel::Contains, MEASUREMENT_GROUP, g));
    }
    if let Some(p) = &r.patient {
        let mut g = vec![
            text(Rel::HasObsContext, TRACKING_ID, "Cervical spine"),
            uidref(
                Rel::HasObsContext,
                TRACKING_UID,
                &derived_uid(&r.id, "tracking/patient"),
            ),
            coded(Rel::HasConceptMod, FINDING, FRACTURE),
            coded(Rel::HasConceptMod, FINDING_SITE, CERVICAL_SPINE),
            num(
                Rel::Contains,
                PROBABILITY,
                f64::from(p.probability),
                NO_UNITS,
            ),
            num(Rel::Contains, THRESHOLD, f64::from(p.threshold), NO_UNITS),
            coded(Rel::Contains, FLAGGED, yes_no(p.flagged)),
        ];
        if let Some(k) = &r.key_slice {
            g.push(source_image(msg, Some(KEY_SLICE), &k.sop_instance_uid)?);
        }
        measurements.push(container(Rel::Contains, MEASUREMENT_GROUP, g));
    }
    if !measurements.is_empty() {
        content.push(container(Rel::Contains, MEASUREMENTS, measurements));
    }

    let mut evaluations = vec![text(Rel::Contains, STATUS, status_text(r.status))];
    if let Some(reason) = &r.reason {
        evaluations.push(text(Rel::Contains, REASON, reason));
    }
    evaluations.push(text(Rel::Contains, COMMENT, DISCLAIMER));
    content.push(container(Rel::Contains, QUALITATIVE, evaluations));

    let mut obj = base_dataset(&IDENTITY, msg, cfg);
    put_seq(
        &mut obj,
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    );
    // SR Document General
    put_str(&mut obj, tags::COMPLETION_FLAG, VR::CS, "COMPLETE");
    put_str(&mut obj, tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED");
    put_seq(&mut obj, tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, vec![]);
    let analysed: Vec<_> = msg.source.instances.iter().collect();
    put_seq(
        &mut obj,
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![evidence(&msg.source, &analysed)],
    );
    put_root(&mut obj, REPORT, "1500", content);
    finish(&IDENTITY, msg, obj)
}

/// The status as the report says it.
fn status_text(status: Status) -> &'static str {
    match status {
        Status::Positive => "Positive: possible cervical spine fracture flagged",
        Status::Negative => "Negative: no fracture flagged",
        Status::Indeterminate => "Indeterminate: no answer for this series (see reason)",
        Status::Failed => "Failed: the series could not be analysed (see reason)",
    }
}
