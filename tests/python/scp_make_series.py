#!/usr/bin/env python3
"""Writes one axial CT series (CT Image Storage, Explicit VR Little Endian, int16,
512x512 by default) for the ingest benchmark: realistic size, not realistic anatomy.

    python3 scp_make_series.py OUTDIR [--slices 300] [--size 512]
"""

import argparse
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("outdir")
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    a = p.parse_args()
    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)

    n = a.size
    rng = np.random.default_rng(20261127)
    yy, xx = np.mgrid[0:n, 0:n]
    body = ((xx - n / 2) / (0.42 * n)) ** 2 + ((yy - n / 2) / (0.34 * n)) ** 2 <= 1.0
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    spacing = 0.625
    for k in range(a.slices):
        # Soft tissue body, a bone disc whose radius changes along z, noise: the pixel
        # data must not be trivially compressible for a fair transfer.
        r = 0.05 * n * (1.2 + np.sin(k / 15.0))
        bone = (xx - n / 2) ** 2 + (yy - 0.55 * n) ** 2 <= r * r
        hu = np.where(body, 40, -1000) + np.where(bone, 700, 0)
        hu = hu + rng.normal(0, 12, size=(n, n))
        stored = np.clip(hu + 1024, 0, 4095).astype(np.int16)

        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.Modality = "CT"
        ds.PatientID = "BENCH0001"
        ds.PatientName = "Bench^Ingest"
        ds.AccessionNumber = "BENCH1"
        ds.StudyDate = ds.SeriesDate = "20261127"
        ds.SeriesNumber = 2
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-160.0, -160.0, -k * spacing]
        ds.SliceThickness = spacing
        ds.PixelSpacing = [0.625, 0.625]
        ds.Rows = ds.Columns = n
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.ConvolutionKernel = "BONE"
        ds.PixelData = stored.tobytes()
        ds.save_as(out / f"CT{k + 1:04d}.dcm", enforce_file_format=True)


if __name__ == "__main__":
    main()
