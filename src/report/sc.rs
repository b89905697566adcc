//! The Secondary Capture of a result's key image: the PNG inference drew (bone window,
//! segmentation overlay), decoded to RGB, below a black band with "AI TRIAGE IMAGE - NOT
//! FOR DIAGNOSIS" burned in (Burned In Annotation = YES), referencing the key slice it was
//! drawn from.

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};

use super::common::{base_dataset, finish, Identity};
use super::config::ReportConfig;
use super::dataset::{put_seq, put_str, sop_ref};
use super::error::ReportError;
use super::font;
use super::object::{ResultObject, ResultObjectKind};
use crate::result::ResultMessage;

/// The annotation burned into every secondary capture.
pub const ANNOTATION: &str = "AI TRIAGE IMAGE - NOT FOR DIAGNOSIS";

/// Largest key image accepted, pixels a side (inference draws 256).
pub const MAX_SIDE: u32 = 2048;

pub const IDENTITY: Identity = Identity {
    kind: ResultObjectKind::SecondaryCapture,
    sop_class_uid: uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
    modality: "OT",
    series_number: 9903,
    series_description: "AI triage key image (not for diagnosis)",
};

/// An 8-bit RGB image, rows top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Decodes a PNG of any colour type to RGB (alpha dropped); at most [`MAX_SIDE`] a side.
pub fn decode_png(png_bytes: &[u8]) -> Result<Rgb, ReportError> {
    let bad = |e: &dyn std::fmt::Display| ReportError::KeyImage(e.to_string());
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(|e| bad(&e))?;
    let (w, h) = reader.info().size();
    if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
        return Err(ReportError::KeyImage(format!(
            "{w} x {h} pixels, at most {MAX_SIDE} a side"
        )));
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| ReportError::KeyImage("image too large".into()))?;
    let mut buf = vec![0; size];
    let frame = reader.next_frame(&mut buf).map_err(|e| bad(&e))?;
    let channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => {
            return Err(ReportError::KeyImage("palette not expanded".into()))
        }
    };
    let (width, height) = (w as usize, h as usize);
    let mut pixels = Vec::with_capacity(width * height * 3);
    for row in buf.chunks(frame.line_size).take(height) {
        for px in row[..width * channels].chunks_exact(channels) {
            match channels {
                1 | 2 => pixels.extend_from_slice(&[px[0]; 3]),
                _ => pixels.extend_from_slice(&px[..3]),
            }
        }
    }
    Ok(Rgb {
        width,
        height,
        pixels,
    })
}

/// `image` below a black band carrying [`ANNOTATION`] in white, as large as fits (the
/// canvas widens for a narrow image); the width is made even, so the pixel data is.
pub fn annotate(image: &Rgb) -> Rgb {
    let text_w = font::text_width(ANNOTATION);
    let scale = ((image.width.saturating_sub(8)) / text_w).clamp(1, 4);
    let margin = 2 * scale;
    let band = font::GLYPH_H * scale + 2 * margin;
    let mut width = image.width.max(text_w * scale + 2 * margin);
    width += width % 2;
    let height = image.height + band;
    let mut pixels = vec![0u8; width * height * 3];
    font::draw(ANNOTATION, scale, |x, y| {
        let at = ((y + margin) * width + x + margin) * 3;
        pixels[at..at + 3].copy_from_slice(&[255, 255, 255]);
    });
    for (r, row) in image.pixels.chunks_exact(image.width * 3).enumerate() {
        let at = (band + r) * width * 3;
        pixels[at..at + row.len()].copy_from_slice(row);
    }
    Rgb {
        width,
        height,
        pixels,
    }
}

/// Builds the secondary capture of `msg`'s key image; `None` when it has none.
pub fn build(msg: &ResultMessage, cfg: &ReportConfig) -> Result<Option<ResultObject>, ReportError> {
    let Some(png_bytes) = &msg.key_image_png else {
        return Ok(None);
    };
    let image = annotate(&decode_png(png_bytes)?);
    let (rows, columns) = (
        u16::try_from(image.height).map_err(|_| ReportError::KeyImage("too tall".into()))?,
        u16::try_from(image.width).map_err(|_| ReportError::KeyImage("too wide".into()))?,
    );
    let mut obj = base_dataset(&IDENTITY, msg, cfg);
    let us = |v: u16| PrimitiveValue::from(v);
    // General Series: the cervical spine, an unpaired body part, so no Laterality.
    put_str(&mut obj, tags::BODY_PART_EXAMINED, VR::CS, "CSPINE");
    // SC Equipment
    put_str(&mut obj, tags::CONVERSION_TYPE, VR::CS, "WSD");
    // General Image
    put_str(&mut obj, tags::IMAGE_TYPE, VR::CS, "DERIVED\\SECONDARY");
    put_str(&mut obj, tags::PATIENT_ORIENTATION, VR::CS, "");
    put_str(&mut obj, tags::BURNED_IN_ANNOTATION, VR::CS, "YES");
    put_str(
        &mut obj,
        tags::DERIVATION_DESCRIPTION,
        VR::ST,
        "Key slice of the AI triage (bone window, model grid, segmentation overlay); \
         annotation burned in. Not for diagnosis.",
    );
    if let Some(key) = &msg.result.key_slice {
        if let Some(class) = msg.source.sop_class_of(&key.sop_instance_uid) {
            put_seq(
                &mut obj,
                tags::SOURCE_IMAGE_SEQUENCE,
                vec![sop_ref(class, &key.sop_instance_uid)],
            );
        }
    }
    // Image Pixel: 8-bit RGB, colour-by-pixel.
    obj.put(DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, us(3)));
    put_str(&mut obj, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB");
    obj.put(DataElement::new(tags::PLANAR_CONFIGURATION, VR::US, us(0)));
    obj.put(DataElement::new(tags::ROWS, VR::US, us(rows)));
    obj.put(DataElement::new(tags::COLUMNS, VR::US, us(columns)));
    obj.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, us(8)));
    obj.put(DataElement::new(tags::BITS_STORED, VR::US, us(8)));
    obj.put(DataElement::new(tags::HIGH_BIT, VR::US, us(7)));
    obj.put(DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, us(0)));
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(image.pixels.into()),
    ));
    finish(&IDENTITY, msg, obj).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_of(width: u32, height: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(data).unwrap();
        w.finish().unwrap();
        out
    }

    #[test]
    fn grey_and_rgb_keys_decode_and_the_band_is_burned_in() {
        let grey = decode_png(&png_of(3, 2, png::ColorType::Grayscale, &[9; 6])).unwrap();
        assert_eq!((grey.width, grey.height), (3, 2));
        assert_eq!(&grey.pixels[..3], &[9, 9, 9]);
        let rgb_data: Vec<u8> = (0..256 * 256 * 3).map(|i| (i % 251) as u8).collect();
        let rgb = decode_png(&png_of(256, 256, png::ColorType::Rgb, &rgb_data)).unwrap();
        assert_eq!(rgb.pixels, rgb_data);
        let a = annotate(&rgb);
        assert_eq!(a.width, 256);
        let band = a.height - 256;
        // White text pixels in the band, the image unchanged below it.
        assert!(a.pixels[..band * 256 * 3].contains(&255));
        assert_eq!(&a.pixels[band * 256 * 3..], &rgb_data[..]);
        // A narrow image gets a wider canvas; widths are even.
        let narrow = annotate(&grey);
        assert!(narrow.width > font::text_width(ANNOTATION) && narrow.width.is_multiple_of(2));
        assert!(decode_png(b"not a png").is_err());
    }
}
