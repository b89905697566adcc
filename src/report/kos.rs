//! The Key Object Selection document of a result (TID 2010): the key slices of the source
//! series flagged "Of Interest", with a description that names the flagged vertebrae and
//! says it is a triage aid. Built only when the result has key slices.

use dicom_dictionary_std::{tags, uids};

use super::common::{base_dataset, evidence, finish, Identity};
use super::config::ReportConfig;
use super::dataset::{code, image, put_root, put_seq, text, Code, Item, Rel};
use super::error::ReportError;
use super::object::{ResultObject, ResultObjectKind};
use super::sr::{key_slices, DISCLAIMER};
use crate::result::{ResultMessage, SourceInstance};

pub const IDENTITY: Identity = Identity {
    kind: ResultObjectKind::KeyObjectSelection,
    sop_class_uid: uids::KEY_OBJECT_SELECTION_DOCUMENT_STORAGE,
    modality: "KO",
    series_number: 9902,
    series_description: "AI triage key images (not for diagnosis)",
};

const OF_INTEREST: Code = code("113000", "DCM", "Of Interest");
const DESCRIPTION: Code = code("113012", "DCM", "Key Object Description");

/// Builds the key object selection of `msg`; `None` when it has no key slice.
pub fn build(msg: &ResultMessage, cfg: &ReportConfig) -> Result<Option<ResultObject>, ReportError> {
    let keys = key_slices(msg);
    if keys.is_empty() {
        return Ok(None);
    }
    let mut selected: Vec<&SourceInstance> = Vec::with_capacity(keys.len());
    let mut content: Vec<Item> = vec![text(Rel::Contains, DESCRIPTION, &description(msg))];
    for sop in keys {
        let class = msg
            .source
            .sop_class_of(sop)
            .ok_or_else(|| ReportError::UnknownKeySlice(sop.to_owned()))?;
        content.push(image(Rel::Contains, None, class, sop));
        if let Some(i) = msg
            .source
            .instances
            .iter()
            .find(|i| i.sop_instance_uid == sop)
        {
            selected.push(i);
        }
    }
    let mut obj = base_dataset(&IDENTITY, msg, cfg);
    put_seq(
        &mut obj,
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    );
    put_seq(
        &mut obj,
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![evidence(&msg.source, &selected)],
    );
    put_root(&mut obj, OF_INTEREST, "2010", content);
    finish(&IDENTITY, msg, obj).map(Some)
}

/// "AI triage: possible fracture flagged at C2, C5. Triage aid, …".
fn description(msg: &ResultMessage) -> String {
    let flagged: Vec<&str> = msg
        .result
        .vertebrae
        .iter()
        .filter(|(_, v)| v.flagged)
        .map(|(name, _)| name.as_str())
        .collect();
    let finding = if flagged.is_empty() {
        "key slice of the analysis".to_owned()
    } else {
        format!("possible fracture flagged at {}", flagged.join(", "))
    };
    format!("AI triage: {finding}. {DISCLAIMER}")
}
