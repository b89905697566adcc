//! From a [`CtVolume`] to the model input, exactly as `docs/model-contract.md` specifies
//! (the Python reference is `models/training/preprocess.py`).
//!
//! Every model voxel is a point in patient space (LPS, mm) sampled trilinearly from the
//! source voxels, so the model sees the same picture whatever the acquisition order.
//! Each model slice is sampled and windowed once into its plane ([`ModelPlanes`]); the
//! model input copies every plane into three channels (its own slice's and its
//! neighbours'), and can be made once the source volume is gone.
//!
//! [`volume_window`] tells volume building which part of each slice the sampling can touch
//! (a volume that keeps only that gives the same input, to the bit: every index is still
//! computed in the full matrix).

use anyhow::{ensure, Result};

use super::contract::InputSpec;
use crate::series::volume::VolumePlan;
use crate::series::{CtVolume, Geometry, InPlaneWindow, VolumeWindow};

/// The model input of one series.
#[derive(Debug, Clone)]
pub struct ModelInput {
    /// `[slices, 3, height, width]`, windowed to [0, 1].
    pub tensor: Vec<f32>,
    pub slices: usize,
    pub height: usize,
    pub width: usize,
    pub grid: ModelGrid,
}

/// Where the model slices lie in patient space.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelGrid {
    /// Patient position of the centre of the source field of view (x, y used).
    pub centre: [f64; 3],
    /// Patient z (mm) of each model slice, ascending.
    pub z_mm: Vec<f64>,
}

impl ModelInput {
    /// The windowed plane of model slice `k` (its channel 1), `height * width` values.
    pub fn plane(&self, k: usize) -> &[f32] {
        let hw = self.height * self.width;
        let start = (k * 3 + 1) * hw;
        &self.tensor[start..start + hw]
    }
}

/// The windowed plane of every model slice, before the 2.5D neighbours are copied in:
/// a third of the model input, and all of it that is not a copy.
#[derive(Debug, Clone)]
pub struct ModelPlanes {
    /// `[slices, height, width]`, windowed to [0, 1].
    pub planes: Vec<f32>,
    pub slices: usize,
    pub height: usize,
    pub width: usize,
    pub grid: ModelGrid,
}

impl ModelPlanes {
    /// The windowed plane of model slice `k`, `height * width` values.
    pub fn plane(&self, k: usize) -> &[f32] {
        let hw = self.height * self.width;
        &self.planes[k * hw..(k + 1) * hw]
    }

    /// The model input: channel 1 of slice k is plane k; 2.5D neighbours: channel 0 is
    /// plane k - 1, channel 2 is plane k + 1 (edges repeat).
    pub fn to_input(&self) -> ModelInput {
        let (s, hw) = (self.slices, self.height * self.width);
        let mut tensor = Vec::with_capacity(s * 3 * hw);
        for k in 0..s {
            for n in [k.saturating_sub(1), k, (k + 1).min(s - 1)] {
                tensor.extend_from_slice(self.plane(n));
            }
        }
        ModelInput {
            tensor,
            slices: s,
            height: self.height,
            width: self.width,
            grid: self.grid.clone(),
        }
    }
}

/// What sampling decided.
#[derive(Debug, Clone)]
pub enum Sampled {
    Planes(ModelPlanes),
    /// The series spans fewer model slices than the contract's `min_slices`.
    TooShort {
        slices: usize,
        min_slices: usize,
    },
}

/// Where the source slices lie in patient space: all the model grid depends on, known
/// before any pixel is decoded.
struct Frame<'a> {
    geometry: &'a Geometry,
    /// [slices, rows, columns] of the full matrix.
    dims: [usize; 3],
    /// Position of each source slice along the slice normal (mm), ascending.
    slice_pos: Vec<f64>,
}

/// How a patient point maps back to continuous source voxel indices, and the voxels.
struct Sampler<'a> {
    volume: &'a CtVolume,
    frame: Frame<'a>,
}

/// Slack (mm) when testing whether a point lies between the first and last slice: a model
/// slice computed to sit exactly on an end slice must not fall outside by a rounding error.
/// In-plane the test is strict (an index in [0, N-1] is inside), as in the Python reference.
const SLICE_EPS_MM: f64 = 1e-6;

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

impl Frame<'_> {
    /// Patient position of source slice `k`'s first voxel (its ImagePositionPatient).
    fn slice_origin(&self, k: usize) -> [f64; 3] {
        let g = self.geometry;
        let along = self.slice_pos[k] - self.slice_pos[0];
        [
            g.origin[0] + along * g.normal[0],
            g.origin[1] + along * g.normal[1],
            g.origin[2] + along * g.normal[2],
        ]
    }

    /// Patient position of the centre of source slice `k`'s field of view.
    fn slice_centre(&self, k: usize) -> [f64; 3] {
        let g = self.geometry;
        let [_, rows, cols] = self.dims;
        let o = self.slice_origin(k);
        let half_c = (cols as f64 - 1.0) / 2.0 * g.spacing[2];
        let half_r = (rows as f64 - 1.0) / 2.0 * g.spacing[1];
        [
            o[0] + half_c * g.row_direction[0] + half_r * g.column_direction[0],
            o[1] + half_c * g.row_direction[1] + half_r * g.column_direction[1],
            o[2] + half_c * g.row_direction[2] + half_r * g.column_direction[2],
        ]
    }

    /// Continuous slice index of a position along the normal; None outside the slices.
    fn slice_index(&self, t: f64, hint: &mut usize) -> Option<f64> {
        let pos = &self.slice_pos;
        let n = pos.len();
        if n == 1 {
            return ((t - pos[0]).abs() <= SLICE_EPS_MM).then_some(0.0);
        }
        let first = pos[0];
        let last = pos[n - 1];
        if t < first - SLICE_EPS_MM || t > last + SLICE_EPS_MM {
            return None;
        }
        let t = t.clamp(first, last);
        // Consecutive target points are close along the normal: try the last interval first.
        let mut k = (*hint).min(n - 2);
        if !(pos[k] <= t && t <= pos[k + 1]) {
            k = pos
                .partition_point(|&p| p <= t)
                .saturating_sub(1)
                .min(n - 2);
            *hint = k;
        }
        let gap = pos[k + 1] - pos[k];
        Some(k as f64 + if gap > 0.0 { (t - pos[k]) / gap } else { 0.0 })
    }

    /// Continuous (column, row) indices of patient point `p` in the full matrix.
    fn in_plane_index(&self, p: [f64; 3]) -> (f64, f64) {
        let g = self.geometry;
        let d = [p[0] - g.origin[0], p[1] - g.origin[1], p[2] - g.origin[2]];
        (
            dot(d, g.row_direction) / g.spacing[2],
            dot(d, g.column_direction) / g.spacing[1],
        )
    }

    /// Patient z (mm) range of the source slice centres.
    fn z_range(&self) -> (f64, f64) {
        (0..self.dims[0])
            .map(|k| self.slice_centre(k)[2])
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), z| {
                (lo.min(z), hi.max(z))
            })
    }

    /// The rows and columns of the full matrix that sampling the model grid of `spec` can
    /// read. The map from patient space to indices is affine, so over a grid column (all
    /// its rows, every model slice) a source column index ranges between its values at
    /// the column's ends, on the first and last model slice; likewise for rows.
    fn window(&self, spec: &InputSpec) -> InPlaneWindow {
        let [_, rows, cols] = self.dims;
        let centre = self.slice_centre(0);
        let (z_min, z_max) = self.z_range();
        // Every model slice lies within the source slice centres; a model slice of slack
        // keeps rounding of the grid's z out of the question.
        let dz = spec.spacing_mm.slice;
        let zs = [z_min - dz, z_max + dz];
        let xs: Vec<f64> = (0..spec.width)
            .map(|j| grid_coordinate(centre[0], j, spec.width, spec.spacing_mm.column))
            .collect();
        let ys: Vec<f64> = (0..spec.height)
            .map(|i| grid_coordinate(centre[1], i, spec.height, spec.spacing_mm.row))
            .collect();
        let ends = |v: &[f64]| [v[0], v[v.len() - 1]];
        // Lowest and highest of `index` over the corners of a line of the grid.
        let span = |index: &dyn Fn(f64, f64) -> f64, others: [f64; 2]| {
            let mut lo_hi = (f64::INFINITY, f64::NEG_INFINITY);
            for o in others {
                for z in zs {
                    let i = index(o, z);
                    lo_hi = (lo_hi.0.min(i), lo_hi.1.max(i));
                }
            }
            lo_hi
        };
        let kept_cols = xs.iter().flat_map(|&x| {
            let (lo, hi) = span(&|y, z| self.in_plane_index([x, y, z]).0, ends(&ys));
            read_indices(lo, hi, cols)
        });
        let kept_rows: Vec<usize> = ys
            .iter()
            .flat_map(|&y| {
                let (lo, hi) = span(&|x, z| self.in_plane_index([x, y, z]).1, ends(&xs));
                read_indices(lo, hi, rows)
            })
            .collect();
        InPlaneWindow::new(rows, cols, kept_rows, kept_cols.collect::<Vec<_>>())
    }
}

/// Patient coordinate of grid point `i` of `n`, `spacing` apart, centred on `centre`:
/// the one formula for the grid, so that [`Frame::window`] and [`fill_plane`] agree to
/// the bit.
fn grid_coordinate(centre: f64, i: usize, n: usize, spacing: f64) -> f64 {
    centre + (i as f64 - (n as f64 - 1.0) / 2.0) * spacing
}

/// Rounding slack (in voxels) of the continuous indices [`Frame::window`] bounds.
const INDEX_EPS: f64 = 1e-6;

/// The voxels of an axis of `n` that [`axis_cell`] and its neighbour can read for any
/// continuous index from `lo` to `hi`.
fn read_indices(lo: f64, hi: f64, n: usize) -> std::ops::Range<usize> {
    let (lo, hi) = (lo - INDEX_EPS, hi + INDEX_EPS);
    let max = (n - 1) as f64;
    if !(lo.is_finite() && hi.is_finite()) {
        return 0..n;
    }
    if hi < 0.0 || lo > max {
        return 0..0;
    }
    if n == 1 {
        return 0..1;
    }
    let cell = |x: f64| (x.clamp(0.0, max).floor() as usize).min(n - 2);
    cell(lo)..cell(hi) + 2
}

impl<'a> Sampler<'a> {
    fn new(volume: &'a CtVolume) -> Sampler<'a> {
        Sampler {
            volume,
            frame: Frame {
                geometry: &volume.geometry,
                dims: volume.dims,
                slice_pos: volume.slices.iter().map(|s| s.z_mm).collect(),
            },
        }
    }

    /// Trilinear HU at patient point `p`; None outside the source volume.
    fn sample(&self, p: [f64; 3], hint: &mut usize) -> Option<f64> {
        let v = self.volume;
        let f = &self.frame;
        let [_, rows, cols] = v.dims;
        let (c, r) = f.in_plane_index(p);
        let s = f.slice_index(dot(p, v.geometry.normal), hint)?;
        let (c0, fc) = axis_cell(c, cols)?;
        let (r0, fr) = axis_cell(r, rows)?;
        let (s0, fs) = axis_cell(s, v.slices.len())?;
        let c1 = (c0 + 1).min(cols - 1);
        let r1 = (r0 + 1).min(rows - 1);
        let s1 = (s0 + 1).min(v.slices.len() - 1);
        let at = |s: usize, r: usize, c: usize| v.voxel(s, r, c) as f64;
        let lerp = |a: f64, b: f64, f: f64| a + (b - a) * f;
        let plane = |s: usize| {
            lerp(
                lerp(at(s, r0, c0), at(s, r0, c1), fc),
                lerp(at(s, r1, c0), at(s, r1, c1), fc),
                fr,
            )
        };
        Some(lerp(plane(s0), plane(s1), fs))
    }
}

/// Lower voxel index and fraction of continuous index `x` on an axis of `n` voxels;
/// None outside the outermost voxel centres.
fn axis_cell(x: f64, n: usize) -> Option<(usize, f64)> {
    let max = (n - 1) as f64;
    if !(x >= 0.0 && x <= max) {
        return None;
    }
    if n == 1 {
        return Some((0, 0.0));
    }
    let i = (x.floor() as usize).min(n - 2);
    Some((i, x - i as f64))
}

/// Chooses, for each series planned, the part of its slices that [`sample_planes`] with
/// `spec` reads: a volume that keeps only that gives the same model input, and for
/// 512 x 512 slices of 320 mm holds about a quarter of them.
pub fn volume_window(spec: &InputSpec) -> VolumeWindow {
    let spec = spec.clone();
    VolumeWindow(std::sync::Arc::new(move |plan: &VolumePlan| {
        Frame {
            geometry: &plan.geometry,
            dims: plan.dims,
            slice_pos: plan.z.clone(),
        }
        .window(&spec)
    }))
}

/// Samples and windows every model slice of `volume` as `spec` says (channel 1 of the
/// model input); `threads` model slices are sampled in parallel. The volume is not needed
/// after this: [`ModelPlanes`] makes the input and the key image.
pub fn sample_planes(volume: &CtVolume, spec: &InputSpec, threads: usize) -> Result<Sampled> {
    let [n_slices, rows, cols] = volume.dims;
    ensure!(
        n_slices > 0 && rows > 0 && cols > 0,
        "empty volume {:?}",
        volume.dims
    );
    let w = &volume.window;
    ensure!(
        volume.voxels.len() == n_slices * w.len()
            && volume.slices.len() == n_slices
            && w.matrix() == [rows, cols],
        "inconsistent volume: {} voxels in a window of {} per slice of a {:?} matrix and {} \
         slice records for dims {:?}",
        volume.voxels.len(),
        w.len(),
        w.matrix(),
        volume.slices.len(),
        volume.dims
    );
    let sampler = Sampler::new(volume);
    // A volume built for another contract (or by hand) may lack voxels this grid reads.
    let needed = sampler.frame.window(spec);
    ensure!(
        w.contains(&needed),
        "the volume keeps {} of the {rows}x{cols} voxels of each slice, not all those the \
         model grid reads ({})",
        w.len(),
        needed.len()
    );
    let (z_min, z_max) = sampler.frame.z_range();
    let dz = spec.spacing_mm.slice;
    // The slack keeps an exact multiple of the spacing (e.g. 100.0 mm) from losing a
    // slice to a rounding error in the slice positions.
    let mut s = ((z_max - z_min) / dz + 1e-6).floor() as usize + 1;
    let mut z0 = z_min;
    if s > spec.max_slices {
        // Keep the superior end: the cervical spine is at the top of a neck/chest scan.
        s = spec.max_slices;
        z0 = z_max - (s - 1) as f64 * dz;
    }
    if s < spec.min_slices {
        return Ok(Sampled::TooShort {
            slices: s,
            min_slices: spec.min_slices,
        });
    }
    let grid = ModelGrid {
        centre: sampler.frame.slice_centre(0),
        z_mm: (0..s).map(|k| z0 + k as f64 * dz).collect(),
    };
    let (h, w) = (spec.height, spec.width);
    let hw = h * w;
    let mut planes = vec![0f32; s * hw];
    // Model slices split across threads.
    let threads = threads.clamp(1, s);
    let per_thread = s.div_ceil(threads);
    std::thread::scope(|scope| {
        for (t, chunk) in planes.chunks_mut(per_thread * hw).enumerate() {
            let (sampler, grid) = (&sampler, &grid);
            scope.spawn(move || {
                for (n, plane) in chunk.chunks_mut(hw).enumerate() {
                    fill_plane(sampler, spec, grid, t * per_thread + n, plane);
                }
            });
        }
    });
    Ok(Sampled::Planes(ModelPlanes {
        planes,
        slices: s,
        height: h,
        width: w,
        grid,
    }))
}

/// Samples and windows model slice `k` of `grid` into `out` (`height * width` values).
fn fill_plane(sampler: &Sampler, spec: &InputSpec, grid: &ModelGrid, k: usize, out: &mut [f32]) {
    let (h, w) = (spec.height, spec.width);
    let lo = spec.window.center - spec.window.width / 2.0;
    let window = |hu: f64| ((hu - lo) / spec.window.width).clamp(0.0, 1.0) as f32;
    let pad = window(spec.pad_hu as f64);
    let z = grid.z_mm[k];
    let mut hint = 0;
    for i in 0..h {
        let y = grid_coordinate(grid.centre[1], i, h, spec.spacing_mm.row);
        for j in 0..w {
            let x = grid_coordinate(grid.centre[0], j, w, spec.spacing_mm.column);
            out[i * w + j] = sampler.sample([x, y, z], &mut hint).map_or(pad, window);
        }
    }
}

/// Index of the source slice whose patient z is nearest to `z`.
pub fn nearest_source_slice(volume: &CtVolume, z: f64) -> usize {
    let frame = Sampler::new(volume).frame;
    (0..volume.slices.len())
        .min_by(|&a, &b| {
            let da = (frame.slice_centre(a)[2] - z).abs();
            let db = (frame.slice_centre(b)[2] - z).abs();
            da.total_cmp(&db)
        })
        .unwrap_or(0)
}

/// Patient z (mm) of the centre of source slice `k`.
pub fn source_slice_z(volume: &CtVolume, k: usize) -> f64 {
    Sampler::new(volume).frame.slice_centre(k)[2]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::inference::contract::{SpacingMm, Window};
    use crate::series::{Geometry, SeriesMeta, SliceInfo};

    pub(crate) fn spec() -> InputSpec {
        InputSpec {
            name: "slices".into(),
            dtype: "float32".into(),
            layout: "SCHW".into(),
            channels: 3,
            height: 128,
            width: 128,
            spacing_mm: SpacingMm {
                slice: 2.0,
                row: 1.25,
                column: 1.25,
            },
            window: Window {
                center: 400.0,
                width: 1800.0,
            },
            pad_hu: -1024.0,
            min_slices: 8,
            max_slices: 256,
        }
    }

    /// An axial volume whose HU is a linear function of patient position, so trilinear
    /// sampling reproduces it exactly inside the volume.
    pub(crate) fn linear_volume(n: usize, rows: usize, cols: usize, flip: bool) -> CtVolume {
        let spacing = [2.5, 0.8, 0.9];
        let origin = [-100.0, -90.0, 10.0];
        let hu = |x: f64, y: f64, z: f64| (x * 2.0 + y - z * 3.0).round();
        // `flip`: rows mirrored (column direction -y), slices still ascending along the normal.
        let (row_dir, col_dir, normal) = if flip {
            ([1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0])
        } else {
            ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
        };
        let mut voxels = Vec::with_capacity(n * rows * cols);
        let mut slices = Vec::new();
        for k in 0..n {
            let o = [
                origin[0],
                origin[1],
                origin[2] + k as f64 * spacing[0] * normal[2],
            ];
            slices.push(SliceInfo {
                sop_instance_uid: format!("1.2.3.{k}"),
                z_mm: dot(o, normal),
            });
            for r in 0..rows {
                for c in 0..cols {
                    let x = o[0] + c as f64 * spacing[2] * row_dir[0];
                    let y = o[1] + r as f64 * spacing[1] * col_dir[1];
                    voxels.push(hu(x, y, o[2]) as i16);
                }
            }
        }
        CtVolume {
            voxels,
            dims: [n, rows, cols],
            window: InPlaneWindow::full(rows, cols),
            geometry: Geometry {
                origin,
                spacing,
                row_direction: row_dir,
                column_direction: col_dir,
                normal,
            },
            meta: SeriesMeta {
                series_instance_uid: "1.2.3".into(),
                sop_instance_uids: crate::series::sorted_unique_uids(
                    slices.iter().map(|s| s.sop_instance_uid.as_str()),
                ),
                ..SeriesMeta::default()
            },
            slices,
        }
    }

    /// A volume on `geometry` whose HU is a non-linear function of patient position, so
    /// that every voxel the sampling reads matters.
    fn field_volume(geometry: Geometry, n: usize, rows: usize, cols: usize) -> CtVolume {
        let hu = |p: [f64; 3]| ((p[0] * 0.37 + p[1] * 0.23 - p[2] * 0.11).sin() * 900.0) as i16;
        let g = &geometry;
        let mut voxels = Vec::with_capacity(n * rows * cols);
        let mut slices = Vec::new();
        for k in 0..n {
            let o: [f64; 3] =
                std::array::from_fn(|i| g.origin[i] + k as f64 * g.spacing[0] * g.normal[i]);
            slices.push(SliceInfo {
                sop_instance_uid: format!("1.2.3.{k}"),
                z_mm: dot(o, g.normal),
            });
            for r in 0..rows {
                for c in 0..cols {
                    voxels.push(hu(std::array::from_fn(|i| {
                        o[i] + c as f64 * g.spacing[2] * g.row_direction[i]
                            + r as f64 * g.spacing[1] * g.column_direction[i]
                    })));
                }
            }
        }
        CtVolume {
            voxels,
            dims: [n, rows, cols],
            window: InPlaneWindow::full(rows, cols),
            geometry,
            slices,
            meta: SeriesMeta::default(),
        }
    }

    /// `v` keeping only `w` of each slice, as volume building does.
    fn keep_window(v: &CtVolume, w: InPlaneWindow) -> CtVolume {
        let mut voxels = Vec::with_capacity(v.dims[0] * w.len());
        for k in 0..v.dims[0] {
            for &r in w.rows() {
                for &c in w.cols() {
                    voxels.push(v.voxel(k, r, c));
                }
            }
        }
        CtVolume {
            voxels,
            window: w,
            ..v.clone()
        }
    }

    fn window_of(v: &CtVolume, spec: &InputSpec) -> InPlaneWindow {
        Sampler::new(v).frame.window(spec)
    }

    #[test]
    fn the_source_window_gives_the_same_input_to_the_bit() {
        let (a, b) = (30f64.to_radians(), 25f64.to_radians());
        let axial = Geometry {
            origin: [-120.0, -110.0, 5.0],
            spacing: [1.25, 0.7, 0.75],
            row_direction: [1.0, 0.0, 0.0],
            column_direction: [0.0, 1.0, 0.0],
            normal: [0.0, 0.0, 1.0],
        };
        // Rotated in plane, and tilted about x (slices stacked obliquely).
        let rotated = Geometry {
            row_direction: [a.cos(), a.sin(), 0.0],
            column_direction: [-a.sin(), a.cos(), 0.0],
            ..axial.clone()
        };
        let tilted = Geometry {
            column_direction: [0.0, b.cos(), -b.sin()],
            normal: [0.0, b.sin(), b.cos()],
            ..axial.clone()
        };
        // Feet first with mirrored rows: the normal points down.
        let flipped = Geometry {
            origin: [-120.0, 110.0, 80.0],
            column_direction: [0.0, -1.0, 0.0],
            normal: [0.0, 0.0, -1.0],
            ..axial.clone()
        };
        // Pixels a quarter of the model's spacing (125 mm of field of view, all of it
        // inside the model's 160 mm): the grid reads two of every four rows and columns.
        let fine = Geometry {
            spacing: [1.25, 0.3125, 0.3125],
            ..axial.clone()
        };
        let spec = spec();
        for (name, g, most) in [
            ("axial", axial, 0.75),
            ("rotated", rotated, 0.75),
            ("tilted", tilted, 0.75),
            ("flipped", flipped, 0.75),
            ("fine", fine, 0.26),
        ] {
            let whole = field_volume(g, 60, 400, 400);
            let w = window_of(&whole, &spec);
            // 160 mm of model field of view in 280 x 300 mm of source: a real saving.
            assert!(
                (w.len() as f64) < 400.0 * 400.0 * most,
                "{name}: window keeps {} of the slice's voxels",
                w.len()
            );
            let part = keep_window(&whole, w);
            let (Sampled::Planes(x), Sampled::Planes(y)) = (
                sample_planes(&whole, &spec, 2).unwrap(),
                sample_planes(&part, &spec, 2).unwrap(),
            ) else {
                panic!("{name}: too short")
            };
            let (x, y) = (x.to_input(), y.to_input());
            assert!(
                x.tensor.iter().any(|&v| v > 0.0 && v < 1.0),
                "{name}: the grid must sample the volume"
            );
            assert_eq!(x.grid, y.grid, "{name}");
            assert!(
                x.tensor
                    .iter()
                    .zip(&y.tensor)
                    .all(|(p, q)| p.to_bits() == q.to_bits()),
                "{name}: the windowed volume gives another input"
            );
            let key_plane = |v: &CtVolume| match sample_planes(v, &spec, 2).unwrap() {
                Sampled::Planes(p) => p.plane(7).to_vec(),
                Sampled::TooShort { .. } => panic!("{name}: too short"),
            };
            assert_eq!(
                key_plane(&whole),
                key_plane(&part),
                "{name}: key image plane"
            );
        }
    }

    #[test]
    fn a_volume_without_what_the_grid_reads_is_an_error_not_a_panic() {
        let whole = linear_volume(40, 300, 300, false);
        let spec = spec();
        let w = window_of(&whole, &spec);
        let w = InPlaneWindow::new(300, 300, w.rows()[1..].to_vec(), w.cols().to_vec());
        let part = keep_window(&whole, w);
        let err = sample_planes(&part, &spec, 1).unwrap_err().to_string();
        assert!(err.contains("the model grid reads"), "{err}");
    }

    fn input(v: &CtVolume) -> ModelInput {
        match sample_planes(v, &spec(), 2).unwrap() {
            Sampled::Planes(p) => p.to_input(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn slice_count_and_z_follow_the_contract() {
        // 40 slices at 2.5 mm: 97.5 mm -> floor(48.75) + 1 = 49 model slices.
        let v = linear_volume(40, 64, 64, false);
        let i = input(&v);
        assert_eq!(i.slices, 49);
        assert_eq!(i.tensor.len(), 49 * 3 * 128 * 128);
        assert_eq!(i.grid.z_mm[0], 10.0);
        assert_eq!(i.grid.z_mm[48], 10.0 + 96.0);
    }

    #[test]
    fn clamping_keeps_the_superior_end() {
        let v = linear_volume(40, 16, 16, false);
        let mut s = spec();
        s.max_slices = 10;
        let Sampled::Planes(p) = sample_planes(&v, &s, 1).unwrap() else {
            panic!()
        };
        let i = p.to_input();
        assert_eq!(i.slices, 10);
        assert_eq!(*i.grid.z_mm.last().unwrap(), 10.0 + 39.0 * 2.5);
    }

    #[test]
    fn short_series_is_reported() {
        let v = linear_volume(3, 16, 16, false);
        assert!(matches!(
            sample_planes(&v, &spec(), 1).unwrap(),
            Sampled::TooShort { slices: 3, .. }
        ));
    }

    #[test]
    fn mirrored_acquisition_gives_the_same_input() {
        // Same patient, rows mirrored and slices stored top-down: identical model input.
        let a = linear_volume(30, 48, 48, false);
        let mut b = linear_volume(30, 48, 48, true);
        // Put b over the same patient region as a: its first slice is a's top slice and
        // its first row is a's last row.
        b.geometry.origin = [-100.0, -90.0 + 47.0 * 0.8, 10.0 + 29.0 * 2.5];
        let hu = |x: f64, y: f64, z: f64| (x * 2.0 + y - z * 3.0).round() as i16;
        for k in 0..30 {
            let z = b.geometry.origin[2] - k as f64 * 2.5;
            b.slices[k].z_mm = -z;
            for r in 0..48 {
                for c in 0..48 {
                    let x = -100.0 + c as f64 * 0.9;
                    let y = b.geometry.origin[1] - r as f64 * 0.8;
                    b.voxels[(k * 48 + r) * 48 + c] = hu(x, y, z);
                }
            }
        }
        let (ia, ib) = (input(&a), input(&b));
        assert_eq!(ia.slices, ib.slices);
        let max = ia
            .tensor
            .iter()
            .zip(&ib.tensor)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-5, "max difference {max}");
    }

    #[test]
    fn interior_matches_the_window_of_the_linear_field_and_outside_is_padding() {
        let v = linear_volume(30, 100, 200, false);
        let i = input(&v);
        let s = spec();
        let lo = s.window.center - s.window.width / 2.0;
        // FOV centre: x = -100 + 199 * 0.9 / 2, y = -90 + 99 * 0.8 / 2.
        let (cx, cy) = (-100.0 + 99.5 * 0.9, -90.0 + 49.5 * 0.8);
        let k = 5;
        let (ii, jj) = (64, 70);
        let x = cx + (jj as f64 - 63.5) * 1.25;
        let y = cy + (ii as f64 - 63.5) * 1.25;
        let z = 10.0 + k as f64 * 2.0;
        // The field is linear in x, y, z but rounded per voxel: allow one HU.
        let expected = ((x * 2.0 + y - z * 3.0) - lo) / s.window.width;
        let got = i.plane(k)[ii * 128 + jj] as f64;
        assert!(
            (got - expected.clamp(0.0, 1.0)).abs() <= 1.0 / s.window.width,
            "{got} vs {expected}"
        );
        // Channels 0 and 2 are the neighbouring planes.
        let hw = 128 * 128;
        assert_eq!(&i.tensor[k * 3 * hw..(k * 3 + 1) * hw], i.plane(k - 1));
        assert_eq!(
            &i.tensor[(k * 3 + 2) * hw..(k * 3 + 3) * hw],
            i.plane(k + 1)
        );
        assert_eq!(&i.tensor[0..hw], i.plane(0));
        // The field is 79.2 mm tall, the model grid 160 mm: its first row is outside ->
        // padding (0), while the field itself windows to about 0.2 there.
        assert_eq!(i.plane(k)[5], 0.0);
        assert!(i.plane(k)[64 * 128 + 5] > 0.1);
    }
}
