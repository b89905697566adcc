//! The key image: the key model slice in bone window with the segmentation overlaid (the
//! vertebra that chose the slice in red, the others in muted colours), as a small PNG a
//! dashboard can show without PACS access.
//!
//! Drawn on the model grid (1.25 mm pixels, patient left on the image right, anterior at
//! the top: radiological convention), scaled 2x with nearest neighbour.

use anyhow::{Context, Result};

// Upper bound of the PNG size; a larger one is redrawn at the model resolution.
use crate::result::KEY_IMAGE_MAX_BYTES as MAX_BYTES;

/// Muted colours of C1..C7, blended over the grey image.
const PALETTE: [[u8; 3]; 7] = [
    [66, 135, 245],
    [66, 214, 245],
    [66, 245, 144],
    [182, 245, 66],
    [245, 221, 66],
    [245, 155, 66],
    [190, 110, 245],
];
const HIGHLIGHT: [u8; 3] = [255, 30, 30];

/// Renders the key image.
/// `plane`: windowed model slice (`h * w` values in [0, 1]); `seg`: argmax class per
/// segmentation cell (`seg_h * seg_w`, 0 = background, v + 1 = vertebra v);
/// `highlight`: vertebra (0 = C1) drawn in red.
pub fn render(
    plane: &[f32],
    (h, w): (usize, usize),
    seg: &[u8],
    (seg_h, seg_w): (usize, usize),
    highlight: Option<usize>,
) -> Result<Vec<u8>> {
    let png = encode(plane, (h, w), seg, (seg_h, seg_w), highlight, 2)?;
    if png.len() <= MAX_BYTES {
        return Ok(png);
    }
    encode(plane, (h, w), seg, (seg_h, seg_w), highlight, 1)
}

fn encode(
    plane: &[f32],
    (h, w): (usize, usize),
    seg: &[u8],
    (seg_h, seg_w): (usize, usize),
    highlight: Option<usize>,
    scale: usize,
) -> Result<Vec<u8>> {
    let (oh, ow) = (h * scale, w * scale);
    let mut rgb = Vec::with_capacity(oh * ow * 3);
    for y in 0..oh {
        for x in 0..ow {
            let (i, j) = (y / scale, x / scale);
            let grey = (plane[i * w + j].clamp(0.0, 1.0) * 255.0).round();
            let class = seg[(i * seg_h / h) * seg_w + j * seg_w / w] as usize;
            let (colour, alpha) = match class {
                0 => ([0, 0, 0], 0.0),
                c if Some(c - 1) == highlight => (HIGHLIGHT, 0.45),
                c => (PALETTE[(c - 1) % 7], 0.25),
            };
            for ch in colour {
                rgb.push((grey * (1.0 - alpha) + ch as f32 * alpha).round() as u8);
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, ow as u32, oh as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::High);
        let mut writer = enc.write_header().context("cannot write key image")?;
        writer
            .write_image_data(&rgb)
            .context("cannot write key image")?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noisy_slice_stays_under_the_size_bound_and_decodes() {
        // Worst case for compression: noise everywhere.
        let mut state = 12345u32;
        let plane: Vec<f32> = (0..128 * 128)
            .map(|_| {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                (state >> 8) as f32 / (1u32 << 24) as f32
            })
            .collect();
        let seg: Vec<u8> = (0..32 * 32).map(|i| (i % 8) as u8).collect();
        let png = render(&plane, (128, 128), &seg, (32, 32), Some(4)).unwrap();
        assert!(png.len() <= MAX_BYTES, "{} bytes", png.len());
        let decoder = png::Decoder::new(std::io::Cursor::new(&png));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert!(info.width == 128 || info.width == 256);
    }

    #[test]
    fn highlighted_vertebra_is_red() {
        let plane = vec![0.0f32; 128 * 128];
        let mut seg = vec![0u8; 32 * 32];
        seg[0] = 5; // C5 in the top-left cell.
        let png = render(&plane, (128, 128), &seg, (32, 32), Some(4)).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(&png))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert!(buf[0] > 100 && buf[1] < 30, "{:?}", &buf[..3]);
        // Background stays black.
        let last = buf.len() - 3;
        assert_eq!(&buf[last..], &[0, 0, 0]);
    }
}
