"""Real-anatomy evaluation: the shipped model on the real CT of ../shared/realct.

Every case there is a real, fracture-free neck (head-and-neck cancer planning CT of OpenKBP, and
the Visible Human female head); none has fracture or vertebra labels. What this measures:
- how many of them the product would publish `positive` at the shipped thresholds (false
  alarms: each one is a false positive by construction),
- which cervical vertebrae the model's segmentation finds, and where,
- the series geometry against the model's acquisition envelope (models/model.json `envelope`):
  the daemon answers `indeterminate` outside it, so this runs `infer --ignore-envelope`.
Never a clinical number: 170 coarse radiotherapy planning scans and one cadaver head.

Each NIfTI is written as an axial DICOM CT series in a temporary folder (LPS geometry from the
affine: ImagePositionPatient of every slice, ImageOrientationPatient rows +x, columns +y; HU
stored as unsigned with RescaleIntercept -1024, RescaleSlope 1; SliceThickness = the slice
spacing, no ConvolutionKernel: neither is known), then `cspine-triage infer --json
--ignore-envelope` reads all series of a part in one call.

Reference levels from the spinal-cord label (OpenKBP label 1; label 2 brainstem), in patient z
(mm, the axis of the result's `z_range_mm`): the cord's top and bottom slice and its length.
Contouring convention (RTOG / Brouwer et al. 2015 H&N OAR guidelines) starts the cord where the
brainstem ends, at the foramen magnum, which lies at the level of C1 (the atlas sits just below
it). So `cord_top_z` is the one vertebral landmark derivable here: C1 is expected within about
0-20 mm below it. The cord's lower end is where the clinic stopped contouring (often the bottom
of the scan or the planning target), not a vertebral level; C2-C7 cannot be derived from the
labels (no vertebra labels, and cord length per vertebra varies). `c1_offset_mm` = (model's C1
centre z) - cord_top_z: near 0 to -20 mm if the model put C1 where the atlas is. `<V>_below_fm_mm`
= cord_top_z - (model's centre z of V). For comparison, the generator's anatomy the model was
trained on puts the vertebra centres this far below the top of C1 (median, 5-95 % of 400
phantoms, `synth --count 400 --seed 778 --matrix 64`): C1 9 (7-13), C2 23 (18-29, the dens
raises it), C3 45 (39-51), C4 62 (54-70), C5 79 (69-89), C6 97 (85-107), C7 114 (100-127) mm;
the foramen magnum lies a few mm above the top of C1. An adult neck is in that range; so a
vertebra found much further from the cord top than this is mislabelled or not a vertebra.

Split (fixed, once): part of an OpenKBP case = first byte of sha256("openkbp/" + case id, e.g.
"openkbp/pt_100") mod 10: 0-5 train, 6-7 validation, 8-9 test (realct_split.csv). The
Visible Human head is its own part, "vhf". Nothing here was used to train or tune the model.

Usage:
    python3 models/training/realct_eval.py --parts test [validation train vhf] \
        [--realct ../shared/realct] [--bin target/debug/cspine-triage] [--out models/training/realct]
Writes OUT/results_<part>.csv (per case) and OUT/cord_levels.csv (reference levels); prints a
summary per part.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

ROOT = Path(__file__).resolve().parents[2]
VERTEBRAE = ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as the tests use


def uid_for(text: str) -> str:
    """A deterministic UID under pydicom's root (the series of a case is the same every run)."""
    return UID_ROOT + str(int(hashlib.sha256(text.encode()).hexdigest()[:24], 16))[:40]


def part_of(case: str) -> str:
    b = hashlib.sha256(f"openkbp/{case}".encode()).digest()[0] % 10
    return "train" if b < 6 else ("validation" if b < 8 else "test")


def cases(realct: Path) -> list[tuple[str, str, Path, Path | None]]:
    """(case id, part, CT path, label path or None)."""
    out = []
    for ct in sorted((realct / "openkbp-train").glob("pt_*_ct.nii.gz"),
                     key=lambda p: int(p.name.split("_")[1])):
        case = ct.name[: -len("_ct.nii.gz")]
        oar = ct.with_name(f"{case}_oar.nii.gz")
        out.append((case, part_of(case), ct, oar if oar.exists() else None))
    vhf = realct / "visible-human-female" / "head.nii.gz"
    if vhf.exists():
        out.append(("vhf_head", "vhf", vhf, None))
    return out


def lps_volume(img: nib.Nifti1Image, data: np.ndarray | None = None):
    """The volume as [x (left), y (posterior), z (superior)] plus the LPS position of voxel
    (0, 0, k) and the spacing. Axis-aligned affines only (all of shared/realct)."""
    can = nib.as_closest_canonical(img)  # RAS+
    arr = np.asarray(can.dataobj) if data is None else data
    a = can.affine
    if not np.allclose(a[:3, :3], np.diag(np.diag(a[:3, :3])), atol=1e-3):
        raise ValueError("oblique affine: not supported")
    # RAS -> LPS: flip x and y (index order reversed along the first two axes).
    arr = arr[::-1, ::-1, :]
    n0, n1, _ = arr.shape
    sx, sy, sz = (abs(a[0, 0]), abs(a[1, 1]), abs(a[2, 2]))

    def lps(i, j, k):
        ras = a @ np.array([n0 - 1 - i, n1 - 1 - j, k, 1.0])
        return np.array([-ras[0], -ras[1], ras[2]])

    return arr, lps, (sx, sy, sz)


def write_series(ct: Path, out: Path, case: str, arr: np.ndarray | None = None,
                 keep: range | None = None) -> dict:
    """Writes the NIfTI as a DICOM series; returns its geometry. `case` names the UIDs.
    `arr`: HU on `lps_volume`'s grid to write instead of the file's (an edited copy);
    `keep`: the slices k to write (InstanceNumber 1.. in that order), all by default."""
    img = nib.load(str(ct))
    src, lps, (sx, sy, sz) = lps_volume(img, None)
    arr = src if arr is None else arr
    hu = np.clip(np.rint(arr), -1024, 64511 - 1024).astype(np.int32)
    out.mkdir(parents=True, exist_ok=True)
    study, series, frame = uid_for(case + "/study"), uid_for(case + "/series"), uid_for(case + "/for")
    nx, ny, nz = hu.shape
    keep = range(nz) if keep is None else keep
    for n, k in enumerate(keep):
        sop = uid_for(f"{case}/sop/{k}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
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
        ds.PatientID = f"REALCT-{case}"
        ds.PatientName = f"RealCT^{case}"
        ds.AccessionNumber = case[:16]
        ds.StudyDate = "20260101"
        ds.SeriesNumber = 1
        ds.SeriesDescription = f"realct {case}"
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in lps(0, 0, k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]  # between rows (y), between columns (x)
        ds.SliceThickness = f"{sz:.6g}"
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        # Rows run along y, columns along x: the slice is hu[:, :, k] transposed.
        ds.PixelData = (hu[:, :, k].T + 1024).astype(np.uint16).tobytes()
        pydicom.dcmwrite(out / f"{n + 1:04d}.dcm", ds, enforce_file_format=True)
    z = [lps(0, 0, k)[2] for k in keep]
    return {"series": series, "pixel_mm": (sy, sx), "slice_mm": sz,
            "slices": len(keep), "z_min": min(z), "z_max": max(z)}


def cord_levels(oar: Path) -> dict:
    """Reference levels from the labels, in patient z (LPS, mm)."""
    img = nib.load(str(oar))
    lab, lps, _ = lps_volume(img, None)
    lab = np.asarray(lab)
    nz = lab.shape[2]
    z = np.array([lps(0, 0, k)[2] for k in range(nz)])
    row = {}
    for name, value in (("cord", 1), ("brainstem", 2)):
        ks = np.nonzero((lab == value).any(axis=(0, 1)))[0]
        if len(ks):
            row[f"{name}_top_z"] = float(z[ks].max())
            row[f"{name}_bottom_z"] = float(z[ks].min())
        else:
            row[f"{name}_top_z"] = row[f"{name}_bottom_z"] = None
    if row["cord_top_z"] is not None:
        row["cord_length_mm"] = row["cord_top_z"] - row["cord_bottom_z"]
    else:
        row["cord_length_mm"] = None
    row["scan_top_z"], row["scan_bottom_z"] = float(z.max()), float(z.min())
    # Foramen magnum: cord top, or brainstem bottom where the cord is missing.
    fm = row["cord_top_z"] if row["cord_top_z"] is not None else row["brainstem_bottom_z"]
    row["foramen_magnum_z"] = fm
    return row


def run_infer(binary: Path, model: Path, dirs: list[Path]) -> tuple[dict, dict]:
    """Results and envelope notes keyed by SeriesInstanceUID."""
    cmd = [str(binary), "infer", "--json", "--ignore-envelope", "--runtime", "cpu",
           "--threads", "2", "--model", str(model), *map(str, dirs)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    results = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["series_instance_uid"]] = r
    notes = {}
    for line in p.stderr.splitlines():
        if "outside the acquisition envelope" in line and line.startswith("series "):
            uid = line.split()[1].rstrip(":")
            notes[uid] = line.split("(--ignore-envelope): ", 1)[-1]
    if not results:
        sys.exit(f"infer produced no result (rc {p.returncode}): {p.stderr[-2000:]}")
    return results, notes


def fmt(v, nd=1):
    return "" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["test"],
                    choices=["train", "validation", "test", "vhf"])
    ap.add_argument("--realct", type=Path, default=ROOT.parent / "shared" / "realct")
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "debug" / "cspine-triage")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "model.json")
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "training" / "realct")
    ap.add_argument("--batch", type=int, default=10, help="series per infer call")
    ap.add_argument("--limit", type=int, default=0, help="at most this many cases per part")
    ap.add_argument("--summarize", action="store_true",
                    help="only print the summaries of the committed OUT/results_<part>.csv")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    model = json.loads(a.model.read_text())
    if a.summarize:
        for part in a.parts:
            with open(a.out / f"results_{part}.csv") as f:
                summary(part, list(csv.DictReader(f)), model)
        return
    all_cases = cases(a.realct)

    with open(a.out.parent / "realct_split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "part"])
        for case, part, _, _ in all_cases:
            w.writerow([case, part])

    levels_path = a.out / "cord_levels.csv"
    levels = {}
    if levels_path.exists():
        with open(levels_path) as f:
            levels = {r["case"]: r for r in csv.DictReader(f)}

    for part in a.parts:
        todo = [c for c in all_cases if c[1] == part]
        if a.limit:
            todo = todo[: a.limit]
        rows = []
        for start in range(0, len(todo), a.batch):
            chunk = todo[start: start + a.batch]
            with tempfile.TemporaryDirectory(prefix="realct-") as tmp:
                geo, dirs = {}, []
                for case, _, ct, oar in chunk:
                    d = Path(tmp) / case
                    geo[case] = write_series(ct, d, case)
                    dirs.append(d)
                    if oar is not None and case not in levels:
                        levels[case] = {"case": case, **cord_levels(oar)}
                results, notes = run_infer(a.bin, a.model, dirs)
            for case, _, _, _ in chunk:
                g = geo[case]
                r = results.get(g["series"])
                row = {"case": case, "part": part,
                       "pixel_mm": f"{g['pixel_mm'][0]:.2f}", "slice_mm": f"{g['slice_mm']:.2f}",
                       "coverage_mm": f"{g['z_max'] - g['z_min']:.0f}",
                       "outside_envelope": notes.get(g["series"], ""),
                       "status": r["status"] if r else "missing",
                       "reason": (r or {}).get("reason") or "",
                       "patient_p": "", "n_found": "", "found": "", "flagged": "",
                       "c1_centre_z": "",
                       "c1_offset_mm": "",
                       **{f"{v}_below_fm_mm": "" for v in VERTEBRAE}}
                if r and r.get("patient"):
                    row["patient_p"] = f"{r['patient']['probability']:.4f}"
                if r:
                    vs = r.get("vertebrae", {})
                    row["found"] = " ".join(v for v in VERTEBRAE
                                            if vs.get(v, {}).get("z_range_mm"))
                    row["flagged"] = " ".join(v for v in VERTEBRAE if vs.get(v, {}).get("flagged"))
                    m = re.search(r"(\d) of 7 cervical vertebrae found", row["reason"])
                    row["n_found"] = m.group(1) if m else (
                        str(len(row["found"].split())) if r["status"] in ("positive", "negative")
                        else "")
                    fm = (levels.get(case) or {}).get("foramen_magnum_z")
                    for v in VERTEBRAE:
                        zr = vs.get(v, {}).get("z_range_mm")
                        if zr and fm not in (None, ""):
                            row[f"{v}_below_fm_mm"] = f"{float(fm) - 0.5 * (zr[0] + zr[1]):.1f}"
                    c1 = vs.get("C1", {}).get("z_range_mm")
                    if c1:
                        centre = 0.5 * (c1[0] + c1[1])
                        row["c1_centre_z"] = f"{centre:.1f}"
                        fm = (levels.get(case) or {}).get("foramen_magnum_z")
                        if fm not in (None, ""):
                            row["c1_offset_mm"] = f"{centre - float(fm):.1f}"
                rows.append(row)
                print(f"{part} {case}: {row['status']} p={row['patient_p']} "
                      f"found [{row['found']}] {row['reason'][:80]}", flush=True)
        with open(a.out / f"results_{part}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
        summary(part, rows, model)

    cols = ["case", "foramen_magnum_z", "cord_top_z", "cord_bottom_z", "cord_length_mm",
            "brainstem_top_z", "brainstem_bottom_z", "scan_top_z", "scan_bottom_z"]
    with open(levels_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for case in sorted(levels, key=lambda c: int(c.split("_")[1])):
            w.writerow([fmt(_num(levels[case].get(c))) if c != "case" else case for c in cols])


def _num(v):
    if v in (None, ""):
        return None
    return float(v)


def summary(part: str, rows: list[dict], model: dict) -> None:
    n = len(rows)
    status = {s: sum(r["status"] == s for r in rows) for s in
              ("positive", "negative", "indeterminate", "failed", "missing")}
    found = [int(r["n_found"]) for r in rows if r["n_found"]]
    per_v = {v: sum(v in r["found"].split() for r in rows) for v in VERTEBRAE}
    offsets = [float(r["c1_offset_mm"]) for r in rows if r["c1_offset_mm"]]
    print(f"\n== {part}: {n} cases, thresholds patient {model['thresholds']['patient']:.4f}")
    print("status: " + ", ".join(f"{k} {v}" for k, v in status.items() if v))
    why = {}
    for r in rows:
        if r["status"] == "indeterminate":
            key = r["reason"].split(":")[0]
            why[key] = why.get(key, 0) + 1
    for k, v in why.items():
        print(f"  indeterminate, {k}: {v}")
    px = [float(r["pixel_mm"]) for r in rows]
    sl = [float(r["slice_mm"]) for r in rows]
    print(f"pixel spacing {min(px):.2f}-{max(px):.2f} mm, slice spacing {min(sl):.2f}-{max(sl):.2f}"
          f" mm; outside the envelope: {sum(bool(r['outside_envelope']) for r in rows)} of {n}")
    if found:
        print(f"vertebrae found per case: median {np.median(found):.0f}, "
              f"min {min(found)}, max {max(found)}")
    print("positive/negative results (the only ones that list vertebrae) finding each: "
          + ", ".join(f"{v} {c}" for v, c in per_v.items()))
    below = {v: [float(r[f"{v}_below_fm_mm"]) for r in rows if r[f"{v}_below_fm_mm"]]
             for v in VERTEBRAE}
    if any(below.values()):
        print("found centre below the foramen magnum (cord top), median mm: " + ", ".join(
            f"{v} {np.median(b):.0f} (n={len(b)})" for v, b in below.items() if b))
    if offsets:
        o = np.array(offsets)
        print(f"C1 centre minus cord top (foramen magnum), mm: n={len(o)}, median {np.median(o):.1f},"
              f" within -30..+10: {int(((o >= -30) & (o <= 10)).sum())}")


if __name__ == "__main__":
    main()
