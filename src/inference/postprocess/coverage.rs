//! Which vertebrae a series covers ([`InView`], partial coverage: only those are
//! analysed, the others are listed in `not_covered`) and the typed reason of a partial
//! series with nothing flagged ([`PartialCoverage`]).

use super::reasons::REASON_PARTIAL_COVERAGE;
use crate::inference::contract::VERTEBRAE;

/// Which vertebrae a series covers, from the model's segmentation and the series' z extent
/// (`docs/model-contract.md`, "Partial coverage"). A vertebra lies **whole** in the series
/// when the segmentation finds it ([`vertebra_extent`](super::vertebra_extent)) and its run
/// of model slices includes neither the first nor the last model slice (a vertebra on an
/// outermost slice may go on beyond it). The series **covers** the vertebrae from the first
/// to the last one that lies whole (in C1..C7 order); the others (C1 down to the first whole
/// one, C7 up to the last) are **not covered**. A vertebra between two whole ones that the
/// segmentation misses is covered (the extent holds it); [`interpret`](super::interpret)
/// counts such misses against `coverage.min_vertebrae`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InView {
    /// First and last covered vertebra (0 = C1); None when no vertebra lies whole.
    pub span: Option<(usize, usize)>,
}

impl InView {
    /// The coverage of a series of `slices` model slices where the vertebrae were found
    /// at `extent` (model slice runs, [`vertebra_extent`](super::vertebra_extent)).
    pub fn of(extent: &[Option<(usize, usize)>; 7], slices: usize) -> InView {
        let whole =
            |v: &usize| extent[*v].is_some_and(|(first, last)| first > 0 && last + 1 < slices);
        let first = (0..7).find(whole);
        let last = (0..7).rev().find(whole);
        InView {
            span: first.zip(last),
        }
    }

    /// Whether vertebra `v` (0 = C1) is covered.
    pub fn covers(&self, v: usize) -> bool {
        self.span.is_some_and(|(a, b)| (a..=b).contains(&v))
    }

    /// Number of covered levels.
    pub fn levels(&self) -> usize {
        self.span.map_or(0, |(a, b)| b + 1 - a)
    }

    /// The vertebrae covered, in order.
    pub fn covered(&self) -> Vec<String> {
        (0..7)
            .filter(|&v| self.covers(v))
            .map(|v| VERTEBRAE[v].to_string())
            .collect()
    }

    /// The vertebrae not covered, in order, as `not_covered` publishes them.
    pub fn not_covered(&self) -> Vec<String> {
        (0..7)
            .filter(|&v| !self.covers(v))
            .map(|v| VERTEBRAE[v].to_string())
            .collect()
    }
}

/// The typed reason of an `indeterminate` result for partial coverage: the model flagged
/// nothing in the vertebrae in view, and some are not in view, so the result must not read
/// as "neck clear". Displayed as the published `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialCoverage {
    pub in_view: InView,
}

impl std::fmt::Display for PartialCoverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (a, b) = self.in_view.span.unwrap_or((0, 0));
        write!(
            f,
            "{REASON_PARTIAL_COVERAGE}: {} not in view; {}-{} analysed, nothing flagged there; \
             read the levels not in view without triage",
            self.in_view.not_covered().join(", "),
            VERTEBRAE[a],
            VERTEBRAE[b]
        )
    }
}
