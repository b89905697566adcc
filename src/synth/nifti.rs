//! Minimal NIfTI-1 writer (single `.nii` file, uint8 labels), RSNA 2022 layout.
//!
//! The RSNA loader does `m = nib.load(p).get_fdata()[:, ::-1, ::-1].transpose(2, 1, 0)`
//! and expects `m[k, row, col]` with `k = InstanceNumber - 1`. NIfTI data is stored
//! first-index-fastest, so the file holds `d[i, j, s]` with shape `(columns, rows,
//! slices)` and `d[i, j, s] = m[slices - 1 - s, rows - 1 - j, i]`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::geom::V3;

/// Label volume in instance order: `labels[(k * rows + row) * columns + col]`.
pub struct LabelVolume<'a> {
    pub labels: &'a [u8],
    pub slices: usize,
    pub rows: usize,
    pub columns: usize,
    pub pixel_spacing: f64,
    pub slice_spacing: f64,
    /// ImagePositionPatient of InstanceNumber 1 and the per-instance step (LPS).
    pub first_position: V3,
    pub instance_step: V3,
    pub row_direction: V3,
    pub column_direction: V3,
}

const HEADER_LEN: usize = 348;
const VOX_OFFSET: usize = 352;

pub fn write_labels(vol: &LabelVolume, path: &Path) -> Result<()> {
    let (nk, nr, nc) = (vol.slices, vol.rows, vol.columns);
    anyhow::ensure!(
        vol.labels.len() == nk * nr * nc,
        "label volume size mismatch"
    );
    let mut h = vec![0u8; VOX_OFFSET];
    let put_i16 =
        |h: &mut [u8], off: usize, v: i16| h[off..off + 2].copy_from_slice(&v.to_le_bytes());
    let put_f32 =
        |h: &mut [u8], off: usize, v: f32| h[off..off + 4].copy_from_slice(&v.to_le_bytes());
    h[0..4].copy_from_slice(&(HEADER_LEN as i32).to_le_bytes());
    h[39] = 0; // dim_info
    for (i, d) in [3, nc as i16, nr as i16, nk as i16, 1, 1, 1, 1]
        .iter()
        .enumerate()
    {
        put_i16(&mut h, 40 + 2 * i, *d);
    }
    put_i16(&mut h, 70, 2); // datatype: DT_UNSIGNED_CHAR
    put_i16(&mut h, 72, 8); // bitpix
    let pix = [
        1.0,
        vol.pixel_spacing as f32,
        vol.pixel_spacing as f32,
        vol.slice_spacing as f32,
        0.0,
        0.0,
        0.0,
        0.0,
    ];
    for (i, p) in pix.iter().enumerate() {
        put_f32(&mut h, 76 + 4 * i, *p);
    }
    put_f32(&mut h, 108, VOX_OFFSET as f32);
    put_f32(&mut h, 112, 1.0); // scl_slope
    put_f32(&mut h, 116, 0.0); // scl_inter
    h[123] = 2; // xyzt_units: mm
    let descrip = b"cspine-triage synthetic phantom labels";
    h[148..148 + descrip.len()].copy_from_slice(descrip);
    put_i16(&mut h, 252, 0); // qform_code
    put_i16(&mut h, 254, 1); // sform_code: scanner anatomical

    // Voxel (i, j, s) -> instance k = nk-1-s, row = nr-1-j, column = i -> patient LPS,
    // then RAS (negate x, y) as NIfTI requires.
    let (ps, st) = (vol.pixel_spacing, vol.instance_step);
    let (rd, cd) = (vol.row_direction, vol.column_direction);
    let origin: V3 = std::array::from_fn(|a| {
        vol.first_position[a] + (nk - 1) as f64 * st[a] + (nr - 1) as f64 * ps * cd[a]
    });
    let di: V3 = std::array::from_fn(|a| ps * rd[a]);
    let dj: V3 = std::array::from_fn(|a| -ps * cd[a]);
    let ds: V3 = std::array::from_fn(|a| -st[a]);
    for (row, a) in [(280usize, 0usize), (296, 1), (312, 2)] {
        let sign = if a < 2 { -1.0 } else { 1.0 };
        put_f32(&mut h, row, (sign * di[a]) as f32);
        put_f32(&mut h, row + 4, (sign * dj[a]) as f32);
        put_f32(&mut h, row + 8, (sign * ds[a]) as f32);
        put_f32(&mut h, row + 12, (sign * origin[a]) as f32);
    }
    h[344..348].copy_from_slice(b"n+1\0");
    // Bytes 348..352: no extensions.

    let mut data = Vec::with_capacity(nk * nr * nc);
    for s in 0..nk {
        let k = nk - 1 - s;
        for j in 0..nr {
            let row = nr - 1 - j;
            let start = (k * nr + row) * nc;
            data.extend_from_slice(&vol.labels[start..start + nc]);
        }
    }
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    f.write_all(&h)?;
    f.write_all(&data)?;
    f.flush()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
