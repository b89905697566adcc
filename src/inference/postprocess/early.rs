//! The coverage check of an early analysis (the anatomy-coverage trigger): whether the
//! slab shows C1 and C7 with a vertebra of margin, or ends with the series.

use super::segmentation::vertebra_extent;
use crate::events::{EarlyWithholdReason, SlabEnd};
use crate::inference::contract::{Coverage, VERTEBRAE};
use crate::inference::engine::ModelOutputs;
use crate::inference::preprocess::ModelGrid;
use crate::series::EarlyCheck;

/// The coverage check of an early analysis (the anatomy-coverage trigger,
/// [`crate::series::AssemblyConfig::anatomy_coverage_trigger`]): the segmentation found
/// C1 and C7, and the slab goes on beyond each by at least one vertebra height (the mean
/// z extent of the vertebrae found) unless the slab ends there with an end of the series
/// (`check`). `Err` says why the early result must not be published.
pub fn early_coverage(
    out: &ModelOutputs,
    grid: &ModelGrid,
    coverage: &Coverage,
    check: &EarlyCheck,
) -> Result<(), EarlyWithholdReason> {
    let extent = vertebra_extent(out, coverage);
    let z = &grid.z_mm;
    let (Some(c1), Some(c7)) = (extent[0], extent[6]) else {
        let found = VERTEBRAE
            .iter()
            .zip(&extent)
            .filter(|(_, e)| e.is_some())
            .map(|(v, _)| v.to_string())
            .collect();
        return Err(EarlyWithholdReason::VertebraMissing { found });
    };
    let dz = if z.len() > 1 {
        (z[z.len() - 1] - z[0]) / (z.len() - 1) as f64
    } else {
        0.0
    };
    let heights: Vec<f64> = extent
        .iter()
        .flatten()
        .map(|&(a, b)| z[b] - z[a] + dz)
        .collect();
    let height = heights.iter().sum::<f64>() / heights.len() as f64;
    let (lowest, highest) = (z[0], z[z.len() - 1]);
    let centre = |(a, b): (usize, usize)| (z[a] + z[b]) / 2.0;
    // C1 is superior (higher patient z) in any sane segmentation; do not rely on it.
    let c1_superior = centre(c1) >= centre(c7);
    let (c1_margin, c1_end_final, c1_side) = if c1_superior {
        (
            highest - z[c1.1],
            check.superior_end_final,
            SlabEnd::Superior,
        )
    } else {
        (
            z[c1.0] - lowest,
            check.inferior_end_final,
            SlabEnd::Inferior,
        )
    };
    let (c7_margin, c7_end_final, c7_side) = if c1_superior {
        (
            z[c7.0] - lowest,
            check.inferior_end_final,
            SlabEnd::Inferior,
        )
    } else {
        (
            highest - z[c7.1],
            check.superior_end_final,
            SlabEnd::Superior,
        )
    };
    for (name, margin, end_final, side) in [
        ("C1", c1_margin, c1_end_final, c1_side),
        ("C7", c7_margin, c7_end_final, c7_side),
    ] {
        if margin < height && !end_final {
            return Err(EarlyWithholdReason::NearOpenEnd {
                vertebra: name.to_string(),
                side,
                margin_mm: margin,
                vertebra_height_mm: height,
            });
        }
    }
    Ok(())
}
