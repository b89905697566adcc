//! The header of one instance: every attribute that series selection and volume
//! building look at, read without the pixel data.
//!
//! Reading stops at (7FE0,0010) Pixel Data, so parsing a header costs a few kB of I/O
//! even for a 512 kB slice; volume building later decodes pixels one file at a time.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions, Tag};

/// Longest value kept of one source attribute, bytes. The longest conformant value among
/// them is a PN of three 64-character groups, 4 bytes a character at most, with ISO 2022
/// escapes: below 1 kB.
pub const MAX_SOURCE_VALUE_BYTES: usize = 1024;

/// Longest UID (PS3.5 9.1).
pub const MAX_UID_BYTES: usize = 64;

/// Patient and study attributes of one instance that the series stage does not otherwise
/// read, each at most [`MAX_SOURCE_VALUE_BYTES`] long (see [`super::source`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatientStudy {
    /// (0008,0005) Specific Character Set, all values.
    pub specific_character_set: Vec<String>,
    pub patient_name: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub study_date: String,
    pub study_time: String,
    pub referring_physician_name: String,
    pub study_id: String,
    pub study_description: String,
    /// Keywords of attributes left out for being longer than [`MAX_SOURCE_VALUE_BYTES`].
    pub over_limit: Vec<String>,
}

/// Selected attributes of one DICOM instance (PS3.3 CT Image IOD, General Series,
/// Image Plane and Image Pixel modules). Optional where the standard allows absence
/// or where a bad sender may leave them out; the consumer decides what is fatal.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceHeader {
    pub path: PathBuf,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub modality: String,
    /// (0008,0008) Image Type, upper case, e.g. `["ORIGINAL", "PRIMARY", "AXIAL"]`.
    pub image_type: Vec<String>,
    pub accession_number: String,
    pub patient_id: String,
    pub station_name: String,
    pub series_description: String,
    pub series_number: Option<i64>,
    /// Informational only: slices are never ordered by it.
    pub instance_number: Option<i64>,
    /// (0018,1210) Convolution Kernel, all values joined with `\`.
    pub convolution_kernel: String,
    pub slice_thickness: Option<f64>,
    /// (0020,1002) Images in Acquisition.
    pub images_in_acquisition: Option<u32>,
    /// (0028,0008) Number of Frames (multi-frame objects).
    pub number_of_frames: Option<u32>,
    pub image_position_patient: Option<[f64; 3]>,
    pub image_orientation_patient: Option<[f64; 6]>,
    /// (0028,0030) Pixel Spacing: [between rows, between columns] in mm.
    pub pixel_spacing: Option<[f64; 2]>,
    pub rows: Option<u32>,
    pub columns: Option<u32>,
    /// Patient and study attributes that result objects copy ([`super::SourceStudy`]).
    pub patient_study: PatientStudy,
}

impl InstanceHeader {
    /// Reads the header of a DICOM Part 10 file, stopping before the pixel data.
    pub fn read(path: &Path) -> Result<InstanceHeader> {
        let obj = OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(path)
            .with_context(|| format!("cannot read DICOM header of {}", path.display()))?;
        Self::from_object(path, &obj)
    }

    /// Extracts the header fields from an already opened object.
    pub fn from_object(path: &Path, obj: &DefaultDicomObject) -> Result<InstanceHeader> {
        let meta = obj.meta();
        let ds: &InMemDicomObject = obj;
        let trim = |s: &str| s.trim_end_matches('\0').trim().to_string();
        let sop_instance_uid = match text(ds, tags::SOP_INSTANCE_UID) {
            Some(uid) => uid,
            None => trim(meta.media_storage_sop_instance_uid()),
        };
        let sop_class_uid = match text(ds, tags::SOP_CLASS_UID) {
            Some(uid) => uid,
            None => trim(meta.media_storage_sop_class_uid()),
        };
        if sop_instance_uid.is_empty() {
            bail!("{} has no SOP Instance UID", path.display());
        }
        Ok(InstanceHeader {
            path: path.to_path_buf(),
            sop_class_uid,
            sop_instance_uid,
            study_instance_uid: text(ds, tags::STUDY_INSTANCE_UID).unwrap_or_default(),
            series_instance_uid: text(ds, tags::SERIES_INSTANCE_UID).unwrap_or_default(),
            transfer_syntax_uid: trim(meta.transfer_syntax()),
            modality: text(ds, tags::MODALITY).unwrap_or_default(),
            image_type: strings(ds, tags::IMAGE_TYPE)
                .into_iter()
                .map(|s| s.to_ascii_uppercase())
                .collect(),
            accession_number: text(ds, tags::ACCESSION_NUMBER).unwrap_or_default(),
            patient_id: text(ds, tags::PATIENT_ID).unwrap_or_default(),
            station_name: text(ds, tags::STATION_NAME).unwrap_or_default(),
            series_description: text(ds, tags::SERIES_DESCRIPTION).unwrap_or_default(),
            series_number: int(ds, tags::SERIES_NUMBER),
            instance_number: int(ds, tags::INSTANCE_NUMBER),
            convolution_kernel: strings(ds, tags::CONVOLUTION_KERNEL).join("\\"),
            slice_thickness: floats::<1>(ds, tags::SLICE_THICKNESS).map(|[t]| t),
            images_in_acquisition: int(ds, tags::IMAGES_IN_ACQUISITION)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n > 0),
            number_of_frames: int(ds, tags::NUMBER_OF_FRAMES).and_then(|n| u32::try_from(n).ok()),
            image_position_patient: floats::<3>(ds, tags::IMAGE_POSITION_PATIENT),
            image_orientation_patient: floats::<6>(ds, tags::IMAGE_ORIENTATION_PATIENT),
            pixel_spacing: floats::<2>(ds, tags::PIXEL_SPACING),
            rows: int(ds, tags::ROWS).and_then(|n| u32::try_from(n).ok()),
            columns: int(ds, tags::COLUMNS).and_then(|n| u32::try_from(n).ok()),
            patient_study: patient_study(ds),
        })
    }

    /// Slice normal (row direction x column direction), when the orientation is usable.
    pub fn normal(&self) -> Option<[f64; 3]> {
        let iop = self.image_orientation_patient?;
        let (row, col) = direction_cosines(&iop)?;
        normalize(cross(row, col))
    }
}

/// Splits ImageOrientationPatient into unit row and column directions; `None` when a
/// vector is zero or the two are far from orthogonal (a corrupt header).
pub fn direction_cosines(iop: &[f64; 6]) -> Option<([f64; 3], [f64; 3])> {
    let row = normalize([iop[0], iop[1], iop[2]])?;
    let col = normalize([iop[3], iop[4], iop[5]])?;
    if dot(row, col).abs() > 1e-2 {
        return None;
    }
    Some((row, col))
}

pub fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

pub fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

pub fn normalize(v: [f64; 3]) -> Option<[f64; 3]> {
    let n = dot(v, v).sqrt();
    if !n.is_finite() || n < 1e-6 {
        return None;
    }
    Some([v[0] / n, v[1] / n, v[2] / n])
}

/// `value` if it is at most [`MAX_SOURCE_VALUE_BYTES`] long, else empty with `keyword`
/// noted in `over_limit` (header parsing).
pub(crate) fn bounded(
    value: Option<String>,
    keyword: &str,
    over_limit: &mut Vec<String>,
) -> String {
    match value {
        Some(v) if v.len() > MAX_SOURCE_VALUE_BYTES => {
            over_limit.push(keyword.to_owned());
            String::new()
        }
        Some(v) => v,
        None => String::new(),
    }
}

/// The patient and study attributes of [`PatientStudy`], each bounded.
fn patient_study(ds: &InMemDicomObject) -> PatientStudy {
    let mut over_limit = Vec::new();
    let mut get = |tag: Tag, keyword: &str| bounded(text(ds, tag), keyword, &mut over_limit);
    let patient_name = get(tags::PATIENT_NAME, "PatientName");
    let patient_birth_date = get(tags::PATIENT_BIRTH_DATE, "PatientBirthDate");
    let patient_sex = get(tags::PATIENT_SEX, "PatientSex");
    let study_date = get(tags::STUDY_DATE, "StudyDate");
    let study_time = get(tags::STUDY_TIME, "StudyTime");
    let referring_physician_name = get(tags::REFERRING_PHYSICIAN_NAME, "ReferringPhysicianName");
    let study_id = get(tags::STUDY_ID, "StudyID");
    let study_description = get(tags::STUDY_DESCRIPTION, "StudyDescription");
    let charset = strings(ds, tags::SPECIFIC_CHARACTER_SET);
    let specific_character_set =
        if charset.iter().map(String::len).sum::<usize>() > MAX_SOURCE_VALUE_BYTES {
            over_limit.push("SpecificCharacterSet".to_owned());
            Vec::new()
        } else {
            charset
        };
    PatientStudy {
        specific_character_set,
        patient_name,
        patient_birth_date,
        patient_sex,
        study_date,
        study_time,
        referring_physician_name,
        study_id,
        study_description,
        over_limit,
    }
}

/// A string attribute, trimmed of DICOM padding; `None` if absent or empty.
pub(crate) fn text(ds: &InMemDicomObject, tag: Tag) -> Option<String> {
    let value = ds.get(tag)?.to_str().ok()?;
    let value = value.trim_end_matches('\0').trim();
    (!value.is_empty()).then(|| value.to_string())
}

fn strings(ds: &InMemDicomObject, tag: Tag) -> Vec<String> {
    ds.get(tag)
        .and_then(|e| e.to_multi_str().ok())
        .map(|v| {
            v.iter()
                .map(|s| s.trim_end_matches('\0').trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn int(ds: &InMemDicomObject, tag: Tag) -> Option<i64> {
    ds.get(tag)?.to_int::<i64>().ok()
}

/// Exactly `N` finite numbers, else `None` (a wrong multiplicity is as bad as absence).
pub(crate) fn floats<const N: usize>(ds: &InMemDicomObject, tag: Tag) -> Option<[f64; N]> {
    let values = ds.get(tag)?.to_multi_float64().ok()?;
    if values.len() != N || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let mut out = [0.0; N];
    out.copy_from_slice(&values);
    Some(out)
}
