"""Reference implementation of the model input, exactly as docs/model-contract.md specifies.

The Rust preprocessing (`src/inference/preprocess.rs`) is compared with this file number for
number, so it stays plain numpy and follows the contract's steps in order:

1. canonical LPS grid, 2. target points, 3. trilinear sampling in source index space with
`pad_hu` outside, 4. window, 5. 2.5D channels (k-1, k, k+1, clamped).

Choices the contract leaves to the implementation, stated so Rust can match them:
- slices are sorted ascending by `ImagePositionPatient . n`, n = row_cos x col_cos;
- (cx, cy) and the in-plane index of a point use the FIRST slice of that order; the slice
  index is the piecewise-linear inverse of the slice positions along n (uneven spacing ok);
- "beyond the outermost voxel centres" is strict: an index in [0, N-1] is inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract import INPUT

H = INPUT["height"]
W = INPUT["width"]
DZ = INPUT["spacing_mm"]["slice"]
DR = INPUT["spacing_mm"]["row"]
DC = INPUT["spacing_mm"]["column"]
CENTER = INPUT["window"]["center"]
WIDTH = INPUT["window"]["width"]
PAD_HU = INPUT["pad_hu"]
MIN_SLICES = INPUT["min_slices"]
MAX_SLICES = INPUT["max_slices"]
SEG_STRIDE = 4


@dataclass
class Volume:
    """An HU volume in acquisition order with its DICOM geometry (like `series::CtVolume`)."""

    hu: np.ndarray  # [K, R, C] float32, slices sorted ascending along the normal
    positions: np.ndarray  # [K, 3] ImagePositionPatient of each slice, same order
    row_cos: np.ndarray  # [3] direction of increasing column index (IOP[0:3])
    col_cos: np.ndarray  # [3] direction of increasing row index (IOP[3:6])
    spacing: tuple  # (row spacing, column spacing) = PixelSpacing
    instance_numbers: np.ndarray  # [K] InstanceNumber of each slice, same order
    sop_uids: list | None = None


def load_dicom_series(folder: str | Path) -> Volume:
    """Reads one CT series (every readable DICOM file in `folder`)."""
    import pydicom

    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    dss = []
    for p in files:
        try:
            ds = pydicom.dcmread(p)
        except Exception:
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds:
            dss.append(ds)
    if not dss:
        raise ValueError(f"no DICOM images with geometry in {folder}")
    series = dss[0].SeriesInstanceUID
    dss = [d for d in dss if d.SeriesInstanceUID == series]
    iop = np.array([float(v) for v in dss[0].ImageOrientationPatient], dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    dss.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, dtype=np.float64), normal)))
    hu = np.stack(
        [
            d.pixel_array.astype(np.float32) * float(getattr(d, "RescaleSlope", 1.0))
            + float(getattr(d, "RescaleIntercept", 0.0))
            for d in dss
        ]
    )
    ps = [float(v) for v in dss[0].PixelSpacing]
    return Volume(
        hu=hu,
        positions=np.array([[float(v) for v in d.ImagePositionPatient] for d in dss]),
        row_cos=row_cos,
        col_cos=col_cos,
        spacing=(ps[0], ps[1]),
        instance_numbers=np.array([int(d.InstanceNumber) for d in dss]),
        sop_uids=[str(d.SOPInstanceUID) for d in dss],
    )


@dataclass
class Grid:
    """Target grid of the model input (contract step 2)."""

    s: int
    zmin: float
    cx: float
    cy: float

    def z(self) -> np.ndarray:
        return self.zmin + np.arange(self.s) * DZ


def _slice_centres(vol: Volume) -> np.ndarray:
    k, r, c = vol.hu.shape
    dr, dc = vol.spacing
    return vol.positions + vol.row_cos * (c - 1) / 2 * dc + vol.col_cos * (r - 1) / 2 * dr


def target_grid(vol: Volume) -> Grid:
    centres = _slice_centres(vol)
    zmin, zmax = float(centres[:, 2].min()), float(centres[:, 2].max())
    s = int(np.floor((zmax - zmin) / DZ)) + 1
    if s > MAX_SLICES:
        s = MAX_SLICES
        zmin = zmax - (s - 1) * DZ
    # The mean of the four corner pixel centres of the first slice = its centre.
    cx, cy = float(centres[0, 0]), float(centres[0, 1])
    return Grid(s=s, zmin=zmin, cx=cx, cy=cy)


def continuous_index(vol: Volume, pts: np.ndarray) -> tuple:
    """Inverse of the source geometry: patient points [..., 3] -> (k, i, j) float64, with a
    boolean `inside` (every axis within the outermost voxel centres)."""
    k_n, r_n, c_n = vol.hu.shape
    dr, dc = vol.spacing
    normal = np.cross(vol.row_cos, vol.col_cos)
    u = pts - vol.positions[0]
    j = u @ vol.row_cos / dc
    i = u @ vol.col_cos / dr
    d = pts @ normal
    ds = vol.positions @ normal
    if k_n > 1:
        k = np.interp(d, ds, np.arange(k_n, dtype=np.float64))
        inside_k = (d >= ds[0] - 1e-6) & (d <= ds[-1] + 1e-6)
    else:
        k = np.zeros_like(d)
        inside_k = np.abs(d - ds[0]) <= 1e-6
    inside = inside_k & (i >= 0) & (i <= r_n - 1) & (j >= 0) & (j <= c_n - 1)
    return k, i, j, inside


def grid_points(grid: Grid, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Patient points [S, len(rows), len(cols), 3] at model pixel coordinates rows x cols."""
    z = grid.z()
    x = grid.cx + (cols - (W - 1) / 2) * DC
    y = grid.cy + (rows - (H - 1) / 2) * DR
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return np.stack([xx, yy, zz], axis=-1)


def _trilinear(vol: np.ndarray, k, i, j, inside, pad: float) -> np.ndarray:
    def split(t, n):
        if n == 1:
            return np.zeros(t.shape, np.int64), np.zeros(t.shape)
        t0 = np.clip(np.floor(t), 0, n - 2).astype(np.int64)
        return t0, t - t0

    kn, rn, cn = vol.shape
    k = np.where(inside, k, 0.0)
    i = np.where(inside, i, 0.0)
    j = np.where(inside, j, 0.0)
    k0, fk = split(k, kn)
    i0, fi = split(i, rn)
    j0, fj = split(j, cn)
    k1, i1, j1 = np.minimum(k0 + 1, kn - 1), np.minimum(i0 + 1, rn - 1), np.minimum(j0 + 1, cn - 1)
    def v(k, i, j):  # gather in the volume's dtype, interpolate in float64
        return vol[k, i, j].astype(np.float64)

    c00 = v(k0, i0, j0) * (1 - fj) + v(k0, i0, j1) * fj
    c01 = v(k0, i1, j0) * (1 - fj) + v(k0, i1, j1) * fj
    c10 = v(k1, i0, j0) * (1 - fj) + v(k1, i0, j1) * fj
    c11 = v(k1, i1, j0) * (1 - fj) + v(k1, i1, j1) * fj
    c0 = c00 * (1 - fi) + c01 * fi
    c1 = c10 * (1 - fi) + c11 * fi
    out = c0 * (1 - fk) + c1 * fk
    return np.where(inside, out, pad)


def resample_hu(vol: Volume, grid: Grid | None = None, rotation: np.ndarray | None = None) -> np.ndarray:
    """Steps 1-3: HU on the target grid, [S, 128, 128] float32. `rotation` (3x3, not part of
    the contract) turns the grid about its centre first: the patient seen rotated the other
    way (`robustness.py`)."""
    grid = grid or target_grid(vol)
    out = np.empty((grid.s, H, W), np.float32)
    rows, cols = np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64)
    pts = grid_points(grid, rows, cols)
    if rotation is not None:
        centre = np.array([grid.cx, grid.cy, float(grid.z().mean())])
        pts = centre + (pts - centre) @ rotation.T
    for s in range(grid.s):  # one slice at a time keeps memory small
        k, i, j, inside = continuous_index(vol, pts[s])
        out[s] = _trilinear(vol.hu, k, i, j, inside, PAD_HU)
    return out


def window(hu: np.ndarray) -> np.ndarray:
    """Step 4."""
    lo = CENTER - WIDTH / 2
    return np.clip((hu - lo) / WIDTH, 0.0, 1.0).astype(np.float32)


def stack_channels(v: np.ndarray) -> np.ndarray:
    """Step 5: [S, H, W] -> [S, 3, H, W] with slices k-1, k, k+1 (clamped)."""
    s = v.shape[0]
    idx = np.arange(s)
    return np.stack([v[np.clip(idx - 1, 0, s - 1)], v, v[np.clip(idx + 1, 0, s - 1)]], axis=1)


class SeriesTooShort(ValueError):
    pass


def preprocess(vol: Volume) -> np.ndarray:
    """The full contract: Volume -> float32 [S, 3, 128, 128]."""
    grid = target_grid(vol)
    if grid.s < MIN_SLICES:
        raise SeriesTooShort(f"series too short along z: {grid.s} model slices < {MIN_SLICES}")
    return np.ascontiguousarray(stack_channels(window(resample_hu(vol, grid))))


def resample_labels(vol: Volume, mask: np.ndarray, grid: Grid | None = None) -> np.ndarray:
    """Nearest-neighbour vertebra labels (0 background, 1..7 C1..C7) at the centres of the
    stride-4 output cells: [S, 32, 32] uint8. `mask` is in the volume's slice order."""
    grid = grid or target_grid(vol)
    cells = np.arange(H // SEG_STRIDE) * SEG_STRIDE + (SEG_STRIDE - 1) / 2
    pts = grid_points(grid, cells, cells)
    k, i, j, inside = continuous_index(vol, pts)
    kn, rn, cn = mask.shape
    ki = np.clip(np.rint(k), 0, kn - 1).astype(np.int64)
    ii = np.clip(np.rint(i), 0, rn - 1).astype(np.int64)
    jj = np.clip(np.rint(j), 0, cn - 1).astype(np.int64)
    lab = np.where(inside, mask[ki, ii, jj], 0)
    lab = np.where(lab > 7, 0, lab)  # RSNA masks label thoracic vertebrae 8..19
    return lab.astype(np.uint8)
