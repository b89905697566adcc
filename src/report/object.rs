//! One DICOM object produced for a result: its Part 10 bytes and the UIDs that name it.

use serde::{Deserialize, Serialize};

/// Which result object this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultObjectKind {
    StructuredReport,
    KeyObjectSelection,
    SecondaryCapture,
}

/// A DICOM object built for a result, ready to be stored and sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultObject {
    pub kind: ResultObjectKind,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub series_instance_uid: String,
    pub study_instance_uid: String,
    /// The whole Part 10 file (preamble, file meta group, data set).
    pub part10: Vec<u8>,
}
