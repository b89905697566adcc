//! Rasterises one axial slice of a study: soft tissue, airway, discs and bones
//! (each only inside its own bounding box), then in-plane blur and noise.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::anatomy::Tissue;
use super::study::Study;

/// HU image and label image of one slice, row-major `[row * columns + col]`.
pub struct SliceImage {
    pub hu: Vec<f32>,
    pub labels: Vec<u8>,
}

/// Patient-space bounds of every labelled structure seen in a slice,
/// per label (index = label), as (min, max, voxel count).
pub type LabelStats = Vec<([f64; 3], [f64; 3], u64)>;

pub fn new_label_stats() -> LabelStats {
    vec![([f64::INFINITY; 3], [f64::NEG_INFINITY; 3], 0); 16]
}

/// Pixel index range `[lo, hi)` covering patient coordinates `[a, b]` along an
/// axis where pixel `i` sits at `origin + i * step` (`step` may be negative).
fn pixel_range(a: f64, b: f64, origin: f64, step: f64, n: usize) -> (usize, usize) {
    let (i0, i1) = ((a - origin) / step, (b - origin) / step);
    let (lo, hi) = (i0.min(i1).floor(), i0.max(i1).ceil());
    let lo = lo.max(0.0) as usize;
    let hi = ((hi + 1.0).max(0.0) as usize).min(n);
    (lo.min(n), hi)
}

pub fn render_slice(study: &Study, k: usize, stats: &mut LabelStats) -> SliceImage {
    let g = &study.geometry;
    let (rows, cols) = (g.rows, g.columns);
    let ps = g.pixel_spacing_mm;
    let ipp = g.position(k);
    let z = ipp[2];
    let rowdir_x = g.row_direction()[0];
    let hu_t = &study.hu;
    let mut hu = vec![hu_t.air as f32; rows * cols];
    let mut labels = vec![0u8; rows * cols];
    let px = |c: usize| ipp[0] + c as f64 * ps * rowdir_x;
    let py = |r: usize| ipp[1] + r as f64 * ps;

    // Soft tissue ellipse: wider at the head and at the shoulders.
    let soft = &study.soft;
    let mut sa = soft.semi_axes;
    if z > soft.head_z {
        let t = ((z - soft.head_z) / 30.0).min(1.0);
        sa = [sa[0] * (1.0 + 0.25 * t), sa[1] * (1.0 + 0.2 * t)];
    }
    if z < soft.shoulder_z {
        let t = ((soft.shoulder_z - z) / 40.0).min(1.0);
        sa = [sa[0] * (1.0 + 0.9 * t), sa[1] * (1.0 + 0.1 * t)];
    }
    let spine_c = study.spine.centre_at(z);
    let ar = soft.airway_radius_mm;
    let airway = [spine_c[0], spine_c[1] - soft.airway_offset_mm - ar];
    let airway_on = z < soft.head_z + 15.0;
    for r in 0..rows {
        let y = py(r);
        for c in 0..cols {
            let x = px(c);
            let dx = (x - soft.centre[0]) / sa[0];
            let dy = (y - soft.centre[1]) / sa[1];
            let rho = (dx * dx + dy * dy).sqrt();
            if rho >= 1.0 {
                continue;
            }
            let depth = (1.0 - rho) * sa[0].min(sa[1]);
            let mut v = if depth < soft.fat_mm {
                hu_t.fat
            } else {
                hu_t.muscle
            };
            if airway_on {
                let ax = (x - airway[0]) / (1.3 * ar);
                let ay = (y - airway[1]) / ar;
                if ax * ax + ay * ay < 1.0 {
                    v = hu_t.air;
                }
            }
            hu[r * cols + c] = v as f32;
        }
    }

    // Discs, then bones on top.
    for disc in &study.spine.discs {
        let bb = disc.patient_bounds();
        if z < bb.min[2] || z > bb.max[2] {
            continue;
        }
        let (c0, c1) = pixel_range(bb.min[0], bb.max[0], ipp[0], ps * rowdir_x, cols);
        let (r0, r1) = pixel_range(bb.min[1], bb.max[1], ipp[1], ps, rows);
        for r in r0..r1 {
            for c in c0..c1 {
                if disc.contains([px(c), py(r), z]) {
                    hu[r * cols + c] = hu_t.disc as f32;
                }
            }
        }
    }
    for bone in &study.spine.bones {
        let bb = bone.patient_bounds();
        if z < bb.min[2] || z > bb.max[2] {
            continue;
        }
        let (c0, c1) = pixel_range(bb.min[0], bb.max[0], ipp[0], ps * rowdir_x, cols);
        let (r0, r1) = pixel_range(bb.min[1], bb.max[1], ipp[1], ps, rows);
        let label = bone.label as usize;
        for r in r0..r1 {
            for c in c0..c1 {
                let p = [px(c), py(r), z];
                let Some(t) = bone.eval(p) else { continue };
                let v = match t {
                    Tissue::Cortical => hu_t.cortical,
                    Tissue::Cancellous => hu_t.cancellous,
                    Tissue::Sclerotic => hu_t.sclerotic,
                    Tissue::Gap => hu_t.fracture_gap,
                };
                hu[r * cols + c] = v as f32;
                labels[r * cols + c] = bone.label;
                if label > 0 && label < stats.len() {
                    let s = &mut stats[label];
                    for (i, v) in p.iter().enumerate() {
                        s.0[i] = s.0[i].min(*v);
                        s.1[i] = s.1[i].max(*v);
                    }
                    s.2 += 1;
                }
            }
        }
    }

    gaussian_blur(&mut hu, rows, cols, study.blur_sigma_mm / ps);

    // Independent noise stream per slice: identical output whatever the thread count.
    let mut rng =
        ChaCha8Rng::seed_from_u64(study.seed ^ (k as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let normal = Normal::new(0.0f32, study.noise_sigma_hu as f32).expect("valid sigma");
    for v in hu.iter_mut() {
        *v += normal.sample(&mut rng);
    }
    SliceImage { hu, labels }
}

/// Separable Gaussian blur with edge clamping; `sigma` in pixels.
fn gaussian_blur(img: &mut [f32], rows: usize, cols: usize, sigma: f64) {
    if sigma < 0.05 {
        return;
    }
    let radius = (3.0 * sigma).ceil() as isize;
    let mut kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let sum: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= sum);
    let mut tmp = vec![0f32; img.len()];
    let clamp = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    for r in 0..rows {
        let row = &img[r * cols..(r + 1) * cols];
        for c in 0..cols {
            let mut acc = 0.0;
            for (j, w) in kernel.iter().enumerate() {
                acc += w * row[clamp(c as isize + j as isize - radius, cols)];
            }
            tmp[r * cols + c] = acc;
        }
    }
    for r in 0..rows {
        for c in 0..cols {
            let mut acc = 0.0;
            for (j, w) in kernel.iter().enumerate() {
                acc += w * tmp[clamp(r as isize + j as isize - radius, rows) * cols + c];
            }
            img[r * cols + c] = acc;
        }
    }
}
