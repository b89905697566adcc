#!/usr/bin/env python3
"""Independent check of a `cspine-triage synth` output directory with pydicom + numpy.

Usage: synth_check.py OUT_DIR
Reads every DICOM file, the RSNA-style NIfTI masks (parsed here by hand, no nibabel
needed, loaded exactly as the RSNA 2022 loader does), train.csv and the ground truth,
and checks them against each other. Prints one JSON summary line per study and exits
non-zero with a message on the first failure.
"""
import csv
import glob
import json
import os
import struct
import sys

import numpy as np
import pydicom

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def load_nifti_rsna(path):
    """Returns m[k, row, col] like `nib.load(p).get_fdata()[:, ::-1, ::-1].transpose(2, 1, 0)`."""
    raw = open(path, "rb").read()
    check(struct.unpack("<i", raw[0:4])[0] == 348, f"{path}: sizeof_hdr != 348")
    check(raw[344:348] == b"n+1\x00", f"{path}: bad NIfTI magic")
    dim = struct.unpack("<8h", raw[40:56])
    check(dim[0] == 3, f"{path}: expected 3 dims, got {dim[0]}")
    datatype, bitpix = struct.unpack("<hh", raw[70:74])
    check((datatype, bitpix) == (2, 8), f"{path}: expected uint8, got datatype {datatype}")
    vox_offset = int(struct.unpack("<f", raw[108:112])[0])
    shape = dim[1:4]
    n = shape[0] * shape[1] * shape[2]
    data = np.frombuffer(raw[vox_offset:vox_offset + n], dtype=np.uint8)
    check(data.size == n, f"{path}: truncated data")
    d = data.reshape(shape, order="F")  # NIfTI: first index fastest
    srow = np.array(struct.unpack("<12f", raw[280:328]), dtype=np.float64).reshape(3, 4)
    return d[:, ::-1, ::-1].transpose(2, 1, 0), srow


def check_study(out, uid, csv_row):
    series_dir = os.path.join(out, "train_images", uid)
    files = glob.glob(os.path.join(series_dir, "*.dcm"))
    check(len(files) >= 8, f"{uid}: only {len(files)} files")
    by_number = {}
    tsyntaxes = set()
    for f in files:
        ds = pydicom.dcmread(f)
        n = int(ds.InstanceNumber)
        check(os.path.basename(f) == f"{n}.dcm", f"{f}: file name != InstanceNumber {n}")
        by_number[n] = ds
        tsyntaxes.add(str(ds.file_meta.TransferSyntaxUID))
    numbers = sorted(by_number)
    check(numbers == list(range(1, len(files) + 1)), f"{uid}: InstanceNumbers not 1..n")
    slices = [by_number[n] for n in numbers]
    first = slices[0]
    sop_uids = set()
    for ds in slices:
        check(ds.SOPClassUID == CT_IMAGE_STORAGE, f"{uid}: SOP class {ds.SOPClassUID}")
        check(ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE, f"{uid}: meta SOP class")
        check(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID, f"{uid}: meta SOP UID")
        check(ds.Modality == "CT", f"{uid}: modality {ds.Modality}")
        check(list(ds.ImageType)[:3] == ["ORIGINAL", "PRIMARY", "AXIAL"], f"{uid}: ImageType")
        check(ds.StudyInstanceUID == uid, f"{uid}: StudyInstanceUID {ds.StudyInstanceUID}")
        check(ds.SeriesInstanceUID == first.SeriesInstanceUID, f"{uid}: mixed series")
        check(ds.FrameOfReferenceUID == first.FrameOfReferenceUID, f"{uid}: mixed FoR")
        check(ds.PatientID == first.PatientID and ds.PatientID, f"{uid}: PatientID")
        for kw in ("AccessionNumber", "StationName", "ConvolutionKernel", "StudyDate",
                   "SliceThickness", "SpacingBetweenSlices"):
            check(kw in ds and str(ds.data_element(kw).value) != "", f"{uid}: missing {kw}")
        check(ds.BitsAllocated == 16 and ds.BitsStored in (12, 16), f"{uid}: bits")
        check(ds.Rows == first.Rows and ds.Columns == first.Columns, f"{uid}: matrix varies")
        check(list(ds.ImageOrientationPatient) == list(first.ImageOrientationPatient),
              f"{uid}: IOP varies")
        sop_uids.add(ds.SOPInstanceUID)
        for u in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
            check(len(u) <= 64 and all(p == "0" or not p.startswith("0") for p in u.split(".")),
                  f"{uid}: invalid UID {u}")
    check(len(sop_uids) == len(slices), f"{uid}: duplicate SOP Instance UIDs")
    check(len(tsyntaxes) == 1, f"{uid}: mixed transfer syntaxes {tsyntaxes}")

    # Geometry: IPP steps equal SpacingBetweenSlices along the normal, no drift in-plane.
    iop = np.array(first.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    ipp = np.array([ds.ImagePositionPatient for ds in slices], dtype=np.float64)
    steps = np.diff(ipp, axis=0)
    along = steps @ normal
    spacing = float(first.SpacingBetweenSlices)
    check(np.allclose(np.abs(along), spacing, atol=1e-3), f"{uid}: IPP steps {along[:3]} != {spacing}")
    check(np.all(np.sign(along) == np.sign(along[0])), f"{uid}: slices not monotonic")
    inplane = steps - np.outer(along, normal)
    check(np.abs(inplane).max() < 1e-3, f"{uid}: IPP drifts in-plane")

    vol = np.stack([ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope)
                    + float(ds.RescaleIntercept) for ds in slices])
    m, srow = load_nifti_rsna(os.path.join(out, "segmentations", uid + ".nii"))
    check(m.shape == vol.shape, f"{uid}: mask shape {m.shape} != volume {vol.shape}")

    # HU ranges: air in the airway/outside, cortical bone present.
    check(vol.min() < -900, f"{uid}: no air (min HU {vol.min()})")
    check(vol.max() > 1000, f"{uid}: no cortical bone (max HU {vol.max()})")
    cmask = (m >= 1) & (m <= 7)
    for v in range(1, 8):
        check((m == v).sum() > 50, f"{uid}: label C{v} missing from the mask")
    bone_frac = float((vol[cmask] > 150).mean())
    check(bone_frac > 0.9, f"{uid}: only {bone_frac:.3f} of C-labelled voxels have HU > 150")
    outside = vol[m == 0]
    check(np.median(outside) < 150, f"{uid}: background median HU {np.median(outside)}")

    # Anatomical order: label centroids go from superior (C1) to inferior (C7) in patient z.
    z_of_k = ipp[:, 2]
    cz = []
    for v in range(1, 8):
        ks = np.nonzero(m == v)[0]
        cz.append(float(z_of_k[ks].mean()))
    check(all(a > b for a, b in zip(cz, cz[1:])), f"{uid}: C1..C7 not superior to inferior: {cz}")

    # NIfTI affine maps voxel (i, j, s) to the same place as the DICOM geometry (RAS).
    ps = [float(x) for x in first.PixelSpacing]
    nk, nr, nc = m.shape
    for (k, r, c) in [(0, 0, 0), (nk - 1, nr - 1, nc - 1), (nk // 2, 7, nc // 3)]:
        lps = ipp[k] + c * ps[1] * row_dir + r * ps[0] * col_dir
        ijk = np.array([c, nr - 1 - r, nk - 1 - k, 1.0])
        ras = srow @ ijk
        check(np.allclose(ras, [-lps[0], -lps[1], lps[2]], atol=0.05),
              f"{uid}: NIfTI sform {ras} != DICOM {lps} at {(k, r, c)}")

    # train.csv agrees with the ground truth, and fractured vertebrae are the flagged ones.
    gt = json.load(open(os.path.join(out, "ground_truth", uid + ".json")))
    flags = [int(csv_row[f"C{v}"]) for v in range(1, 8)]
    check(gt["labels"] == flags, f"{uid}: ground truth labels {gt['labels']} != csv {flags}")
    check(int(csv_row["patient_overall"]) == int(any(flags)), f"{uid}: patient_overall")
    fractured = sorted({f["vertebra"] for f in gt["fractures"] if f["vertebra"].startswith("C")})
    check(fractured == [f"C{v + 1}" for v in range(7) if flags[v]], f"{uid}: fracture list")
    check(gt["geometry"]["slices"] == len(slices), f"{uid}: ground truth slice count")
    check(gt["encoding"]["transfer_syntax_uid"] in tsyntaxes, f"{uid}: ground truth TS")
    return {
        "uid": uid,
        "slices": len(slices),
        "matrix": int(first.Rows),
        "transfer_syntax": tsyntaxes.pop(),
        "patient_position": str(first.PatientPosition),
        "pixel_representation": int(first.PixelRepresentation),
        "bone_fraction": round(bone_frac, 4),
        "flags": flags,
    }


def main():
    out = sys.argv[1]
    with open(os.path.join(out, "train.csv"), newline="") as f:
        reader = csv.DictReader(f)
        check(reader.fieldnames == ["StudyInstanceUID", "patient_overall",
                                    "C1", "C2", "C3", "C4", "C5", "C6", "C7"],
              f"train.csv header {reader.fieldnames}")
        rows = list(reader)
    check(len(rows) > 0, "train.csv has no studies")
    dirs = sorted(os.listdir(os.path.join(out, "train_images")))
    check(sorted(r["StudyInstanceUID"] for r in rows) == dirs, "train.csv != train_images/")
    for row in rows:
        print(json.dumps(check_study(out, row["StudyInstanceUID"], row)))


if __name__ == "__main__":
    main()
