//! The reasons of an `indeterminate` result that the model's flags did not decide: not a
//! cervical spine, too short, a pose beyond the validated ones, partial coverage.

pub const REASON_NOT_CERVICAL: &str = "series does not cover the cervical spine";
pub const REASON_TOO_SHORT: &str = "series too short along z";
pub const REASON_POSE: &str = "neck tilted beyond the poses the model was validated for";
/// Prefix of the reason of an `indeterminate` result with nothing flagged in a series that
/// does not cover every vertebra ([`PartialCoverage`](super::PartialCoverage)).
pub const REASON_PARTIAL_COVERAGE: &str = "partial coverage";
