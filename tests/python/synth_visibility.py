#!/usr/bin/env python3
"""Is a synthetic fracture still visible on the model's grid?

Usage: synth_visibility.py INTACT_DIR FRACTURED_DIR [PNG_DIR]
Both directories hold one study generated with the same seed, once with
`--fracture none` and once with a fracture (the generator guarantees they differ only
by the fracture). Each series is resampled exactly as docs/model-contract.md says
(1.25 mm in-plane, 2 mm slices, 128x128, trilinear, window 400/1800) and the
windowed volumes are compared near each ground-truth fracture location.
Prints one JSON line per fracture; exits non-zero if one is not visible.
"""
import glob
import json
import os
import sys

import numpy as np
import pydicom

WINDOW_CENTER, WINDOW_WIDTH, PAD_HU = 400.0, 1800.0, -1024.0
SIZE, PIXEL_MM, SLICE_MM = 128, 1.25, 2.0
# A fracture is "visible" when enough model voxels near it change by >= 0.1 of the
# window (180 HU): about the contrast of a lucent line in cancellous bone.
MIN_DELTA, MIN_VOXELS = 0.1, 6


def load_series(d):
    files = glob.glob(os.path.join(d, "train_images", "*", "*.dcm"))
    ds = [pydicom.dcmread(f) for f in files]
    iop = np.array(ds[0].ImageOrientationPatient, dtype=np.float64)
    # Model order: ascending patient z, whatever the slice normal's sign.
    ds.sort(key=lambda x: float(x.ImagePositionPatient[2]))
    vol = np.stack([x.pixel_array * float(x.RescaleSlope) + float(x.RescaleIntercept) for x in ds])
    ipp = np.array([x.ImagePositionPatient for x in ds], dtype=np.float64)
    ps = np.array(ds[0].PixelSpacing, dtype=np.float64)  # row spacing, column spacing
    gt = json.load(open(glob.glob(os.path.join(d, "ground_truth", "*.json"))[0]))
    return vol.astype(np.float32), ipp, iop, ps, gt


def resample(vol, ipp, iop, ps):
    """Model-contract resampling; returns (windowed volume [S,128,128], target z, cx, cy)."""
    row_dir, col_dir = iop[:3], iop[3:]
    assert abs(abs(row_dir[0]) - 1) < 1e-6 and abs(col_dir[1] - 1) < 1e-6, "axial only"
    z = ipp[:, 2]
    nr, nc = vol.shape[1:]
    corners = [ipp[0] + a * ps[1] * (nc - 1) * row_dir + b * ps[0] * (nr - 1) * col_dir
               for a in (0, 1) for b in (0, 1)]
    cx, cy = np.mean(corners, axis=0)[:2]
    zmin, zmax = z.min(), z.max()
    s = int(np.floor((zmax - zmin) / SLICE_MM)) + 1
    tz = zmin + np.arange(s) * SLICE_MM
    tx = cx + (np.arange(SIZE) - 63.5) * PIXEL_MM
    ty = cy + (np.arange(SIZE) - 63.5) * PIXEL_MM
    # Continuous source indices (axis-aligned geometry).
    kc = np.interp(tz, z, np.arange(len(z)))
    cc = (tx - ipp[0, 0]) / (ps[1] * row_dir[0])
    rc = (ty - ipp[0, 1]) / ps[0]
    out = np.empty((s, SIZE, SIZE), dtype=np.float32)

    def axis(idx, n):
        i0 = np.clip(np.floor(idx).astype(int), 0, n - 1)
        i1 = np.clip(i0 + 1, 0, n - 1)
        f = idx - i0
        inside = (idx >= 0) & (idx <= n - 1)
        return i0, i1, f.astype(np.float32), inside

    k0, k1, fk, ink = axis(kc, len(z))
    r0, r1, fr, inr = axis(rc, nr)
    c0, c1, fc, inc = axis(cc, nc)
    for t in range(s):
        a = vol[k0[t]] * (1 - fk[t]) + vol[k1[t]] * fk[t]
        a = a[r0][:, c0] * np.outer(1 - fr, 1 - fc) + a[r0][:, c1] * np.outer(1 - fr, fc) \
            + a[r1][:, c0] * np.outer(fr, 1 - fc) + a[r1][:, c1] * np.outer(fr, fc)
        mask = np.outer(inr, inc) & ink[t]
        out[t] = np.where(mask, a, PAD_HU)
    lo = WINDOW_CENTER - WINDOW_WIDTH / 2
    return np.clip((out - lo) / WINDOW_WIDTH, 0, 1), tz, cx, cy


def main():
    intact, fractured = sys.argv[1], sys.argv[2]
    png_dir = sys.argv[3] if len(sys.argv) > 3 else None
    va, ipp_a, iop_a, ps_a, _ = load_series(intact)
    vb, ipp_b, iop_b, ps_b, gt = load_series(fractured)
    assert np.allclose(ipp_a, ipp_b) and np.allclose(iop_a, iop_b), "not the same acquisition"
    ma, tz, cx, cy = resample(va, ipp_a, iop_a, ps_a)
    mb, _, _, _ = resample(vb, ipp_b, iop_b, ps_b)
    diff = np.abs(mb - ma)
    ok = True
    for f in gt["fractures"]:
        x, y, zz = f["location_mm"]
        k = (tz - zz) / SLICE_MM
        i = (y - cy) / PIXEL_MM + 63.5
        j = (x - cx) / PIXEL_MM + 63.5
        kk, ii, jj = np.meshgrid(np.arange(diff.shape[0]), np.arange(SIZE), np.arange(SIZE),
                                 indexing="ij")
        # Within 20 mm of the fracture point (model voxel units: 2 mm / 1.25 mm).
        near = ((kk - np.argmin(np.abs(tz - zz))) * SLICE_MM) ** 2 \
            + ((ii - i) * PIXEL_MM) ** 2 + ((jj - j) * PIXEL_MM) ** 2 < 20.0 ** 2
        n = int(((diff > MIN_DELTA) & near).sum())
        visible = n >= MIN_VOXELS
        ok &= visible
        print(json.dumps({"vertebra": f["vertebra"], "kind": f["kind"], "gap_mm": f["gap_mm"],
                          "height_loss": f["height_loss"], "changed_voxels": n,
                          "max_delta": round(float(diff[near].max()), 3), "visible": visible}))
        if png_dir:
            save_views(png_dir, f, ma, mb, int(np.argmin(np.abs(tz - zz))),
                       int(round(i)), int(round(j)))
    sys.exit(0 if ok else 1)


def save_views(png_dir, f, ma, mb, k, i, j):
    import struct
    import zlib

    def png(path, a):
        a = (np.clip(a, 0, 1) * 255).astype(np.uint8)
        h, w = a.shape
        raw = b"".join(b"\x00" + a[r].tobytes() for r in range(h))

        def chunk(t, d):
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
        open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                               + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    os.makedirs(png_dir, exist_ok=True)
    k = min(max(k, 0), ma.shape[0] - 1)
    j = min(max(j, 0), SIZE - 1)
    ax = np.concatenate([ma[k], mb[k]], 1)
    # Sagittal (superior up), stretched 2 mm / 1.25 mm.
    sag = lambda m: np.repeat(m[::-1, :, j], 2, axis=0)[:, :]
    sg = np.concatenate([sag(ma), sag(mb)], 1)
    name = f"{f['vertebra']}_{f['kind']}"
    png(os.path.join(png_dir, name + "_axial.png"), ax)
    png(os.path.join(png_dir, name + "_sagittal.png"), sg)


if __name__ == "__main__":
    main()
