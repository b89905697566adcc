#!/usr/bin/env python3
"""Writes the synthetic CT series fixtures of tests/series.rs with pydicom.

usage: series_make.py OUTDIR

Every fixture is a folder of DICOM files; `OUTDIR/manifest.json` describes each one and,
where a volume is expected, `OUTDIR/<case>.hu` holds the expected HU voxels (int16
little endian, slices ascending along the normal, then rows, then columns) computed here
from the generated stored values, independently of the Rust code under test.
"""
import json
import os
import random
import sys

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ROWS, COLS, SLICES = 24, 40, 20  # not square: a row/column swap cannot pass
SPACING = 1.25


def stored_values(k, signed=True):
    """Deterministic stored values of slice k: a ramp plus a per-slice offset."""
    r = np.arange(ROWS, dtype=np.int32)[:, None]
    c = np.arange(COLS, dtype=np.int32)[None, :]
    v = 3 * r + 5 * c + 40 * k
    if signed:
        v = v - 300  # negative stored values exercise the sign extension
    return v


def base_dataset(study, series, sop, number, ipp, iop, **extra):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = extra.get("sop_class", CT_IMAGE_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = extra.get("sop_class", CT_IMAGE_STORAGE)
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = extra.get("modality", "CT")
    ds.ImageType = extra.get("image_type", ["ORIGINAL", "PRIMARY", "AXIAL"])
    ds.PatientID = "PHANTOM-1"
    ds.AccessionNumber = "ACC-1"
    ds.StationName = "CT-TEST"
    ds.SeriesDescription = extra.get("description", "C-spine bone 1.25")
    ds.SeriesNumber = extra.get("series_number", 3)
    ds.InstanceNumber = number
    ds.ConvolutionKernel = extra.get("kernel", "BONE")
    ds.SliceThickness = SPACING
    ds.ImagePositionPatient = [float(x) for x in ipp]
    ds.ImageOrientationPatient = [float(x) for x in iop]
    ds.PixelSpacing = [0.7, 0.8]
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def write(ds, path):
    ds.save_as(path, enforce_file_format=True)


def axial_series(out, name, study, series, sops, *, order=None, numbers=None, skip=(),
                 iop_override=None, signed=True, slope=1.0, intercept=-1024.0,
                 padding=None, high_garbage=False, bits_stored=16, names=None, **extra):
    """Writes an axial series; returns the expected HU volume of the written slices."""
    os.makedirs(os.path.join(out, name), exist_ok=True)
    order = list(range(SLICES)) if order is None else order
    expected = {}
    for k in order:
        if k in skip:
            continue
        iop = [1, 0, 0, 0, 1, 0]
        if iop_override and k in iop_override:
            iop = iop_override[k]
        ipp = [-20.0, -30.0, 10.0 + SPACING * k]
        number = numbers[k] if numbers else k + 1
        ds = base_dataset(study, series, sops[k], number, ipp, iop, **extra)
        v = stored_values(k, signed)
        if padding is not None:
            v[:3, :4] = padding  # a padded corner, as outside a circular field of view
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        if padding is not None:
            ds.PixelPaddingValue = padding
        raw = v.astype(np.int16 if signed else np.uint16)
        if high_garbage:
            # bits above BitsStored carry junk (old overlays): they must be masked off
            raw = (raw.astype(np.uint16) | np.uint16(0xF000)).astype(raw.dtype)
        ds.PixelData = raw.tobytes()
        fname = names[k] if names else f"slice_{k:03d}.dcm"
        write(ds, os.path.join(out, name, fname))
        hu = np.clip(np.round(v * slope + intercept), -32768, 32767).astype(np.int16)
        if padding is not None:
            hu[v == padding] = -1024
        expected[k] = hu
    return np.stack([expected[k] for k in sorted(expected)]) if expected else None


def thin_series_with_a_missing_slice(out, name, missing, slices=40):
    """A real-shaped thin series, as a head CT arrives: 512 x 512 slices of 0.488 mm
    pixels, 0.5 mm apart, 12-bit unsigned with intercept -1024, slice `missing` absent.
    Returns its manifest entry."""
    os.makedirs(os.path.join(out, name), exist_ok=True)
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(slices)]
    r = np.arange(512, dtype=np.int32)[:, None]
    c = np.arange(512, dtype=np.int32)[None, :]
    for k in range(slices):
        if k == missing:
            continue
        ipp = [-125.0, -125.0, -150.0 + 0.5 * k]
        ds = base_dataset(study, series, sops[k], k + 1, ipp, [1, 0, 0, 0, 1, 0],
                          kernel="H60s", description="Head 0.5 H60s")
        ds.SliceThickness = 0.6
        ds.PixelSpacing = [0.48828125, 0.48828125]
        ds.Rows, ds.Columns = 512, 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.PixelData = ((r + c + 7 * k) % 4000).astype(np.uint16).tobytes()
        write(ds, os.path.join(out, name, f"IM{k:05d}.dcm"))
    return {
        "series": series,
        "slices": slices - 1,
        "missing": sops[missing],
        "before": sops[missing - 1],
        "after": sops[missing + 1],
    }


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = random.Random(7)
    manifest = {}
    study = generate_uid()
    series = generate_uid()
    sops = [generate_uid() for _ in range(SLICES)]

    hu = axial_series(out, "ordered", study, series, sops, padding=-2000)
    hu.astype("<i2").tofile(os.path.join(out, "ordered.hu"))
    manifest["ordered"] = {"dims": list(hu.shape), "series": series, "sops": sops}

    # Same instances, files written in shuffled order under random names, instance
    # numbers reversed: must give the identical volume.
    order = list(range(SLICES))
    rng.shuffle(order)
    names = {k: f"{rng.getrandbits(64):016x}.dcm" for k in range(SLICES)}
    axial_series(out, "shuffled", study, series, sops, order=order,
                 numbers={k: SLICES - k for k in range(SLICES)}, names=names, padding=-2000)
    manifest["shuffled"] = {"dims": list(hu.shape)}

    axial_series(out, "gap", study, series, sops, skip={9})
    manifest["gap"] = {"missing_after": sops[8]}

    tilted = [1, 0, 0, 0, 0.9848, 0.1736]  # 10 degrees about x
    axial_series(out, "mixed_orientation", study, series, sops, iop_override={5: tilted})

    # Unsigned 12-bit stored values with junk in the high bits, slope 2.
    hu = axial_series(out, "rescale", generate_uid(), generate_uid(),
                      [generate_uid() for _ in range(SLICES)], signed=False, slope=2.0,
                      intercept=-1000.0, padding=0, high_garbage=True, bits_stored=12)
    hu.astype("<i2").tofile(os.path.join(out, "rescale.hu"))
    manifest["rescale"] = {"dims": list(hu.shape)}

    # A study with a localizer, a sagittal reformat and an SR beside the axial series.
    study2, axial2 = generate_uid(), generate_uid()
    hu = axial_series(out, "study_with_localizer", study2, axial2,
                      [generate_uid() for _ in range(SLICES)], padding=-2000)
    hu.astype("<i2").tofile(os.path.join(out, "study_with_localizer.hu"))
    scout_series, sag_series, sr_series = generate_uid(), generate_uid(), generate_uid()
    for i, iop in enumerate([[1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1]]):
        ds = base_dataset(study2, scout_series, generate_uid(), i + 1, [-100, 0, 100], iop,
                          image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], series_number=1)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = stored_values(0).astype(np.int16).tobytes()
        write(ds, os.path.join(out, "study_with_localizer", f"scout_{i}.dcm"))
    for i in range(4):
        ds = base_dataset(study2, sag_series, generate_uid(), i + 1, [i * 2.0, -30, 60],
                          [0, 1, 0, 0, 0, -1], image_type=["DERIVED", "SECONDARY", "REFORMATTED"],
                          series_number=400)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = stored_values(0).astype(np.int16).tobytes()
        write(ds, os.path.join(out, "study_with_localizer", f"sag_{i}.dcm"))
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID
    sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = study2, sr_series, "SR"
    write(sr, os.path.join(out, "study_with_localizer", "dose_report.dcm"))
    manifest["study_with_localizer"] = {
        "dims": list(hu.shape), "axial": axial2, "localizer": scout_series,
        "sagittal": sag_series, "sr": sr_series,
    }

    # Two candidate axial series: soft kernel thin, bone kernel thicker: bone wins.
    study3 = generate_uid()
    soft, bone = generate_uid(), generate_uid()
    axial_series(out, "two_candidates", study3, soft, [generate_uid() for _ in range(SLICES)],
                 kernel="STANDARD", series_number=2, names={k: f"soft_{k:03d}.dcm" for k in range(SLICES)})
    axial_series(out, "two_candidates", study3, bone, [generate_uid() for _ in range(SLICES)],
                 kernel="B70f", series_number=3, names={k: f"bone_{k:03d}.dcm" for k in range(SLICES)})
    manifest["two_candidates"] = {"soft": soft, "bone": bone}

    # The preferred (bone) series has a missing slice: the soft-tissue one is the fallback.
    study4 = generate_uid()
    soft, bone = generate_uid(), generate_uid()
    axial_series(out, "fallback", study4, soft, [generate_uid() for _ in range(SLICES)],
                 kernel="STANDARD", series_number=2, names={k: f"soft_{k:03d}.dcm" for k in range(SLICES)})
    axial_series(out, "fallback", study4, bone, [generate_uid() for _ in range(SLICES)],
                 kernel="BONE", series_number=3, skip={4},
                 names={k: f"bone_{k:03d}.dcm" for k in range(SLICES)})
    manifest["fallback"] = {"soft": soft, "bone": bone}

    # A 0.5 mm series with one slice missing: a 1 mm step, interpolated and reported.
    manifest["thin_gap"] = thin_series_with_a_missing_slice(out, "thin_gap", missing=17)

    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
