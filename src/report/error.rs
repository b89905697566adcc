//! Why result objects could not be built ([`ReportError`]).

use thiserror::Error;

use super::object::ResultObjectKind;

/// Why [`super::build_result_objects`] built nothing. The result itself is still
/// published; only its DICOM objects are missing.
#[derive(Debug, Error)]
pub enum ReportError {
    /// The result's source series lacks what every object needs.
    #[error("the source series has no {0}: result objects need it")]
    MissingSource(&'static str),
    /// A source value was longer than any conformant one and was not kept.
    #[error("the source's {0} is longer than DICOM allows: not copied into result objects")]
    SourceValueTooLong(String),
    /// A key slice named by the result is not an instance of the source series.
    #[error("key slice {0:?} is not an instance of the analysed series")]
    UnknownKeySlice(String),
    /// The key image PNG could not be read or is too large.
    #[error("key image: {0}")]
    KeyImage(String),
    /// dicom-object refused to build or write the object.
    #[error("cannot encode the {kind:?} object: {message}")]
    Encode {
        kind: ResultObjectKind,
        message: String,
    },
}
