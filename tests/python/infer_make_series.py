"""Writes a small synthetic CT series with pydicom for the inference parity test.

    python3 infer_make_series.py OUT_DIR [--slices N] [--rows R] [--cols C] [--mirrored] [--seed S]

The phantom is smooth (a soft-tissue cylinder, a bony column with discs and some noise) so
trilinear sampling is exercised everywhere. `--mirrored` writes the same patient with the
rows flipped (column direction -y) and the files/instance numbers in feet-first order, so
the canonical grid must undo both.
"""

import argparse
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def hu_at(x, y, z, rng_field):
    body = (x / 110.0) ** 2 + ((y - 10) / 90.0) ** 2 <= 1.0
    hu = np.where(body, 40.0, -1000.0)
    spine = (x / 14.0) ** 2 + ((y - 25) / 12.0) ** 2 <= 1.0
    disc = (np.mod(z, 18.0) < 4.0)
    hu = np.where(spine & ~disc, 750.0 + 3.0 * z, hu)
    hu = np.where(spine & disc, 90.0, hu)
    return hu + rng_field


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--rows", type=int, default=192)
    ap.add_argument("--cols", type=int, default=200)
    ap.add_argument("--mirrored", action="store_true")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    ps = (0.8, 0.9)  # row spacing, column spacing
    dz = 2.5
    z0 = -40.0
    x0 = -(a.cols - 1) * ps[1] / 2 + 3.3
    y_first = -(a.rows - 1) * ps[0] / 2 - 1.7
    study, series = generate_uid(), generate_uid()
    frame = generate_uid()
    noise = rng.normal(0, 15, size=(a.slices, a.rows, a.cols))
    cols = np.arange(a.cols)
    rows = np.arange(a.rows)
    for k in range(a.slices):
        z = z0 + k * dz
        xx = x0 + cols[None, :] * ps[1]
        if a.mirrored:
            # Row 0 is the posterior edge: column direction is -y.
            y_top = y_first + (a.rows - 1) * ps[0]
            yy = y_top - rows[:, None] * ps[0]
            ipp = [x0, y_top, z]
            iop = [1, 0, 0, 0, -1, 0]
            field = noise[k][::-1]
        else:
            yy = y_first + rows[:, None] * ps[0]
            ipp = [x0, y_first, z]
            iop = [1, 0, 0, 0, 1, 0]
            field = noise[k]
        hu = hu_at(xx + 0 * yy, yy + 0 * xx, z, field)
        stored = np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16)

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientID = "PARITY-1"
        ds.PatientName = "Parity^Test"
        ds.AccessionNumber = "ACC-PARITY"
        ds.StudyDate = "20260101"
        ds.SeriesNumber = 2
        # Feet-first numbering for the mirrored variant: instance 1 is the top slice.
        ds.InstanceNumber = (a.slices - k) if a.mirrored else (k + 1)
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing = [ps[0], ps[1]]
        ds.SliceThickness = dz
        ds.ConvolutionKernel = "BONE"
        ds.Rows, ds.Columns = a.rows, a.cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = stored.tobytes()
        name = f"{(a.slices - k) if a.mirrored else (k + 1):04d}.dcm"
        pydicom.dcmwrite(out / name, ds, enforce_file_format=True)


if __name__ == "__main__":
    main()
