"""Phantom family B output, the RSNA 2022 layout the training loader reads:
train.csv, train_images/<study>/<n>.dcm (CT Image Storage, one file per slice, scanner-like
headers, stored values Int16 or UInt16 with RescaleSlope/Intercept), segmentations/<study>.nii
(uint8, RSNA orientation: see data.load_rsna_mask) and ground_truth/<study>.json."""

from __future__ import annotations

import csv
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root
# (PixelRepresentation, RescaleIntercept, BitsStored): how scanners store HU.
STORAGE = [(0, -1024.0, 12), (0, -1024.0, 16), (1, 0.0, 16), (1, -1024.0, 16)]
VENDORS = [("PHANTOM-B", "Tube 64"), ("PHANTOM-B", "Helix 128"), ("PHANTOM-B", "Dual 256")]


def uid(text: str) -> str:
    return UID_ROOT + str(int(hashlib.sha256(text.encode()).hexdigest()[:24], 16))[:40]


def write_nifti(path: Path, data: np.ndarray, spacing) -> None:
    """Minimal NIfTI-1 (.nii), uint8, voxel sizes only."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    dims = [3, *data.shape, 1, 1, 1, 1]
    struct.pack_into("<8h", hdr, 40, *dims)
    struct.pack_into("<hh", hdr, 70, 2, 8)  # datatype uint8, bitpix
    struct.pack_into("<8f", hdr, 76, 1.0, *spacing, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352.0)  # vox_offset
    struct.pack_into("<f", hdr, 112, 1.0)  # scl_slope
    hdr[344:348] = b"n+1\0"
    with open(path, "wb") as f:
        f.write(hdr + b"\0" * 4)
        f.write(np.asarray(data, np.uint8).tobytes(order="F"))


def write_study(root: Path, key: str, rng, img, lab, zc, xs, ys, acq, gt) -> str:
    """Writes one study; returns its StudyInstanceUID."""
    study, series, frame = uid(key + "/study"), uid(key + "/series"), uid(key + "/for")
    pr, icpt, bits = STORAGE[int(rng.integers(len(STORAGE)))]
    vendor, model = VENDORS[int(rng.integers(len(VENDORS)))]
    syntax = ExplicitVRLittleEndian if rng.random() < 0.7 else ImplicitVRLittleEndian
    lo, hi = (-32768, 32767) if pr else (0, 2 ** bits - 1)
    stored = np.clip(np.rint(img - icpt), lo, hi).astype(np.int16 if pr else np.uint16)
    d = root / "train_images" / study
    d.mkdir(parents=True, exist_ok=True)
    dy, dx = ys[1] - ys[0], xs[1] - xs[0]
    ma = int(rng.integers(120, 350))
    acc = f"B{int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10**9:09d}"
    for k in range(len(zc)):
        sop = uid(f"{key}/sop/{k}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = syntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20260315"
        ds.StudyTime = ds.SeriesTime = "031500"
        ds.AccessionNumber = acc
        ds.Modality = "CT"
        ds.Manufacturer, ds.ManufacturerModelName = vendor, model
        ds.InstitutionName = "Phantom family B"
        ds.StudyDescription = "CT CERVICAL SPINE WO CONTRAST"
        ds.SeriesDescription = f"C-SPINE {acq.kernel_name} {acq.thickness:g}mm"
        ds.PatientName = f"PHANTOMB^{key.replace('/', '_')}"
        ds.PatientID = "PB" + acc[1:]
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CSPINE"
        ds.SliceThickness = f"{acq.thickness:g}"
        ds.SpacingBetweenSlices = f"{acq.spacing:g}"
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = f"{(xs[-1] - xs[0]) + dx:.1f}"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.XRayTubeCurrent = ma
        ds.ConvolutionKernel = acq.kernel_name
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{xs[0]:.4f}", f"{ys[0]:.4f}", f"{zc[k]:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{zc[k]:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = img.shape[1], img.shape[2]
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
        ds.PixelRepresentation = pr
        if acq.circle:
            ds.PixelPaddingValue = int(np.clip(-3024 - icpt, lo, hi))
        ds.WindowCenter, ds.WindowWidth = "500", "2500"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{icpt:g}", "1", "HU"
        ds.PixelData = stored[k].tobytes()
        pydicom.dcmwrite(d / f"{k + 1}.dcm", ds, enforce_file_format=True)
    (root / "segmentations").mkdir(exist_ok=True)
    # RSNA orientation: stored[x, y, z] with m[k, row, col] = stored[col, R-1-row, K-1-k].
    write_nifti(root / "segmentations" / f"{study}.nii", lab.transpose(2, 1, 0)[:, ::-1, ::-1],
                (dx, dy, acq.spacing))
    (root / "ground_truth").mkdir(exist_ok=True)
    gt = {**gt, "study_instance_uid": study, "series_instance_uid": series}
    (root / "ground_truth" / f"{study}.json").write_text(json.dumps(gt, indent=1))
    return study


def append_csv(root: Path, study: str, labels) -> None:
    path = root / "train.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["StudyInstanceUID", "patient_overall", "C1", "C2", "C3", "C4", "C5", "C6", "C7"])
        w.writerow([study, int(any(labels)), *map(int, labels)])
