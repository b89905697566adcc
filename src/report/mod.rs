//! DICOM result objects for PACS: what a result looks like as DICOM, in new series of the
//! analysed study, with its patient and study modules copied from the source series.
//!
//! - [`object`]: a built object (Part 10 bytes and the UIDs naming it).
//! - [`config`]: `[report]`, which results get objects.
//! - [`sr`]: the structured report (TID 1500, Comprehensive SR), for every selected result.
//! - [`kos`]: the Key Object Selection (TID 2010) of the key slices, when there are some.
//! - [`sc`]: the Secondary Capture of the key image, annotation burned in (optional).
//! - [`common`]: the modules all of them share; [`dataset`]: elements and content items;
//!   [`uid`]: deterministic UIDs; [`font`]: the annotation's bitmap font;
//!   [`error`]: [`ReportError`].
//!
//! UIDs derive from the result id ([`uid`]), so building the objects of a result again
//! (a re-analysis after a crash) gives the same UIDs: delivery stays once per UID.
//! Delivery itself (the durable queue, C-STORE to PACS) is not here.

pub mod common;
pub mod config;
pub mod dataset;
pub mod error;
pub mod font;
pub mod kos;
pub mod object;
pub mod sc;
pub mod sr;
pub mod uid;

pub use config::{ObjectSelection, ReportConfig};
pub use error::ReportError;
pub use object::{ResultObject, ResultObjectKind};

use crate::result::{DicomObjectKind, DicomObjectRef, ResultMessage};

/// The DICOM objects of one result: the structured report, the key object selection
/// (when the result has key slices) and the secondary capture of the key image (when it
/// has one and `cfg.secondary_capture` is on). Builds them whatever `cfg.objects` says:
/// the caller asks [`ReportConfig::selects`] first. Fails, building nothing, when the
/// source series lacks what the objects copy or a key slice is not one of its instances.
pub fn build_result_objects(
    msg: &ResultMessage,
    cfg: &ReportConfig,
) -> Result<Vec<ResultObject>, ReportError> {
    common::check_source(&msg.source)?;
    let mut objects = vec![sr::build(msg, cfg)?];
    objects.extend(kos::build(msg, cfg)?);
    if cfg.secondary_capture {
        objects.extend(sc::build(msg, cfg)?);
    }
    Ok(objects)
}

impl From<ResultObjectKind> for DicomObjectKind {
    fn from(kind: ResultObjectKind) -> Self {
        match kind {
            ResultObjectKind::StructuredReport => DicomObjectKind::StructuredReport,
            ResultObjectKind::KeyObjectSelection => DicomObjectKind::KeyObjectSelection,
            ResultObjectKind::SecondaryCapture => DicomObjectKind::SecondaryCapture,
        }
    }
}

/// How the result names an object (`dicom_objects` of the result document).
pub fn object_ref(object: &ResultObject) -> DicomObjectRef {
    DicomObjectRef {
        kind: object.kind.into(),
        sop_class_uid: object.sop_class_uid.clone(),
        sop_instance_uid: object.sop_instance_uid.clone(),
        series_instance_uid: object.series_instance_uid.clone(),
    }
}
