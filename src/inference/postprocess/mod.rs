//! From model outputs to a [`TriageResult`](crate::result::TriageResult): probabilities,
//! flags, localization and the coverage checks: which vertebrae the series covers
//! ([`InView`], partial coverage: only those are analysed, the others are listed in
//! `not_covered`), and the checks that turn a series without (enough of) a cervical spine
//! into `indeterminate`.
//!
//! - [`reasons`]: the reasons of an `indeterminate` result the model did not decide.
//! - [`thresholds`]: the decision thresholds in effect, and [`sigmoid`].
//! - [`segmentation`]: what the segmentation and attention outputs say: each vertebra's
//!   run of model slices, the neck's sideways tilt, a vertebra's peak attention slice.
//! - [`coverage`]: which vertebrae a series covers ([`InView`]) and the partial-coverage
//!   reason ([`PartialCoverage`]).
//! - [`early`]: the coverage check of an early analysis ([`early_coverage`]).
//! - [`base`]: who ran the model ([`RunInfo`]) and the result every status shares
//!   ([`failed_result`], [`indeterminate_result`]).
//! - [`interpret`](mod@interpret): model outputs to a [`Verdict`], as
//!   `docs/model-contract.md` specifies.

mod base;
mod coverage;
mod early;
mod interpret;
mod reasons;
mod segmentation;
#[cfg(test)]
mod tests;
mod thresholds;

pub use base::{failed_result, indeterminate_result, RunInfo};
pub use coverage::{InView, PartialCoverage};
pub use early::early_coverage;
pub use interpret::{interpret, Verdict};
pub use reasons::{REASON_NOT_CERVICAL, REASON_PARTIAL_COVERAGE, REASON_POSE, REASON_TOO_SHORT};
pub use segmentation::{lateral_tilt_deg, peak_attention_slice, seg_argmax, vertebra_extent};
pub use thresholds::{sigmoid, Thresholds};
