//! Writes one slice as a DICOM CT Image Storage file with dicom-object.

use std::path::Path;

use anyhow::{Context, Result};
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::InMemDicomObject;

use super::study::Study;

/// DICOM DS text: at most 16 characters, no needless trailing zeros.
pub fn ds(v: f64) -> String {
    for prec in (0..=6).rev() {
        let s = format!("{v:.prec$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        };
        let s = if s == "-0" { "0".to_string() } else { s };
        if s.len() <= 16 {
            return s;
        }
    }
    format!("{v:.0}")
}

fn ds_multi(vs: &[f64]) -> String {
    vs.iter().map(|v| ds(*v)).collect::<Vec<_>>().join("\\")
}

/// Converts HU to stored values (HU = stored * slope + intercept), clamped.
pub fn to_stored(study: &Study, hu: &[f32]) -> Vec<u16> {
    let e = &study.encoding;
    let (lo, hi) = e.stored_range();
    hu.iter()
        .map(|&v| {
            let s = ((v as f64 - e.rescale_intercept) / e.rescale_slope).round() as i32;
            // Signed values are stored as their two's complement bit pattern.
            s.clamp(lo, hi) as i16 as u16
        })
        .collect()
}

pub fn write_slice(study: &Study, k: usize, pixels: Vec<u16>, path: &Path) -> Result<()> {
    let g = &study.geometry;
    let id = &study.id;
    let e = &study.encoding;
    let ipp = g.position(k);
    let str_el = |tag, vr, s: &str| DataElement::new(tag, vr, PrimitiveValue::from(s));
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    let (window_center, window_width) = (400.0, 1800.0);
    let mut obj = InMemDicomObject::from_element_iter([
        str_el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
        str_el(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\AXIAL"),
        str_el(tags::SOP_CLASS_UID, VR::UI, uids::CT_IMAGE_STORAGE),
        str_el(tags::SOP_INSTANCE_UID, VR::UI, &id.sop_instance_uids[k]),
        str_el(tags::STUDY_DATE, VR::DA, &id.study_date),
        str_el(tags::SERIES_DATE, VR::DA, &id.study_date),
        str_el(tags::ACQUISITION_DATE, VR::DA, &id.study_date),
        str_el(tags::CONTENT_DATE, VR::DA, &id.study_date),
        str_el(tags::STUDY_TIME, VR::TM, &id.study_time),
        str_el(tags::SERIES_TIME, VR::TM, &id.study_time),
        str_el(tags::CONTENT_TIME, VR::TM, &id.study_time),
        str_el(tags::ACCESSION_NUMBER, VR::SH, &id.accession_number),
        str_el(tags::MODALITY, VR::CS, "CT"),
        str_el(
            tags::MANUFACTURER,
            VR::LO,
            "cspine-triage synthetic phantom",
        ),
        str_el(tags::REFERRING_PHYSICIAN_NAME, VR::PN, ""),
        str_el(tags::STATION_NAME, VR::SH, &id.station_name),
        str_el(
            tags::STUDY_DESCRIPTION,
            VR::LO,
            "CT CERVICAL SPINE (SYNTHETIC)",
        ),
        str_el(
            tags::SERIES_DESCRIPTION,
            VR::LO,
            "C-SPINE BONE AXIAL (SYNTHETIC)",
        ),
        str_el(tags::PATIENT_NAME, VR::PN, &id.patient_name),
        str_el(tags::PATIENT_ID, VR::LO, &id.patient_id),
        str_el(tags::PATIENT_BIRTH_DATE, VR::DA, &id.patient_birth_date),
        str_el(tags::PATIENT_SEX, VR::CS, &id.patient_sex),
        str_el(tags::BODY_PART_EXAMINED, VR::CS, "CSPINE"),
        str_el(tags::SLICE_THICKNESS, VR::DS, &ds(g.slice_thickness_mm)),
        str_el(tags::KVP, VR::DS, "120"),
        str_el(
            tags::SPACING_BETWEEN_SLICES,
            VR::DS,
            &ds(g.spacing_between_slices_mm),
        ),
        str_el(tags::CONVOLUTION_KERNEL, VR::SH, &id.convolution_kernel),
        str_el(
            tags::PATIENT_POSITION,
            VR::CS,
            match g.patient_position {
                super::study::PatientPosition::HFS => "HFS",
                super::study::PatientPosition::FFS => "FFS",
            },
        ),
        str_el(tags::STUDY_INSTANCE_UID, VR::UI, &id.study_instance_uid),
        str_el(tags::SERIES_INSTANCE_UID, VR::UI, &id.series_instance_uid),
        str_el(tags::STUDY_ID, VR::SH, &format!("{}", study.index + 1)),
        str_el(tags::SERIES_NUMBER, VR::IS, "2"),
        str_el(tags::ACQUISITION_NUMBER, VR::IS, "1"),
        str_el(tags::INSTANCE_NUMBER, VR::IS, &format!("{}", k + 1)),
        str_el(tags::IMAGE_POSITION_PATIENT, VR::DS, &ds_multi(&ipp)),
        str_el(
            tags::IMAGE_ORIENTATION_PATIENT,
            VR::DS,
            &ds_multi(&g.image_orientation_patient),
        ),
        str_el(
            tags::FRAME_OF_REFERENCE_UID,
            VR::UI,
            &id.frame_of_reference_uid,
        ),
        str_el(tags::POSITION_REFERENCE_INDICATOR, VR::LO, ""),
        str_el(tags::SLICE_LOCATION, VR::DS, &ds(ipp[2])),
        str_el(
            tags::IMAGE_COMMENTS,
            VR::LT,
            "SYNTHETIC PHANTOM - NOT A PATIENT - NOT FOR CLINICAL USE",
        ),
        us(tags::SAMPLES_PER_PIXEL, 1),
        str_el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        us(tags::ROWS, g.rows as u16),
        us(tags::COLUMNS, g.columns as u16),
        str_el(
            tags::PIXEL_SPACING,
            VR::DS,
            &ds_multi(&[g.pixel_spacing_mm, g.pixel_spacing_mm]),
        ),
        us(tags::BITS_ALLOCATED, 16),
        us(tags::BITS_STORED, e.bits_stored),
        us(tags::HIGH_BIT, e.bits_stored - 1),
        us(tags::PIXEL_REPRESENTATION, e.pixel_representation),
        str_el(tags::WINDOW_CENTER, VR::DS, &ds(window_center)),
        str_el(tags::WINDOW_WIDTH, VR::DS, &ds(window_width)),
        str_el(tags::RESCALE_INTERCEPT, VR::DS, &ds(e.rescale_intercept)),
        str_el(tags::RESCALE_SLOPE, VR::DS, &ds(e.rescale_slope)),
        str_el(tags::RESCALE_TYPE, VR::LO, "HU"),
    ]);
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(pixels.into()),
    ));
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(e.transfer_syntax_uid)
                .implementation_class_uid("2.25.302582197766350745838961214950166361723")
                .implementation_version_name("CSPINE-SYNTH"),
        )
        .context("cannot build DICOM file meta group")?;
    file.write_to_file(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
