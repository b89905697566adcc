#!/usr/bin/env python3
"""Writes a large axial CT series for benches/series_rss.sh.

usage: series_make_big.py OUTDIR [SLICES] [SIZE] [PIXEL_MM]
(default 700 slices of 512 x 512 at 0.625 mm: a 320 mm field of view)
Uncompressed explicit VR little endian, signed 16-bit, files in random order of names.
"""
import os
import sys

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

out = sys.argv[1]
slices = int(sys.argv[2]) if len(sys.argv) > 2 else 700
size = int(sys.argv[3]) if len(sys.argv) > 3 else 512
pixel_mm = float(sys.argv[4]) if len(sys.argv) > 4 else 0.625
os.makedirs(out, exist_ok=True)
study, series = generate_uid(), generate_uid()
rng = np.random.default_rng(1)
yy, xx = np.mgrid[0:size, 0:size]
disk = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.45 * size) ** 2
for k in rng.permutation(slices):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = int(slices - k)
    ds.ConvolutionKernel = "BONE"
    ds.SliceThickness = 0.625
    ds.ImagePositionPatient = [-size * pixel_mm / 2, -size * pixel_mm / 2, float(0.625 * k)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [pixel_mm, pixel_mm]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    ds.PixelPaddingValue = -2000
    img = np.where(disk, rng.integers(900, 1400, (size, size)), -2000).astype(np.int16)
    ds.PixelData = img.tobytes()
    ds.save_as(os.path.join(out, f"{generate_uid()}.dcm"), enforce_file_format=True)
