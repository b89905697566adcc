//! Volume building: from the instance files of one series to a sorted, validated HU
//! volume ([`CtVolume`]).
//!
//! Two passes keep memory bounded: the headers (already read by the assembler) are
//! validated and sorted along the slice normal first, then every file is decoded on its
//! own and its window (the rows and columns of the slice the model samples,
//! [`InPlaneWindow`]; the whole slice offline) copied into its slot of the final buffer.
//! Peak memory is the int16 volume of the windows plus one file and its decoded frame,
//! whatever the number of slices.
//!
//! Slices are ordered by `dot(ImagePositionPatient, normal)`, never by InstanceNumber
//! (scanners number reversed, restart numbering, or number by acquisition).

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::{PhotometricInterpretation, PixelDecoder, PixelRepresentation};
use time::OffsetDateTime;

use super::header::{cross, direction_cosines, dot, floats, int, normalize, InstanceHeader};
use super::{CtVolume, Geometry, InPlaneWindow, SeriesMeta, SliceInfo, VolumeWindow};

/// HU written for pixels flagged by (0028,0120) Pixel Padding Value: air.
pub const PADDING_HU: i16 = -1024;

/// Two slices closer than this along the normal are the same position.
const DUPLICATE_TOLERANCE_MM: f64 = 0.01;
/// A step larger than this times the median spacing means missing slices.
pub const GAP_FACTOR: f64 = 1.5;
/// A step smaller than this times the median spacing means an irregular stack.
pub const IRREGULAR_FACTOR: f64 = 0.5;
/// Orientation cosines and pixel spacings agree when they differ by less than this.
const ORIENTATION_TOLERANCE: f64 = 1e-3;
const PIXEL_SPACING_TOLERANCE_MM: f64 = 1e-3;
/// Allowed in-plane drift of ImagePositionPatient between slices, in pixels.
const IN_PLANE_TOLERANCE_PX: f64 = 0.25;
/// Largest Rows or Columns accepted. CT slices are 512 to 2048 pixels wide; Rows and
/// Columns can say 65535, and the volume (then the decoder) allocates and zero-fills what
/// they say before any pixel is read: 8 GiB per slice from one small, compressed instance.
pub const MAX_MATRIX: usize = 4096;

/// Builds the whole volume of one series. Every error is a reason for
/// [`super::SeriesOutcome::Failed`]; it names the slice (SOP Instance UID) at fault.
pub fn build_volume(headers: Vec<InstanceHeader>, meta: SeriesMeta) -> Result<CtVolume> {
    build_volume_within(headers, meta, None)
}

/// As [`build_volume`], keeping only the window that `window` chooses of each slice
/// (every slice is still decoded whole, so a slice that cannot be decoded fails the
/// series wherever the window lies).
pub fn build_volume_within(
    headers: Vec<InstanceHeader>,
    mut meta: SeriesMeta,
    window: Option<&VolumeWindow>,
) -> Result<CtVolume> {
    let plan = plan_volume(headers)?;
    let [n, rows, cols] = plan.dims;
    let full = InPlaneWindow::full(rows, cols);
    let window = match window {
        Some(choose) => {
            let w = (choose.0)(&plan);
            ensure!(
                w.matrix() == [rows, cols],
                "window of a {:?} matrix chosen for a {rows}x{cols} series",
                w.matrix()
            );
            w
        }
        None => full.clone(),
    };
    let kept = window.len();
    let len = n
        .checked_mul(kept)
        .ok_or_else(|| anyhow!("volume of {n}x{rows}x{cols} voxels is too large"))?;
    // Zero-initialised allocation is lazily backed by the OS: only pages actually written
    // cost memory, and there is no second copy anywhere.
    let mut voxels: Vec<i16> = Vec::new();
    voxels
        .try_reserve_exact(len)
        .with_context(|| format!("cannot allocate {} MiB for the volume", (len * 2) >> 20))?;
    voxels.resize(len, 0);
    // A whole volume is decoded straight into its slots; a windowed one through one slice.
    let whole = window == full;
    let mut scratch = if whole {
        Vec::new()
    } else {
        vec![0i16; rows * cols]
    };
    for (k, header) in plan.sorted.iter().enumerate() {
        let slot = &mut voxels[k * kept..(k + 1) * kept];
        let decoded = if whole {
            decode_slice_into(&header.path, rows, cols, slot)
        } else {
            decode_slice_into(&header.path, rows, cols, &mut scratch).map(|()| {
                let kept_cols = window.cols();
                for (&r, out) in window
                    .rows()
                    .iter()
                    .zip(slot.chunks_exact_mut(kept_cols.len().max(1)))
                {
                    let row = &scratch[r * cols..(r + 1) * cols];
                    for (o, &c) in out.iter_mut().zip(kept_cols) {
                        *o = row[c];
                    }
                }
            })
        };
        decoded.with_context(|| {
            format!(
                "cannot decode slice {} ({})",
                header.sop_instance_uid,
                header.path.display()
            )
        })?;
    }
    let slices = plan
        .sorted
        .iter()
        .zip(&plan.z)
        .map(|(h, &z_mm)| SliceInfo {
            sop_instance_uid: h.sop_instance_uid.clone(),
            z_mm,
        })
        .collect::<Vec<SliceInfo>>();
    meta.sop_instance_uids =
        super::sorted_unique_uids(slices.iter().map(|s| s.sop_instance_uid.as_str()));
    Ok(CtVolume {
        voxels,
        dims: plan.dims,
        window,
        geometry: plan.geometry,
        slices,
        meta,
    })
}

/// The validated, sorted stack of a series, before any pixel is decoded.
#[derive(Debug)]
pub struct VolumePlan {
    pub sorted: Vec<InstanceHeader>,
    /// Position of each sorted slice along the normal, mm.
    pub z: Vec<f64>,
    pub dims: [usize; 3],
    pub geometry: Geometry,
}

/// Checks geometry consistency and sorts along the slice normal: duplicates, gaps,
/// mixed orientation / pixel spacing / matrix size and sheared stacks are errors.
pub fn plan_volume(headers: Vec<InstanceHeader>) -> Result<VolumePlan> {
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

    let mut stack = Vec::with_capacity(headers.len());
    for h in headers.iter() {
        let iop = require(h, h.image_orientation_patient, "ImageOrientationPatient")?;
        if iop
            .iter()
            .zip(&ref_iop)
            .any(|(a, b)| (a - b).abs() > ORIENTATION_TOLERANCE)
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
            .any(|(a, b)| (a - b).abs() > PIXEL_SPACING_TOLERANCE_MM)
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
    let in_plane_tolerance = IN_PLANE_TOLERANCE_PX * ref_spacing[0].min(ref_spacing[1]);
    for (_, ipp, h) in &stack {
        let d = [ipp[0] - origin[0], ipp[1] - origin[1], ipp[2] - origin[2]];
        let (along_row, along_col) = (dot(d, row_dir), dot(d, col_dir));
        if along_row.abs() > in_plane_tolerance || along_col.abs() > in_plane_tolerance {
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
    for (i, &step) in steps.iter().enumerate() {
        if step > GAP_FACTOR * slice_spacing {
            bail!(
                "gap in slice positions: {step:.3} mm between slices {} (at {:.3} mm) and {} (at {:.3} mm), \
                 median spacing {slice_spacing:.3} mm: about {} slice(s) missing",
                stack[i].2.sop_instance_uid,
                stack[i].0,
                stack[i + 1].2.sop_instance_uid,
                stack[i + 1].0,
                ((step / slice_spacing).round() as i64 - 1).max(1)
            );
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
    })
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

/// Decodes one single-frame instance into `out` (rows x cols HU values).
pub fn decode_slice_into(path: &Path, rows: usize, cols: usize, out: &mut [i16]) -> Result<()> {
    let obj = OpenFileOptions::new()
        .open_file(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    decode_object_into(&obj, rows, cols, out)
}

/// Decodes one file as a stand-alone HU slice (rows, columns, values): for tools and tests.
pub fn decode_slice(path: &Path) -> Result<(usize, usize, Vec<i16>)> {
    let obj = OpenFileOptions::new()
        .open_file(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let rows = int(&obj, tags::ROWS).context("no Rows")? as usize;
    let cols = int(&obj, tags::COLUMNS).context("no Columns")? as usize;
    let mut out = vec![0; rows * cols];
    decode_object_into(&obj, rows, cols, &mut out)?;
    Ok((rows, cols, out))
}

/// Stored value -> HU: mask to BitsStored, sign-extend when PixelRepresentation is 1,
/// map padding to [`PADDING_HU`], apply RescaleSlope/Intercept, round and clamp to i16.
fn decode_object_into(
    obj: &DefaultDicomObject,
    rows: usize,
    cols: usize,
    out: &mut [i16],
) -> Result<()> {
    if let Some(frames) = int(obj, tags::NUMBER_OF_FRAMES) {
        ensure!(
            frames <= 1,
            "multi-frame instance ({frames} frames) is not a classic CT slice"
        );
    }
    // A decoder that panics on corrupt data must fail this slice (a `failed` result), not
    // the series job, which would then end without any result: dicom-transfer-syntax-registry
    // 0.10.1's RLE decoder indexes past a segment that decodes short (found by the
    // `series_slice` fuzz target). Its state is local to the call, so nothing is left
    // half-updated.
    let pixels = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| obj.decode_pixel_data()))
        .map_err(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            anyhow!("the pixel data decoder panicked: {what}")
        })?
        .map_err(anyhow::Error::new)?;
    ensure!(
        pixels.samples_per_pixel() == 1,
        "SamplesPerPixel is {}, a CT slice has 1",
        pixels.samples_per_pixel()
    );
    ensure!(
        matches!(
            pixels.photometric_interpretation(),
            PhotometricInterpretation::Monochrome1 | PhotometricInterpretation::Monochrome2
        ),
        "PhotometricInterpretation {} is not monochrome",
        pixels.photometric_interpretation()
    );
    ensure!(
        (pixels.rows() as usize, pixels.columns() as usize) == (rows, cols),
        "decoded frame is {}x{}, header says {rows}x{cols}",
        pixels.rows(),
        pixels.columns()
    );
    ensure!(out.len() == rows * cols, "output slot has the wrong size");

    let bits_allocated = pixels.bits_allocated();
    let bits_stored = pixels.bits_stored();
    let high_bit = pixels.high_bit();
    ensure!(
        bits_stored >= 1 && bits_stored <= bits_allocated && high_bit < bits_allocated && high_bit + 1 >= bits_stored,
        "inconsistent BitsAllocated {bits_allocated} / BitsStored {bits_stored} / HighBit {high_bit}"
    );
    let signed = pixels.pixel_representation() == PixelRepresentation::Signed;
    let shift = u32::from(high_bit + 1 - bits_stored);
    let mask: u32 = if bits_stored >= 32 {
        u32::MAX
    } else {
        (1u32 << bits_stored) - 1
    };
    let sign_bit = 1u32 << (bits_stored - 1);
    // Stored sample (as found in the buffer) -> its integer value.
    let stored_value = |raw: u32| -> i32 {
        let v = (raw >> shift) & mask;
        if signed && v & sign_bit != 0 {
            (v as i64 - (1i64 << bits_stored)) as i32
        } else {
            v as i32
        }
    };

    let slope = floats::<1>(obj, tags::RESCALE_SLOPE).map_or(1.0, |[s]| s);
    let intercept = floats::<1>(obj, tags::RESCALE_INTERCEPT).map_or(0.0, |[i]| i);
    ensure!(slope != 0.0, "RescaleSlope is 0");

    // Pixel Padding Value (and optional Range Limit) are compared with stored values. Their
    // VR (US or SS) follows PixelRepresentation, but an implicit-VR reader may have parsed
    // an SS value as US: re-read the 16-bit pattern with the pixel's signedness.
    let padding_value = |tag| {
        int(obj, tag).map(|v| {
            let bits = (v as u64 & 0xFFFF) as u32;
            if signed && bits & 0x8000 != 0 {
                bits as i32 - 0x1_0000
            } else {
                bits as i32
            }
        })
    };
    let padding = match (
        padding_value(tags::PIXEL_PADDING_VALUE),
        padding_value(tags::PIXEL_PADDING_RANGE_LIMIT),
    ) {
        (Some(a), Some(b)) => Some((a.min(b), a.max(b))),
        (Some(a), None) => Some((a, a)),
        _ => None,
    };

    let data = pixels.data();
    let n = rows * cols;
    let to_hu = |value: i32| -> i16 {
        if let Some((lo, hi)) = padding {
            if value >= lo && value <= hi {
                return PADDING_HU;
            }
        }
        let hu = (f64::from(value) * slope + intercept).round();
        hu.clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16
    };
    match bits_allocated {
        8 => {
            ensure!(
                data.len() >= n,
                "pixel data is {} bytes, expected {n}",
                data.len()
            );
            for (o, &b) in out.iter_mut().zip(&data[..n]) {
                *o = to_hu(stored_value(u32::from(b)));
            }
        }
        16 => {
            ensure!(
                data.len() >= 2 * n,
                "pixel data is {} bytes, expected {}",
                data.len(),
                2 * n
            );
            for (o, b) in out.iter_mut().zip(data[..2 * n].chunks_exact(2)) {
                *o = to_hu(stored_value(u32::from(u16::from_le_bytes([b[0], b[1]]))));
            }
        }
        other => bail!("BitsAllocated {other} is not supported for CT (8 or 16)"),
    }
    Ok(())
}

/// Identifying metadata of a series, from one of its instances (offline use: no
/// association, so no calling AE and no reception times).
pub fn meta_from_header(h: &InstanceHeader) -> SeriesMeta {
    SeriesMeta {
        study_instance_uid: h.study_instance_uid.clone(),
        series_instance_uid: h.series_instance_uid.clone(),
        accession_number: h.accession_number.clone(),
        patient_id: h.patient_id.clone(),
        station_name: h.station_name.clone(),
        series_description: h.series_description.clone(),
        calling_ae: String::new(),
        first_received: None,
        last_received: None,
        completed: Some(OffsetDateTime::now_utc()),
        sop_instance_uids: Vec::new(),
        early: None,
        failed_better: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(k: usize, z: f64) -> InstanceHeader {
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

    fn stack(zs: &[f64]) -> Vec<InstanceHeader> {
        zs.iter().enumerate().map(|(k, &z)| slice(k, z)).collect()
    }

    fn error(headers: Vec<InstanceHeader>) -> String {
        format!("{:#}", plan_volume(headers).expect_err("plan should fail"))
    }

    /// `tests/fixtures/fuzz/series_slice-rle-short-segment.bin` (a `series_slice` fuzz
    /// input: selector byte, then the data set) as the spool stores it.
    fn spooled_fuzz_input(bytes: &[u8], dir: &Path) -> std::path::PathBuf {
        let (ts, _) = crate::dicom::syntax::ACCEPTED_TRANSFER_SYNTAXES[bytes[0] as usize];
        let meta = dicom_object::meta::FileMetaTableBuilder::new()
            .transfer_syntax(ts)
            .media_storage_sop_class_uid(crate::dicom::syntax::CT_IMAGE_STORAGE)
            .media_storage_sop_instance_uid("1.2.826.0.1.3680043.8.498.1")
            .implementation_class_uid("1.2.826.0.1.3680043.8.498.2")
            .build()
            .unwrap();
        let mut file = vec![0u8; 128];
        file.extend_from_slice(b"DICM");
        meta.write(&mut file).unwrap();
        file.extend_from_slice(&bytes[1..]);
        let path = dir.join("slice.dcm");
        std::fs::write(&path, file).unwrap();
        path
    }

    #[test]
    fn a_panicking_pixel_decoder_fails_the_slice() {
        let bytes = include_bytes!("../../tests/fixtures/fuzz/series_slice-rle-short-segment.bin");
        let dir = tempfile::tempdir().unwrap();
        let path = spooled_fuzz_input(bytes, dir.path());
        let err = format!("{:#}", decode_slice(&path).unwrap_err());
        assert!(err.contains("the pixel data decoder panicked"), "{err}");
        // Through the daemon's entry point: a failed series with that reason.
        let header = InstanceHeader::read(&path).unwrap();
        let err = format!(
            "{:#}",
            build_volume(vec![header], SeriesMeta::default()).unwrap_err()
        );
        assert!(
            err.contains("cannot decode slice") && err.contains("panicked"),
            "{err}"
        );
    }

    #[test]
    fn sorts_along_the_normal_and_measures_spacing() {
        let plan = plan_volume(stack(&[3.0, 1.0, 2.0, 0.0])).unwrap();
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
        let plan = plan_volume(headers).unwrap();
        assert_eq!(plan.geometry.normal, [0.0, 0.0, -1.0]);
        assert_eq!(plan.geometry.origin[2], 2.0);
    }

    #[test]
    fn resent_instance_is_not_a_duplicate_but_a_second_one_at_the_same_place_is() {
        let mut headers = stack(&[0.0, 1.0, 2.0]);
        headers.push(headers[1].clone());
        assert_eq!(plan_volume(headers).unwrap().dims[0], 3);
        let reason = error(stack(&[0.0, 1.0, 1.0, 2.0]));
        assert!(reason.contains("duplicate slice position"), "{reason}");
    }

    #[test]
    fn gaps_irregular_spacing_and_shear_fail() {
        assert!(error(stack(&[0.0, 1.0, 2.0, 4.0, 5.0])).contains("about 1 slice(s) missing"));
        assert!(error(stack(&[0.0, 1.0, 2.0, 2.3, 3.3, 4.3])).contains("irregular slice spacing"));
        let mut tilted = stack(&[0.0, 1.0, 2.0]);
        tilted[2].image_position_patient = Some([-10.0, -19.0, 2.0]);
        assert!(error(tilted).contains("not stacked along the slice normal"));
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
