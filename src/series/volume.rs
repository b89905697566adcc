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
//!
//! The first pass is [`super::plan`] (geometry checks, gaps, the slice-count limit); the
//! bytes of the volume (window included) are checked against [`VolumeLimits`] before it
//! is allocated, from the headers alone.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::{PhotometricInterpretation, PixelDecoder, PixelRepresentation};
use time::OffsetDateTime;

use super::header::{floats, int, InstanceHeader};
pub use super::plan::{
    plan_volume, VolumeError, VolumeLimits, VolumePlan, GAP_FACTOR, IRREGULAR_FACTOR, MAX_MATRIX,
    MAX_MISPLACEMENT_MM,
};
use super::{CtVolume, InPlaneWindow, SeriesMeta, SliceInfo, VolumeWindow};

/// HU written for pixels flagged by (0028,0120) Pixel Padding Value: air.
pub const PADDING_HU: i16 = -1024;

/// Why a series' volume could not be built ([`build_volume_within`]): the reason of a
/// [`super::FailReason::Build`]. [`std::fmt::Display`] is the whole text, causes
/// included (the `reason` a `failed` result publishes), so no variant has a
/// [`std::error::Error::source`] that a reporter would print again.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Refused on the headers' numbers alone: too many slices, too many bytes, a gap too
    /// wide to interpolate.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The slices' headers do not make one volume ([`plan_volume`]): a tag missing,
    /// inconsistent orientation, spacing or matrix, a sheared stack, duplicate or
    /// irregular positions. The text names the slice at fault.
    #[error("{0:#}")]
    Headers(anyhow::Error),
    /// The [`VolumeWindow`] chose a window of another matrix than the series' (a bug in
    /// the chooser, not in the data).
    #[error(
        "window of a {window:?} matrix chosen for a {}x{} series",
        .matrix[0],
        .matrix[1]
    )]
    WindowMismatch {
        window: [usize; 2],
        matrix: [usize; 2],
    },
    /// The voxel buffer, within the limits, could not be allocated.
    #[error("cannot allocate {} MiB for the volume: {cause}", .bytes >> 20)]
    Allocation {
        bytes: u64,
        cause: std::collections::TryReserveError,
    },
    /// A slice could not be read or decoded (or does not decode to what its header says).
    #[error("cannot decode slice {sop_instance_uid} ({}): {cause:#}", .path.display())]
    Decode {
        sop_instance_uid: String,
        path: std::path::PathBuf,
        cause: anyhow::Error,
    },
}

impl BuildError {
    /// A [`plan_volume`] error: its [`VolumeError`] if it is one, else the headers'.
    fn of_plan(e: anyhow::Error) -> BuildError {
        match e.downcast::<VolumeError>() {
            Ok(v) => BuildError::Volume(v),
            Err(e) => BuildError::Headers(e),
        }
    }
}

/// Builds the whole volume of one series within the default [`VolumeLimits`]. Every
/// error is the reason of a [`super::SeriesOutcome::Failed`] ([`super::FailReason::Build`]);
/// it names the slice (SOP Instance UID) at fault.
pub fn build_volume(
    headers: Vec<InstanceHeader>,
    meta: SeriesMeta,
) -> Result<CtVolume, BuildError> {
    build_volume_within(headers, meta, None, &VolumeLimits::default())
}

/// As [`build_volume`], keeping only the window that `window` chooses of each slice
/// (every slice is still decoded whole, so a slice that cannot be decoded fails the
/// series wherever the window lies), within `limits`: nothing is allocated for a series
/// beyond them.
pub fn build_volume_within(
    headers: Vec<InstanceHeader>,
    mut meta: SeriesMeta,
    window: Option<&VolumeWindow>,
    limits: &VolumeLimits,
) -> Result<CtVolume, BuildError> {
    let plan = plan_volume(headers, limits).map_err(BuildError::of_plan)?;
    let [n, rows, cols] = plan.dims;
    let full = InPlaneWindow::full(rows, cols);
    let window = match window {
        Some(choose) => {
            let w = (choose.0)(&plan);
            if w.matrix() != [rows, cols] {
                return Err(BuildError::WindowMismatch {
                    window: w.matrix(),
                    matrix: [rows, cols],
                });
            }
            w
        }
        None => full.clone(),
    };
    let kept = window.len();
    let bytes = (n as u64)
        .saturating_mul(kept as u64)
        .saturating_mul(std::mem::size_of::<i16>() as u64);
    if bytes > limits.max_volume_bytes {
        return Err(VolumeError::TooLarge {
            slices: n,
            rows,
            cols,
            kept,
            bytes,
            max_bytes: limits.max_volume_bytes,
        }
        .into());
    }
    let len = n * kept; // at most max_volume_bytes / 2: no overflow
                        // Zero-initialised allocation is lazily backed by the OS: only pages actually written
                        // cost memory, and there is no second copy anywhere.
    let mut voxels: Vec<i16> = Vec::new();
    voxels
        .try_reserve_exact(len)
        .map_err(|cause| BuildError::Allocation { bytes, cause })?;
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
        decoded.map_err(|cause| BuildError::Decode {
            sop_instance_uid: header.sop_instance_uid.clone(),
            path: header.path.clone(),
            cause,
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
    meta.interpolated_gaps = plan.interpolated_gaps;
    if let Some(gaps) = plan.interpolated_gaps {
        log::info!(
            "series {}: {} gap(s) in slice positions interpolated, the largest {:.3} mm",
            meta.series_instance_uid,
            gaps.count,
            gaps.largest_mm
        );
    }
    Ok(CtVolume {
        voxels,
        dims: plan.dims,
        window,
        geometry: plan.geometry,
        slices,
        meta,
    })
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
        interpolated_gaps: None,
        slice_thickness_mm: h.slice_thickness,
        convolution_kernel: h.convolution_kernel.clone(),
        source: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::plan::tests::{regular, slice};

    /// The [`VolumeError`] a build was refused with.
    fn volume_error<T: std::fmt::Debug>(result: Result<T, BuildError>) -> VolumeError {
        match result.expect_err("should be refused") {
            BuildError::Volume(e) => e,
            other => panic!("not a VolumeError: {other:?}"),
        }
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
        let sop = header.sop_instance_uid.clone();
        match build_volume(vec![header], SeriesMeta::default()).unwrap_err() {
            BuildError::Decode {
                sop_instance_uid,
                cause,
                ..
            } => {
                assert_eq!(sop_instance_uid, sop);
                assert!(format!("{cause:#}").contains("panicked"), "{cause:#}");
            }
            other => panic!("not a decode error: {other:?}"),
        }
    }

    #[test]
    fn more_slices_than_the_limit_fail_before_anything_is_built() {
        let limits = VolumeLimits {
            max_slices: 10,
            ..Default::default()
        };
        assert!(plan_volume(regular(10, 1.0, &[]), &limits).is_ok());
        // No file behind these headers: the refusal comes from the headers alone.
        let err = volume_error(build_volume_within(
            regular(11, 1.0, &[]),
            SeriesMeta::default(),
            None,
            &limits,
        ));
        assert_eq!(
            err,
            VolumeError::TooManySlices {
                slices: 11,
                max: 10
            }
        );
        // A re-sent instance is one slice, not two.
        let mut h = regular(10, 1.0, &[]);
        h.push(h[0].clone());
        assert!(plan_volume(h, &limits).is_ok());
    }

    #[test]
    fn a_volume_larger_than_the_limit_fails_before_it_is_allocated() {
        // What a review sent: 48 small instances saying 4096 x 4096 pixels of 0.05 mm.
        let headers: Vec<InstanceHeader> = (0..48)
            .map(|k| InstanceHeader {
                rows: Some(4096),
                columns: Some(4096),
                pixel_spacing: Some([0.05, 0.05]),
                ..slice(k, k as f64)
            })
            .collect();
        // The whole matrix: 48 x 4096 x 4096 x 2 bytes = 1536 MiB, more than the default.
        let err = volume_error(build_volume(headers.clone(), SeriesMeta::default()));
        assert_eq!(
            err,
            VolumeError::TooLarge {
                slices: 48,
                rows: 4096,
                cols: 4096,
                kept: 4096 * 4096,
                bytes: 48 * 4096 * 4096 * 2,
                max_bytes: 768 << 20,
            }
        );
        // The window counts, not the matrix: a window of 256 x 256 of each slice (6 MiB)
        // is within the default and gets as far as decoding (no file here).
        let window = VolumeWindow(std::sync::Arc::new(|p: &VolumePlan| {
            InPlaneWindow::new(p.dims[1], p.dims[2], 0..256, 0..256)
        }));
        let err = build_volume_within(
            headers.clone(),
            SeriesMeta::default(),
            Some(&window),
            &VolumeLimits::default(),
        )
        .unwrap_err();
        assert!(matches!(err, BuildError::Decode { .. }), "{err:?}");
        // ... and refused under a lower limit.
        let limits = VolumeLimits {
            max_volume_bytes: 4 << 20,
            ..Default::default()
        };
        let err = volume_error(build_volume_within(
            headers,
            SeriesMeta::default(),
            Some(&window),
            &limits,
        ));
        assert!(
            matches!(err, VolumeError::TooLarge { kept, .. } if kept == 256 * 256),
            "{err:?}"
        );
    }
}
