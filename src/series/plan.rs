//! The plan of a series' volume, from its headers alone: the slices validated and sorted
//! along the slice normal ([`VolumePlan`]), before any pixel is decoded.
//!
//! Bounded: a series with more slices than [`VolumeLimits::max_slices`] is refused
//! ([`VolumeError::TooManySlices`]) before anything else; [`super::volume`] checks the
//! bytes of the volume before allocating it.
//!
//! Tolerant of real scanners where the model cannot see the difference. The model
//! resamples the volume, every 2 mm along the normal by each slice's real position and
//! every 1.25 mm in plane, trilinearly. So missing slices are interpolated across when the
//! step is at most [`VolumeLimits::max_gap_mm`] and reported ([`InterpolatedGaps`]); a
//! longer gap fails ([`VolumeError::Gap`]). Uneven steps are accepted down to
//! [`IRREGULAR_FACTOR`] of the median. Orientation cosines, pixel spacings and in-plane
//! positions may differ between slices by what moves a voxel at most
//! [`MAX_MISPLACEMENT_MM`] from where the volume (one orientation, one pixel spacing, one
//! in-plane origin for all slices) puts it.

use std::collections::HashSet;

use anyhow::{anyhow, bail, ensure, Result};

use super::header::{cross, direction_cosines, dot, normalize, InstanceHeader};
use super::{AssemblyConfig, Geometry, InterpolatedGaps};

/// Two slices closer than this along the normal are the same position.
const DUPLICATE_TOLERANCE_MM: f64 = 0.01;
/// A step larger than this times the median spacing means missing slices: interpolated
/// up to [`VolumeLimits::max_gap_mm`], a failure beyond.
pub const GAP_FACTOR: f64 = 1.5;
/// A step smaller than this times the median spacing means an irregular stack. The
/// model samples by each slice's real position, so an uneven step changes nothing it
/// sees; a step this short is no scanner's jitter (positions printed to 0.1 mm, table
/// increments) but a second stack interleaved with the first (two reconstructions in
/// one series), which is refused.
pub const IRREGULAR_FACTOR: f64 = 0.25;
/// How far (mm) the geometry checks let a voxel land from where the volume puts it (the
/// volume has one orientation, one pixel spacing and one in-plane origin for all its
/// slices). Less than half of the model's 1.25 mm in-plane step, and about one source
/// pixel: within the blur of the reconstruction, below what the model can resolve.
pub const MAX_MISPLACEMENT_MM: f64 = 0.5;
/// Orientation cosines and pixel spacings always agree when they differ by less than
/// this (what earlier versions accepted; a cosine printed with 3 decimals), whatever
/// [`MAX_MISPLACEMENT_MM`] allows.
const ORIENTATION_TOLERANCE: f64 = 1e-3;
const PIXEL_SPACING_TOLERANCE_MM: f64 = 1e-3;
/// ... and never when they differ by more than this: a rotation of half a degree, or
/// pixel spacings 1 % apart, are another acquisition or reconstruction, however small
/// the matrix.
const ORIENTATION_TOLERANCE_MAX: f64 = 1e-2;
const PIXEL_SPACING_TOLERANCE_MAX_RELATIVE: f64 = 1e-2;
/// Allowed in-plane drift of ImagePositionPatient between slices, in pixels, when more
/// than [`MAX_MISPLACEMENT_MM`] (large pixels).
const IN_PLANE_TOLERANCE_PX: f64 = 0.25;
/// Largest Rows or Columns accepted. CT slices are 512 to 2048 pixels wide; Rows and
/// Columns can say 65535, and the volume (then the decoder) allocates and zero-fills what
/// they say before any pixel is read: 8 GiB per slice from one small, compressed instance.
pub const MAX_MATRIX: usize = 4096;

/// What volume building may allocate and interpolate ([`AssemblyConfig::volume_limits`];
/// its defaults by [`Default`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VolumeLimits {
    /// Most distinct slices in a series.
    pub max_slices: usize,
    /// Most bytes of the int16 voxel buffer (slices x kept voxels of each slice x 2).
    pub max_volume_bytes: u64,
    /// Largest step between neighbouring slices that is interpolated across when it is a
    /// gap (more than [`GAP_FACTOR`] times the median spacing), mm.
    pub max_gap_mm: f64,
}

impl Default for VolumeLimits {
    fn default() -> Self {
        AssemblyConfig::default().volume_limits()
    }
}

/// Why a series' volume is refused on its headers alone. [`plan_volume`] returns it
/// inside its `anyhow::Error` (`downcast_ref::<VolumeError>()` tells it);
/// [`super::build_volume_within`] returns it as [`super::BuildError::Volume`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VolumeError {
    #[error("series has {slices} slices, more than the {max} allowed (series.max_slices)")]
    TooManySlices { slices: usize, max: usize },
    #[error(
        "volume of {slices} slices x {kept} of {rows}x{cols} voxels each needs {} MiB, more \
         than the {} MiB allowed (series.max_volume_mib)",
        .bytes.div_ceil(1 << 20),
        .max_bytes >> 20
    )]
    TooLarge {
        slices: usize,
        rows: usize,
        cols: usize,
        /// Voxels kept of each slice (the window).
        kept: usize,
        bytes: u64,
        max_bytes: u64,
    },
    #[error(
        "gap in slice positions: {step_mm:.3} mm between slices {before} (at {before_mm:.3} mm) \
         and {after} (at {after_mm:.3} mm), median spacing {median_mm:.3} mm: about {missing} \
         slice(s) missing, more than the {max_gap_mm} mm interpolated \
         (series.max_interpolated_gap_mm)"
    )]
    Gap {
        step_mm: f64,
        before: String,
        before_mm: f64,
        after: String,
        after_mm: f64,
        median_mm: f64,
        missing: i64,
        max_gap_mm: f64,
    },
}

/// The validated, sorted stack of a series, before any pixel is decoded.
#[derive(Debug)]
pub struct VolumePlan {
    pub sorted: Vec<InstanceHeader>,
    /// Position of each sorted slice along the normal, mm.
    pub z: Vec<f64>,
    pub dims: [usize; 3],
    pub geometry: Geometry,
    /// Gaps in `z` the model's resampling interpolates across; None when there is none.
    pub interpolated_gaps: Option<InterpolatedGaps>,
}

/// Checks geometry consistency and sorts along the slice normal: more slices than
/// `limits` allow, duplicates, gaps larger than `limits.max_gap_mm`, mixed orientation /
/// pixel spacing / matrix size beyond what the model could see, and sheared stacks are
/// errors.
pub fn plan_volume(headers: Vec<InstanceHeader>, limits: &VolumeLimits) -> Result<VolumePlan> {
    // The same instance twice (a re-send, or a copy in an offline folder) is not a duplicate
    // slice: keep the first.
    let mut seen = HashSet::new();
    let headers: Vec<InstanceHeader> = headers
        .into_iter()
        .filter(|h| {
            let first = seen.insert(h.sop_instance_uid.clone());
            if !first {
                log::debug!(
                    "ignoring second copy of instance {} ({})",
                    h.sop_instance_uid,
                    h.path.display()
                );
            }
            first
        })
        .collect();
    ensure!(!headers.is_empty(), "series has no image instances");
    if headers.len() > limits.max_slices {
        return Err(VolumeError::TooManySlices {
            slices: headers.len(),
            max: limits.max_slices,
        }
        .into());
    }

    let reference = &headers[0];
    let ref_iop = require(
        reference,
        reference.image_orientation_patient,
        "ImageOrientationPatient",
    )?;
    let ref_spacing = require(reference, reference.pixel_spacing, "PixelSpacing")?;
    let rows = require(reference, reference.rows, "Rows")? as usize;
    let cols = require(reference, reference.columns, "Columns")? as usize;
    ensure!(
        rows > 0 && cols > 0,
        "slice {} has an empty matrix ({rows}x{cols})",
        reference.sop_instance_uid
    );
    ensure!(
        rows <= MAX_MATRIX && cols <= MAX_MATRIX,
        "slice {} has a {rows}x{cols} matrix, more than {MAX_MATRIX} pixels a side",
        reference.sop_instance_uid
    );
    ensure!(
        ref_spacing.iter().all(|&s| s > 0.0),
        "slice {} has a non-positive PixelSpacing {:?}",
        reference.sop_instance_uid,
        ref_spacing
    );
    let (row_dir, col_dir) = direction_cosines(&ref_iop).ok_or_else(|| {
        anyhow!(
            "slice {} has an invalid ImageOrientationPatient {:?} (zero or non-orthogonal vectors)",
            reference.sop_instance_uid,
            ref_iop
        )
    })?;
    let normal = normalize(cross(row_dir, col_dir)).expect("orthonormal directions");
    let tolerance = Tolerances::of(rows, cols, ref_spacing);

    let mut stack = Vec::with_capacity(headers.len());
    for h in headers.iter() {
        let iop = require(h, h.image_orientation_patient, "ImageOrientationPatient")?;
        if iop
            .iter()
            .zip(&ref_iop)
            .any(|(a, b)| (a - b).abs() > tolerance.orientation)
        {
            bail!(
                "inconsistent orientation: slice {} has ImageOrientationPatient {:?}, slice {} has {:?}",
                h.sop_instance_uid,
                iop,
                reference.sop_instance_uid,
                ref_iop
            );
        }
        let spacing = require(h, h.pixel_spacing, "PixelSpacing")?;
        if spacing
            .iter()
            .zip(&ref_spacing)
            .zip(&tolerance.pixel_spacing_mm)
            .any(|((a, b), tol)| (a - b).abs() > *tol)
        {
            bail!(
                "inconsistent pixel spacing: slice {} has PixelSpacing {:?}, slice {} has {:?}",
                h.sop_instance_uid,
                spacing,
                reference.sop_instance_uid,
                ref_spacing
            );
        }
        let (r, c) = (
            require(h, h.rows, "Rows")?,
            require(h, h.columns, "Columns")?,
        );
        if (r as usize, c as usize) != (rows, cols) {
            bail!(
                "inconsistent matrix size: slice {} is {r}x{c}, slice {} is {rows}x{cols}",
                h.sop_instance_uid,
                reference.sop_instance_uid
            );
        }
        let ipp = require(h, h.image_position_patient, "ImagePositionPatient")?;
        stack.push((dot(ipp, normal), ipp, h.clone()));
    }
    stack.sort_by(|a, b| a.0.total_cmp(&b.0));

    // Every slice must sit on the line through the first one along the normal; otherwise
    // the stack is sheared (gantry tilt) and a single origin + normal would misplace it.
    let origin = stack[0].1;
    for (_, ipp, h) in &stack {
        let d = [ipp[0] - origin[0], ipp[1] - origin[1], ipp[2] - origin[2]];
        let (along_row, along_col) = (dot(d, row_dir), dot(d, col_dir));
        if along_row.abs() > tolerance.in_plane_mm || along_col.abs() > tolerance.in_plane_mm {
            bail!(
                "slices are not stacked along the slice normal (gantry tilt or sheared stack, not supported): \
                 slice {} is shifted by {along_row:.2} mm along rows and {along_col:.2} mm along columns",
                h.sop_instance_uid
            );
        }
    }

    for pair in stack.windows(2) {
        let step = pair[1].0 - pair[0].0;
        if step < DUPLICATE_TOLERANCE_MM {
            bail!(
                "duplicate slice position: slices {} and {} are both at {:.3} mm along the normal",
                pair[0].2.sop_instance_uid,
                pair[1].2.sop_instance_uid,
                pair[0].0
            );
        }
    }
    let steps: Vec<f64> = stack.windows(2).map(|p| p[1].0 - p[0].0).collect();
    let slice_spacing = if steps.is_empty() {
        // One slice: no spacing to measure; the nominal thickness is the best guess.
        reference
            .slice_thickness
            .filter(|t| *t > 0.0)
            .unwrap_or(1.0)
    } else {
        median(&steps)
    };
    let mut interpolated_gaps: Option<InterpolatedGaps> = None;
    for (i, &step) in steps.iter().enumerate() {
        if step > GAP_FACTOR * slice_spacing {
            if step > limits.max_gap_mm {
                return Err(VolumeError::Gap {
                    step_mm: step,
                    before: stack[i].2.sop_instance_uid.clone(),
                    before_mm: stack[i].0,
                    after: stack[i + 1].2.sop_instance_uid.clone(),
                    after_mm: stack[i + 1].0,
                    median_mm: slice_spacing,
                    missing: ((step / slice_spacing).round() as i64 - 1).max(1),
                    max_gap_mm: limits.max_gap_mm,
                }
                .into());
            }
            // The model samples by each slice's real position: across this step it
            // interpolates between the slices either side, as between any two of its own
            // samples. Recorded so that the result says so.
            let gaps = interpolated_gaps.get_or_insert_with(Default::default);
            gaps.count += 1;
            gaps.largest_mm = gaps.largest_mm.max(step);
        }
        if step < IRREGULAR_FACTOR * slice_spacing {
            bail!(
                "irregular slice spacing: {step:.3} mm between slices {} and {}, median spacing {slice_spacing:.3} mm",
                stack[i].2.sop_instance_uid,
                stack[i + 1].2.sop_instance_uid
            );
        }
    }

    let z = stack.iter().map(|s| s.0).collect();
    let n = stack.len();
    Ok(VolumePlan {
        sorted: stack.into_iter().map(|s| s.2).collect(),
        z,
        dims: [n, rows, cols],
        geometry: Geometry {
            origin,
            spacing: [slice_spacing, ref_spacing[0], ref_spacing[1]],
            row_direction: row_dir,
            column_direction: col_dir,
            normal,
        },
        interpolated_gaps,
    })
}

/// How much the slices of a series may differ from its reference slice (the first
/// header) and still be one volume: each difference is allowed up to what moves a voxel
/// of the slice by [`MAX_MISPLACEMENT_MM`] from where the volume (one orientation, one
/// pixel spacing, one in-plane origin) puts it, so that the model cannot tell.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tolerances {
    /// Largest difference of any ImageOrientationPatient cosine. Cosines differing by d
    /// turn the slice by about d radians about its first voxel (ImagePositionPatient),
    /// which moves its farthest voxel, a slice diagonal away, by d x diagonal.
    orientation: f64,
    /// Largest difference of PixelSpacing [between rows, between columns], mm: a
    /// difference d moves the last row (column) by d x (rows - 1) (columns - 1).
    pixel_spacing_mm: [f64; 2],
    /// Largest in-plane offset of a slice's ImagePositionPatient from the line through the
    /// first slice along the normal, mm: it moves every voxel of the slice by as much.
    in_plane_mm: f64,
}

impl Tolerances {
    fn of(rows: usize, cols: usize, spacing: [f64; 2]) -> Tolerances {
        let height = rows.saturating_sub(1) as f64 * spacing[0];
        let width = cols.saturating_sub(1) as f64 * spacing[1];
        let diagonal = height.hypot(width);
        let spacing_tolerance = |n: usize, s: f64| {
            let moves = MAX_MISPLACEMENT_MM / n.saturating_sub(1).max(1) as f64;
            moves
                .max(PIXEL_SPACING_TOLERANCE_MM)
                .min(PIXEL_SPACING_TOLERANCE_MAX_RELATIVE * s)
        };
        Tolerances {
            orientation: (MAX_MISPLACEMENT_MM / diagonal.max(f64::MIN_POSITIVE))
                .clamp(ORIENTATION_TOLERANCE, ORIENTATION_TOLERANCE_MAX),
            pixel_spacing_mm: [
                spacing_tolerance(rows, spacing[0]),
                spacing_tolerance(cols, spacing[1]),
            ],
            in_plane_mm: MAX_MISPLACEMENT_MM
                .max(IN_PLANE_TOLERANCE_PX * spacing[0].min(spacing[1])),
        }
    }
}

fn require<T>(h: &InstanceHeader, value: Option<T>, name: &str) -> Result<T> {
    value.ok_or_else(|| {
        anyhow!(
            "slice {} ({}) has no valid {name}",
            h.sop_instance_uid,
            h.path.display()
        )
    })
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        0.5 * (v[mid - 1] + v[mid])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn slice(k: usize, z: f64) -> InstanceHeader {
        InstanceHeader {
            sop_instance_uid: format!("1.2.{k}"),
            image_position_patient: Some([-10.0, -20.0, z]),
            image_orientation_patient: Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
            pixel_spacing: Some([0.5, 0.5]),
            rows: Some(4),
            columns: Some(4),
            ..Default::default()
        }
    }

    /// The typed reason of a refused plan or build.
    pub(crate) fn volume_error<T: std::fmt::Debug>(result: Result<T>) -> VolumeError {
        result
            .expect_err("should be refused")
            .downcast::<VolumeError>()
            .expect("a VolumeError")
    }

    /// `n` slices `spacing` mm apart from z = 0, without those at `missing` (indices).
    pub(crate) fn regular(n: usize, spacing: f64, missing: &[usize]) -> Vec<InstanceHeader> {
        (0..n)
            .filter(|k| !missing.contains(k))
            .map(|k| slice(k, k as f64 * spacing))
            .collect()
    }

    fn stack(zs: &[f64]) -> Vec<InstanceHeader> {
        zs.iter().enumerate().map(|(k, &z)| slice(k, z)).collect()
    }

    fn plan(headers: Vec<InstanceHeader>) -> Result<VolumePlan> {
        plan_volume(headers, &VolumeLimits::default())
    }

    fn error(headers: Vec<InstanceHeader>) -> String {
        format!("{:#}", plan(headers).expect_err("plan should fail"))
    }

    #[test]
    fn sorts_along_the_normal_and_measures_spacing() {
        let plan = plan(stack(&[3.0, 1.0, 2.0, 0.0])).unwrap();
        assert_eq!(plan.z, [0.0, 1.0, 2.0, 3.0]);
        let order: Vec<_> = plan
            .sorted
            .iter()
            .map(|h| h.sop_instance_uid.as_str())
            .collect();
        assert_eq!(order, ["1.2.3", "1.2.1", "1.2.2", "1.2.0"]);
        assert_eq!(plan.geometry.spacing, [1.0, 0.5, 0.5]);
        assert_eq!(plan.geometry.origin, [-10.0, -20.0, 0.0]);
    }

    #[test]
    fn feet_first_orientation_sorts_along_its_own_normal() {
        // Column direction flipped: the normal points to -z, the first slice is the highest.
        let mut headers = stack(&[0.0, 1.0, 2.0]);
        for h in &mut headers {
            h.image_orientation_patient = Some([1.0, 0.0, 0.0, 0.0, -1.0, 0.0]);
        }
        let plan = plan(headers).unwrap();
        assert_eq!(plan.geometry.normal, [0.0, 0.0, -1.0]);
        assert_eq!(plan.geometry.origin[2], 2.0);
    }

    #[test]
    fn resent_instance_is_not_a_duplicate_but_a_second_one_at_the_same_place_is() {
        let mut headers = stack(&[0.0, 1.0, 2.0]);
        headers.push(headers[1].clone());
        assert_eq!(plan(headers).unwrap().dims[0], 3);
        let reason = error(stack(&[0.0, 1.0, 1.0, 2.0]));
        assert!(reason.contains("duplicate slice position"), "{reason}");
    }

    #[test]
    fn gaps_beyond_the_maximum_irregular_spacing_and_shear_fail() {
        // 1 mm stack, one slice missing: a 2 mm step is interpolated, two missing (3 mm) fail.
        assert!(plan(stack(&[0.0, 1.0, 2.0, 4.0, 5.0])).is_ok());
        let reason = error(stack(&[0.0, 1.0, 2.0, 5.0, 6.0]));
        assert!(reason.contains("about 2 slice(s) missing"), "{reason}");
        assert!(error(stack(&[0.0, 1.0, 2.0, 2.1, 3.1, 4.1])).contains("irregular slice spacing"));
        let mut tilted = stack(&[0.0, 1.0, 2.0]);
        tilted[2].image_position_patient = Some([-10.0, -19.0, 2.0]);
        assert!(error(tilted).contains("not stacked along the slice normal"));
    }

    #[test]
    fn a_missing_slice_of_a_half_millimetre_stack_is_interpolated_and_recorded() {
        // 463 slices 0.5 mm apart, as a real head CT, the 200th missing: one 1.0 mm step.
        let p = plan(regular(463, 0.5, &[200])).unwrap();
        assert_eq!(p.dims[0], 462);
        assert_eq!(p.geometry.spacing[0], 0.5);
        assert_eq!(
            p.interpolated_gaps,
            Some(InterpolatedGaps {
                count: 1,
                largest_mm: 1.0
            })
        );
        // Two separate gaps of 1 and 1.5 mm: both counted, the larger reported.
        let p = plan(regular(100, 0.5, &[10, 50, 51])).unwrap();
        assert_eq!(
            p.interpolated_gaps,
            Some(InterpolatedGaps {
                count: 2,
                largest_mm: 1.5
            })
        );
        // No gap: nothing recorded.
        assert_eq!(plan(regular(50, 0.5, &[])).unwrap().interpolated_gaps, None);
    }

    #[test]
    fn a_gap_larger_than_the_maximum_fails_with_its_slices_named() {
        // 0.5 mm stack, 9 slices missing: a 5 mm step, more than the model's 2 mm.
        let headers = regular(100, 0.5, &(40..49).collect::<Vec<_>>());
        match volume_error(plan(headers)) {
            VolumeError::Gap {
                step_mm,
                before,
                after,
                missing,
                max_gap_mm,
                ..
            } => {
                assert!((step_mm - 5.0).abs() < 1e-9, "{step_mm}");
                assert_eq!((before.as_str(), after.as_str()), ("1.2.39", "1.2.49"));
                assert_eq!(missing, 9);
                assert_eq!(max_gap_mm, 2.0);
            }
            other => panic!("{other:?}"),
        }
        // The maximum is the configuration's: 0 interpolates nothing.
        let strict = VolumeLimits {
            max_gap_mm: 0.0,
            ..Default::default()
        };
        let err = volume_error(plan_volume(regular(20, 0.5, &[5]), &strict));
        assert!(
            matches!(err, VolumeError::Gap { missing: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn spacing_jitter_is_tolerated_but_an_interleaved_stack_is_not() {
        // Positions printed to 0.1 mm of a 0.625 mm stack: steps of 0.6 and 0.7 mm.
        let zs: Vec<f64> = (0..40)
            .map(|k| (k as f64 * 0.625 * 10.0).round() / 10.0)
            .collect();
        let p = plan(stack(&zs)).unwrap();
        assert_eq!((p.dims[0], p.interpolated_gaps), (40, None));
        // One slice 0.3 mm off in a 0.5 mm stack: steps of 0.2 and 0.8 mm (refused when
        // the irregular factor was 0.5). The model samples by real positions; the 0.8 mm
        // step is more than 1.5 times the spacing, so it is reported as interpolated.
        let mut zs: Vec<f64> = (0..20).map(|k| k as f64 * 0.5).collect();
        zs[10] -= 0.3;
        let gaps = plan(stack(&zs)).unwrap().interpolated_gaps.unwrap();
        assert_eq!(gaps.count, 1);
        assert!((gaps.largest_mm - 0.8).abs() < 1e-9, "{gaps:?}");
        // A step of a tenth of the spacing is a second stack, not jitter.
        zs[10] = 4.55;
        assert!(error(stack(&zs)).contains("irregular slice spacing"));
    }

    /// A 512 x 512 stack of 0.5 mm pixels (a 256 mm field of view, as a head or neck CT).
    fn head_ct(n: usize) -> Vec<InstanceHeader> {
        (0..n)
            .map(|k| InstanceHeader {
                image_position_patient: Some([-128.0, -128.0, k as f64 * 0.5]),
                rows: Some(512),
                columns: Some(512),
                ..slice(k, 0.0)
            })
            .collect()
    }

    #[test]
    fn in_plane_position_jitter_is_tolerated_up_to_half_a_millimetre() {
        // The model samples every 1.25 mm in plane: 0.3 mm of drift is below what it can
        // see (refused when the tolerance was a quarter of a 0.5 mm pixel).
        let mut h = head_ct(10);
        h[4].image_position_patient = Some([-127.7, -128.2, 2.0]);
        assert!(plan(h).is_ok());
        let mut h = head_ct(10);
        h[4].image_position_patient = Some([-127.2, -128.0, 2.0]);
        assert!(error(h).contains("not stacked along the slice normal"));
    }

    #[test]
    fn orientation_jitter_is_tolerated_up_to_what_moves_a_voxel_half_a_millimetre() {
        // A 256 mm field (362 mm diagonal): cosines may differ by 0.5 / 362 = 1.38e-3.
        let mut h = head_ct(10);
        h[3].image_orientation_patient = Some([1.0, 0.0012, 0.0, -0.0012, 1.0, 0.0]);
        assert!(plan(h).is_ok());
        let mut h = head_ct(10);
        h[3].image_orientation_patient = Some([1.0, 0.002, 0.0, -0.002, 1.0, 0.0]);
        assert!(error(h).contains("inconsistent orientation"));
        // A tiny matrix cannot widen the tolerance beyond half a degree.
        let mut h = stack(&[0.0, 1.0, 2.0]);
        h[1].image_orientation_patient = Some([1.0, 0.02, 0.0, -0.02, 1.0, 0.0]);
        assert!(error(h).contains("inconsistent orientation"));
    }

    #[test]
    fn pixel_spacing_jitter_is_tolerated_up_to_what_moves_a_voxel_half_a_millimetre() {
        // A rounding difference of the printed value (0.48828125 against 0.488281) and,
        // on a 256 x 256 matrix, 1.5e-3 mm (the last column moves 0.38 mm) are the same
        // spacing; 3e-3 mm on that matrix (0.77 mm) is not.
        let mut h = head_ct(5);
        for s in &mut h {
            s.pixel_spacing = Some([0.48828125, 0.48828125]);
        }
        h[2].pixel_spacing = Some([0.488281, 0.488281]);
        assert!(plan(h).is_ok());
        let small = |jitter: f64| {
            let mut h = head_ct(5);
            for s in &mut h {
                (s.rows, s.columns) = (Some(256), Some(256));
                s.pixel_spacing = Some([0.9, 0.9]);
            }
            h[2].pixel_spacing = Some([0.9, 0.9 + jitter]);
            plan(h)
        };
        assert!(small(1.5e-3).is_ok());
        assert!(format!("{:#}", small(3e-3).unwrap_err()).contains("inconsistent pixel spacing"));
    }

    #[test]
    fn the_default_limits_are_the_configs_and_validated() {
        let config = AssemblyConfig::default();
        assert_eq!(VolumeLimits::default(), config.volume_limits());
        assert_eq!(config.volume_limits().max_volume_bytes, 768 << 20);
        config.validate().unwrap();
        for bad in [
            AssemblyConfig {
                max_slices: 0,
                ..Default::default()
            },
            AssemblyConfig {
                max_volume_mib: 0,
                ..Default::default()
            },
            AssemblyConfig {
                max_interpolated_gap_mm: f64::NAN,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn inconsistent_matrix_spacing_and_missing_position_fail() {
        let mut h = stack(&[0.0, 1.0, 2.0]);
        h[1].columns = Some(8);
        assert!(error(h).contains("inconsistent matrix size"));
        let mut h = stack(&[0.0, 1.0, 2.0]);
        h[2].pixel_spacing = Some([0.5, 0.6]);
        assert!(error(h).contains("inconsistent pixel spacing"));
        let mut h = stack(&[0.0, 1.0, 2.0]);
        h[0].image_position_patient = None;
        assert!(error(h).contains("no valid ImagePositionPatient"));
    }

    #[test]
    fn a_matrix_too_large_for_ct_fails_before_anything_is_allocated() {
        let mut h = stack(&[0.0, 1.0]);
        for s in &mut h {
            (s.rows, s.columns) = (Some(65535), Some(65535));
        }
        assert!(error(h).contains("more than 4096 pixels a side"));
    }
}
