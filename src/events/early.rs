//! Why an early analysis (the anatomy-coverage trigger) is not published: a typed reason
//! that the inference stage decides, the series stage hears back, and the event stream
//! records ([`super::Event::EarlyAnalysisWithheld`]). The series is analysed again when it
//! completes.

use serde::Serialize;

use super::AnalysisStatus;

/// Why an early analysis was withheld; `Display` gives the sentence the log prints.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EarlyWithholdReason {
    /// The slab's segmentation did not find both C1 and C7 (`found`: the vertebrae it did).
    #[error("the slab does not show both C1 and C7 (found: {})", list_or_none(.found))]
    VertebraMissing { found: Vec<String> },
    /// C1 or C7 ends less than a vertebra height from an end of the slab where more
    /// slices may still come.
    #[error(
        "{vertebra} ends {margin_mm:.1} mm from the slab's {side} end, less than a vertebra \
         ({vertebra_height_mm:.1} mm), and more slices may come there"
    )]
    NearOpenEnd {
        vertebra: String,
        side: SlabEnd,
        margin_mm: f64,
        vertebra_height_mm: f64,
    },
    /// The analysis ended neither positive nor negative: `status` with its reason.
    #[error("{}{}", status.as_str(), .reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    NotConclusive {
        status: AnalysisStatus,
        reason: Option<String>,
    },
}

impl EarlyWithholdReason {
    /// The kind the event stream records.
    pub fn kind(&self) -> EarlyWithholdKind {
        match self {
            EarlyWithholdReason::VertebraMissing { .. } => EarlyWithholdKind::VertebraMissing,
            EarlyWithholdReason::NearOpenEnd { .. } => EarlyWithholdKind::NearOpenEnd,
            EarlyWithholdReason::NotConclusive { .. } => EarlyWithholdKind::NotConclusive,
        }
    }
}

/// [`EarlyWithholdReason`] without its details, as `early_analysis_withheld` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EarlyWithholdKind {
    VertebraMissing,
    NearOpenEnd,
    NotConclusive,
}

/// An end of the slab along the patient's long axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlabEnd {
    Superior,
    Inferior,
}

impl std::fmt::Display for SlabEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SlabEnd::Superior => "superior",
            SlabEnd::Inferior => "inferior",
        })
    }
}

fn list_or_none(found: &[String]) -> String {
    if found.is_empty() {
        "none".to_string()
    } else {
        found.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sentences_are_the_ones_the_log_printed_before() {
        let missing = EarlyWithholdReason::VertebraMissing {
            found: vec!["C1".into(), "C2".into()],
        };
        assert_eq!(
            missing.to_string(),
            "the slab does not show both C1 and C7 (found: C1, C2)"
        );
        let none = EarlyWithholdReason::VertebraMissing { found: vec![] };
        assert!(none.to_string().ends_with("(found: none)"));
        let open = EarlyWithholdReason::NearOpenEnd {
            vertebra: "C7".into(),
            side: SlabEnd::Inferior,
            margin_mm: 3.04,
            vertebra_height_mm: 15.0,
        };
        assert_eq!(
            open.to_string(),
            "C7 ends 3.0 mm from the slab's inferior end, less than a vertebra (15.0 mm), \
             and more slices may come there"
        );
        let inconclusive = EarlyWithholdReason::NotConclusive {
            status: AnalysisStatus::Indeterminate,
            reason: Some("4 of 7 cervical vertebrae found".into()),
        };
        assert_eq!(
            inconclusive.to_string(),
            "indeterminate: 4 of 7 cervical vertebrae found"
        );
        assert_eq!(inconclusive.kind(), EarlyWithholdKind::NotConclusive);
    }
}
