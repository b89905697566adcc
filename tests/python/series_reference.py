#!/usr/bin/env python3
"""Reference HU of real CT files (pydicom + pydicom-data) in several transfer syntaxes.

usage: series_reference.py OUTDIR

Copies each source file into OUTDIR/<name>.dcm, derives extra transfer syntaxes of
CT_small.dcm (RLE with pydicom; JPEG-LS and JPEG lossless with DCMTK; deflated with
pydicom), and writes OUTDIR/<name>.hu (int16 LE) with pydicom's HU: stored values from
`pixel_array`, PixelPaddingValue -> -1024, else RescaleSlope * v + RescaleIntercept,
rounded and clamped to int16. OUTDIR/manifest.json lists name, transfer syntax, dims.
Fails loudly when a required file or tool is missing.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

# Classic CT Image Storage files shipped by pydicom / pydicom-data, then other
# monochrome single-frame files for transfer syntaxes no CT file here uses.
SOURCES = ["CT_small.dcm", "693_UNCI.dcm", "693_UNCR.dcm", "693_J2KR.dcm", "693_J2KI.dcm",
           "bad_sequence.dcm", "J2K_pixelrep_mismatch.dcm", "explicit_VR-UN.dcm",
           "MR_small_implicit.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
           "MR_small_jp2klossless.dcm", "JPEGLSNearLossless_16.dcm", "JPGExtended.dcm",
           "image_dfl.dcm"]
# Lossy DCT codecs may round differently between decoders (IDCT implementations).
LOSSY_DCT = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}


def hu_of(path):
    ds = pydicom.dcmread(path)
    v = ds.pixel_array.astype(np.int64)
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    hu = np.clip(np.round(v * slope + intercept), -32768, 32767).astype(np.int16)
    pad = getattr(ds, "PixelPaddingValue", None)
    if pad is not None:
        limit = getattr(ds, "PixelPaddingRangeLimit", pad)
        lo, hi = min(pad, limit), max(pad, limit)
        hu[(v >= lo) & (v <= hi)] = -1024
    return ds, hu


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    manifest = []
    for name in SOURCES:
        src = get_testdata_file(name)
        if src is None:
            sys.exit(f"pydicom test file {name} not found: pip install pydicom-data")
        shutil.copy(src, os.path.join(out, name))
    ct = os.path.join(out, "CT_small.dcm")
    # Derived transfer syntaxes of CT_small (lossless: same HU as the source).
    ds = pydicom.dcmread(ct)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(os.path.join(out, "CT_small_rle.dcm"))
    ds = pydicom.dcmread(ct)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(os.path.join(out, "CT_small_deflated.dcm"), enforce_file_format=True)
    for tool, args, name in [("dcmcjpls", ["+el"], "CT_small_jls.dcm"),
                             ("dcmcjpeg", ["+e1"], "CT_small_jpeg_sv1.dcm")]:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install dcmtk")
        subprocess.run([tool, *args, ct, os.path.join(out, name)], check=True)
    for fname in sorted(os.listdir(out)):
        if not fname.endswith(".dcm"):
            continue
        path = os.path.join(out, fname)
        ds, hu = hu_of(path)
        base = fname[:-4]
        hu.astype("<i2").tofile(os.path.join(out, base + ".hu"))
        manifest.append({"name": base, "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
                         "rows": int(ds.Rows), "columns": int(ds.Columns),
                         "bits_stored": int(ds.BitsStored),
                         "tolerance": 2 if ds.file_meta.TransferSyntaxUID in LOSSY_DCT else 0})
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
