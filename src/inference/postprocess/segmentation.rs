//! What the model's segmentation and attention outputs say about the anatomy: the class
//! of each cell, each vertebra's run of model slices, the neck's sideways tilt, and the
//! model slice of a vertebra's peak attention.

use crate::inference::contract::{Coverage, ModelContract};
use crate::inference::engine::ModelOutputs;

/// Argmax class of every segmentation cell of model slice `k` (`seg_h * seg_w` values).
pub fn seg_argmax(out: &ModelOutputs, k: usize) -> Vec<u8> {
    let cells = out.seg_h * out.seg_w;
    let base = k * out.seg_classes * cells;
    (0..cells)
        .map(|cell| {
            let mut best = 0;
            for c in 1..out.seg_classes {
                if out.seg_logits[base + c * cells + cell]
                    > out.seg_logits[base + best * cells + cell]
                {
                    best = c;
                }
            }
            best as u8
        })
        .collect()
}

/// Slices with no cell of a vertebra that may still lie inside its run (a 2 mm slice through
/// a disc or a crack can lose the label for a slice or two).
const MAX_GAP_SLICES: usize = 2;

/// First and last model slice of each vertebra: the run of slices where it is present (at
/// least `min_pixels` cells of the slice have it as argmax class), gaps of up to
/// [`MAX_GAP_SLICES`] bridged, with the most cells. A vertebra is one compact object along
/// z: stray cells of its class far away (in the skull, in the thorax) must not stretch its
/// range, as a first-to-last span would.
pub fn vertebra_extent(out: &ModelOutputs, coverage: &Coverage) -> [Option<(usize, usize)>; 7] {
    // Per vertebra: the best run so far and the current one, as (first, last, cells).
    let mut best: [Option<(usize, usize, usize)>; 7] = [None; 7];
    let mut current: [Option<(usize, usize, usize)>; 7] = [None; 7];
    for k in 0..out.slices {
        let mut counts = [0usize; 8];
        for class in seg_argmax(out, k) {
            counts[class as usize] += 1;
        }
        for v in 0..7 {
            let n = counts[v + 1];
            if n < coverage.min_pixels.max(1) {
                continue;
            }
            current[v] = match current[v] {
                Some((first, last, cells)) if k - last <= MAX_GAP_SLICES + 1 => {
                    Some((first, k, cells + n))
                }
                _ => Some((k, k, n)),
            };
            if best[v].is_none_or(|b| current[v].unwrap().2 > b.2) {
                best[v] = current[v];
            }
        }
    }
    best.map(|b| b.map(|(first, last, _)| (first, last)))
}

/// Sideways tilt of the neck: the angle (degrees) of its axis from the scanner's z axis in the
/// coronal plane, from the segmentation alone. Each vertebra's column centroid over its main
/// run (`extent`) is fitted against its slice centroid by least squares, one point per
/// vertebra. A head tilted towards a shoulder tilts this axis; lordosis (a sagittal bend), a
/// turn or a nod do not. `None` with fewer than `coverage.min_vertebrae` vertebrae found.
/// `models/training/robustness.py` (`lateral_tilt_deg`) is the reference and measures it.
pub fn lateral_tilt_deg(
    out: &ModelOutputs,
    extent: &[Option<(usize, usize)>; 7],
    contract: &ModelContract,
) -> Option<f64> {
    let cell_mm = contract.outputs.segmentation.stride as f64 * contract.input.spacing_mm.column;
    let slice_mm = contract.input.spacing_mm.slice;
    let mut points = Vec::with_capacity(7);
    for (v, run) in extent.iter().enumerate() {
        let Some((first, last)) = *run else { continue };
        let (mut cells, mut col_sum, mut k_sum) = (0usize, 0usize, 0usize);
        for k in first..=last {
            for (cell, &class) in seg_argmax(out, k).iter().enumerate() {
                if class as usize == v + 1 {
                    cells += 1;
                    col_sum += cell % out.seg_w;
                    k_sum += k;
                }
            }
        }
        points.push((
            k_sum as f64 / cells as f64 * slice_mm,
            col_sum as f64 / cells as f64 * cell_mm,
        ));
    }
    if points.len() < contract.coverage.min_vertebrae.max(2) {
        return None;
    }
    let n = points.len() as f64;
    let (z_mean, x_mean) = points
        .iter()
        .fold((0.0, 0.0), |(z, x), p| (z + p.0 / n, x + p.1 / n));
    let (cov, var) = points.iter().fold((0.0, 0.0), |(c, v), (z, x)| {
        (c + (z - z_mean) * (x - x_mean), v + (z - z_mean).powi(2))
    });
    (var > 0.0).then(|| (cov / var).atan().to_degrees())
}

/// The model slice where vertebra `v` (0 = C1) has its highest attention (the first one
/// on ties).
pub fn peak_attention_slice(out: &ModelOutputs, v: usize) -> usize {
    let row = &out.attention[v * out.slices..(v + 1) * out.slices];
    (0..out.slices)
        .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
        .unwrap_or(0)
}
