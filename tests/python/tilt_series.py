"""Writes a copy of a CT series with the patient tilted sideways (towards a shoulder).

  python3 tilt_series.py IN_DIR OUT_DIR --deg 20

IN_DIR holds one axial series (searched recursively for *.dcm). The HU volume is rotated
about the patient's anterior-posterior axis through its centre (nearest neighbour, air
outside), and written with the same geometry and headers under new Series and SOP Instance
UIDs, explicit VR little endian. What a scanner would record for a patient lying tilted: the
slices stay axial, the neck does not.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("in_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--deg", type=float, required=True)
    args = ap.parse_args()

    datasets = [pydicom.dcmread(p) for p in sorted(args.in_dir.rglob("*.dcm"))]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    slope = float(datasets[0].RescaleSlope)
    intercept = float(datasets[0].RescaleIntercept)
    hu = np.stack([ds.pixel_array.astype(np.float32) * slope + intercept for ds in datasets])
    dz = float(datasets[1].ImagePositionPatient[2]) - float(datasets[0].ImagePositionPatient[2])
    dx = float(datasets[0].PixelSpacing[1])

    s, rows, cols = hu.shape
    kc, cc = (s - 1) / 2, (cols - 1) / 2
    cos, sin = math.cos(math.radians(args.deg)), math.sin(math.radians(args.deg))
    x = (np.arange(cols) - cc) * dx
    out = np.full_like(hu, -1024.0)
    for k in range(s):
        z = (k - kc) * dz
        # Inverse rotation in the x-z (coronal) plane: where each output voxel comes from.
        src_c = np.rint(cc + (cos * x + sin * z) / dx).astype(int)
        src_k = np.rint(kc + (-sin * x + cos * z) / dz).astype(int)
        ok = (src_c >= 0) & (src_c < cols) & (src_k >= 0) & (src_k < s)
        out[k][:, ok] = hu[src_k[ok], :, src_c[ok]].T

    series_uid = generate_uid()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(datasets):
        stored = np.rint((out[k] - intercept) / slope)
        info = np.iinfo(ds.pixel_array.dtype)
        ds.PixelData = np.clip(stored, info.min, info.max).astype(ds.pixel_array.dtype).tobytes()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesDescription = f"tilted {args.deg:g} degrees"
        ds.save_as(args.out_dir / f"{k + 1}.dcm", enforce_file_format=True)


if __name__ == "__main__":
    main()
