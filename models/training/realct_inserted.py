"""Real necks with vertebra labels and inserted fractures, for training (`train.py --data`).

The `train` part of shared/realct's fixed split (realct_split.csv; `--part validation` writes
the validation necks the same way, as a judge that is never trained on; `test` is never
written), the cases whose reference levels were derived (`ok` in
realct/vertebra_levels.csv, realct_levels.py). For each such neck it writes two studies in the
RSNA layout that data.py reads:
- the neck as it is, every label 0, with a vertebra segmentation;
- the same neck with one synthetic fracture inserted into the real bone of one of its labelled
  vertebrae, labelled positive at that vertebra, with the fracture's plane in `ground_truth/`.
A pair differs only by the fracture, so a model can no longer tell the positive from the
negative by how real the image looks: the shortcut the first randomised run learned.

Vertebra labels (approximate, from the derived levels, not drawn by anyone):
- z: C1 from 1 to 15 mm below the foramen magnum, C2 from there to the C2/C3 disc, C3-C7
  between their discs; below the last derived disc the study is cut (so no cervical bone is
  labelled background), except after C7/T1, where thoracic bone is background as in RSNA's
  cervical classes.
- in-plane: bone (> BONE_HU) in a box around the spinal-cord label, 30 mm anterior to 32 mm
  posterior and 30 mm (C1: 40 mm) to each side, outside the mandible label; in C1's z range,
  bone 4-16 mm anterior of the cord and within 8 mm of the midline is the dens (C2).

Inserted fracture (the same kinds as the generator's, in real bone at ~4 mm x 4 mm x 2.5 mm):
a lucent gap of GAP mm around a plane through the vertebra (vertical or axial, tilted up to
30 degrees), filled with the neighbourhood's own soft tissue HU and noise, with partial volume
from 27 sub-samples per voxel, limited to the vertebra's label within 14 mm of the plane's
point; in half of them one side is displaced 1-4 mm along the plane. C1: a lateral mass or the
anterior arch; C2: the dens base (near-axial plane) or the body; C3-C7: the body. The gap is at
least 0.75 of the voxel's extent across the plane, so that it shows at this resolution.

    python3 realct_inserted.py OUT [--realct ../../../shared/realct] [--limit N] [--seed S]
        [--part validation]    # the judge's pairs: real validation necks, never trained on
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from data import LABELS
from realct_eval import ROOT, cases, lps_volume, uid_for, write_series
from realct_levels import DISCS, VERTEBRAE, cord_centres

HERE = Path(__file__).resolve().parent
BONE_HU = 180.0
C1_TOP_MM, C1_BOTTOM_MM = 1.0, 15.0  # below the foramen magnum
CRACK_RADIUS_MM = 14.0


def level_bounds(row: dict) -> dict[str, tuple[float, float]]:
    """Vertebra -> (top, bottom) in mm below the foramen magnum, for the derived levels."""
    discs = [float(row[f"{d}_below_fm"]) for d in DISCS if row[f"{d}_below_fm"]]
    edges = [C1_TOP_MM, C1_BOTTOM_MM, *discs]
    return {VERTEBRAE[i]: (edges[i], edges[i + 1]) for i in range(min(len(edges) - 1, 7))}


def vertebra_labels(arr, lab, below, ci, cj, spacing, bounds) -> np.ndarray:
    """uint8 [i, j, k] labels 1..7 (see the module doc)."""
    sx, sy, _ = spacing
    nx, ny, nz = arr.shape
    mandible = lab == 3
    mandible[1:] |= mandible[:-1]
    mandible[:-1] |= mandible[1:]
    mandible[:, 1:] |= mandible[:, :-1]
    mandible[:, :-1] |= mandible[:, 1:]
    di = (np.arange(nx)[:, None] - ci[None, :]) * sx  # [i, k] mm, + = left
    dj = (np.arange(ny)[:, None] - cj[None, :]) * sy  # [j, k] mm, + = posterior
    seg = np.zeros(arr.shape, np.uint8)
    for v, (top, bottom) in bounds.items():
        n = VERTEBRAE.index(v) + 1
        ks = np.nonzero((below >= top) & (below < bottom))[0]
        for k in ks:
            half = 40.0 if v == "C1" else 30.0
            box = (np.abs(di[:, k])[:, None] <= half) & ((dj[:, k] >= -30) & (dj[:, k] <= 32))[None, :]
            bone = box & (arr[:, :, k] > BONE_HU) & ~mandible[:, :, k] & (lab[:, :, k] != 1)
            seg[:, :, k][bone] = n
            if v == "C1":
                dens = bone & (np.abs(di[:, k])[:, None] <= 8) & ((dj[:, k] >= -16) & (dj[:, k] <= -4))[None, :]
                seg[:, :, k][dens] = 2
    return seg


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def tilted(rng, axis) -> np.ndarray:
    """`axis` tilted by up to 30 degrees in a random direction."""
    a = unit(axis)
    p = unit(np.cross(a, unit(rng.normal(size=3))))
    t = np.radians(rng.uniform(0, 30))
    return unit(np.cos(t) * a + np.sin(t) * p)


def fracture_plan(rng, v: str, bounds, below_to_k, ci, cj, spacing) -> dict:
    """Centre (voxel indices, float), plane normal (mm, LPS), gap, displacement (mm)."""
    sx, sy, sz = spacing
    top, bottom = bounds[v]
    if v == "C1":
        kind = rng.choice(["lateral_mass", "anterior_arch"])
        dz = 0.5 * (top + bottom)
        dx, dy = (rng.choice([-1, 1]) * 14.0, -4.0) if kind == "lateral_mass" else (0.0, -21.0)
        normal = tilted(rng, [1, 0, 0] if kind == "lateral_mass" else [rng.choice([-1, 1]), 1, 0])
    elif v == "C2" and rng.random() < 0.5:
        kind, dz, dx, dy = "dens_base", C1_BOTTOM_MM + 2.0, 0.0, -11.0
        normal = tilted(rng, [0, 0, 1])
    else:
        kind = "body"
        dz = 0.5 * (top + bottom) + rng.uniform(-2, 2)
        dx, dy = rng.uniform(-3, 3), -17.0
        normal = tilted(rng, [[0, 0, 1], [0, 1, 0], [1, 0, 0]][rng.integers(3)])
    k = float(below_to_k(dz))
    kk = int(round(k))
    centre = np.array([ci[kk] + dx / sx, cj[kk] + dy / sy, k])
    extent = abs(normal[0]) * sx + abs(normal[1]) * sy + abs(normal[2]) * sz
    gap = max(rng.uniform(2.5, 5.0), 0.75 * extent)
    shift = np.zeros(3)
    if rng.random() < 0.5:
        shift = unit(np.cross(normal, unit(rng.normal(size=3)))) * rng.uniform(1.0, 4.0)
    return {"kind": str(kind), "centre": centre, "normal": normal, "gap": gap, "shift": shift}


def trilinear(arr: np.ndarray, p: np.ndarray) -> np.ndarray:
    """arr sampled at fractional indices p [N, 3] (clamped to the volume)."""
    hi = np.array(arr.shape) - 1
    p = np.clip(p, 0, hi)
    p0 = np.minimum(np.floor(p).astype(int), hi - 1)
    f = p - p0
    out = np.zeros(len(p))
    for c in range(8):
        o = np.array([(c >> 2) & 1, (c >> 1) & 1, c & 1])
        w = np.prod(np.where(o, f, 1 - f), axis=1)
        q = p0 + o
        out += w * arr[q[:, 0], q[:, 1], q[:, 2]]
    return out


def insert(arr, seg, n: int, plan: dict, spacing, rng) -> np.ndarray:
    """A copy of arr with the fracture of `plan` in vertebra label n."""
    sp = np.array(spacing)
    c, nrm, gap, shift = plan["centre"], plan["normal"], plan["gap"], plan["shift"]
    r = np.ceil(CRACK_RADIUS_MM / sp).astype(int) + 1
    lo = np.maximum(np.floor(c).astype(int) - r, 0)
    hi = np.minimum(np.floor(c).astype(int) + r + 1, np.array(arr.shape))
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    inside = (seg[box] == n).reshape(-1)
    mm = (idx - c) * sp
    near = np.linalg.norm(mm, axis=1) <= CRACK_RADIUS_MM
    sel = inside & near
    out = arr.copy()
    if not sel.any():
        raise ValueError("no labelled bone at the fracture point")
    local = arr[box].reshape(-1)
    soft = local[(local > -100) & (local < 100)]
    fill_mean = float(np.median(soft)) if soft.size > 20 else 40.0
    fill_sd = float(np.std(soft)) if soft.size > 20 else 15.0
    pts = idx[sel].astype(np.float64)
    d = (pts - c) * sp @ nrm
    # Displacement: the positive side's bone comes from `shift` mm away.
    vals = arr[tuple(idx[sel].T)].astype(np.float64)
    if np.any(shift):
        pos = d > 0
        vals[pos] = trilinear(arr, pts[pos] - shift / sp)
    # Partial volume: the share of each voxel's 27 sub-samples inside the gap.
    sub = (np.stack(np.meshgrid(*[[-1 / 3, 0, 1 / 3]] * 3, indexing="ij"), -1).reshape(-1, 3) * sp)
    ds = d[:, None] + sub @ nrm
    frac = (np.abs(ds) <= gap / 2).mean(axis=1)
    fill = fill_mean + fill_sd * rng.standard_normal(len(vals))
    vals = (1 - frac) * vals + frac * fill
    out[tuple(idx[sel].T)] = vals
    return out


def rsna_mask(seg: np.ndarray) -> np.ndarray:
    """The inverse of data.load_rsna_mask for a series written by write_series (k = slice)."""
    return np.ascontiguousarray(seg[:, ::-1, ::-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--realct", type=Path, default=ROOT.parent / "shared" / "realct")
    ap.add_argument("--levels", type=Path, default=HERE / "realct" / "vertebra_levels.csv")
    ap.add_argument("--limit", type=int, default=0, help="only the first N necks (CI's smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--part", choices=["train", "validation"], default="train",
                    help="validation: the judge's pairs (train_randomised.sh), never trained on")
    a = ap.parse_args()
    levels = {r["case"]: r for r in csv.DictReader(open(a.levels, newline=""))}
    todo = [(case, ct, oar) for case, part, ct, oar in cases(a.realct)
            if part == a.part and oar is not None and levels.get(case, {}).get("ok") == "1"]
    if a.limit:
        todo = todo[: a.limit]
    rows, gt_dir, seg_dir = [], a.out / "ground_truth", a.out / "segmentations"
    gt_dir.mkdir(parents=True, exist_ok=True)
    seg_dir.mkdir(parents=True, exist_ok=True)
    for case, ct, oar in todo:
        rng = np.random.default_rng([a.seed, int(case.split("_")[1])])
        row = levels[case]
        arr, lps, spacing = lps_volume(nib.load(str(ct)), None)
        arr = np.asarray(arr, np.float32)
        lab = np.asarray(lps_volume(nib.load(str(oar)), None)[0])
        z = np.array([lps(0, 0, k)[2] for k in range(arr.shape[2])])
        below = float(row["foramen_magnum_z"]) - z
        bounds = level_bounds(row)
        ci, cj = cord_centres(lab == 1)
        seg = vertebra_labels(arr, lab, below, ci, cj, spacing, bounds)
        last = max(b for _, b in bounds.values())
        keep = np.nonzero(below < last)[0] if len(bounds) < 7 else np.arange(arr.shape[2])
        keep = range(int(keep.min()), int(keep.max()) + 1)
        order = np.argsort(below)
        below_to_k = lambda mm: np.interp(mm, below[order], np.arange(len(below))[order])  # noqa: E731
        present = [v for v in bounds if (seg == VERTEBRAE.index(v) + 1).sum() >= 20]
        v = present[rng.integers(len(present))]
        plan = fracture_plan(rng, v, bounds, below_to_k, ci, cj, spacing)
        broken = insert(arr, seg, VERTEBRAE.index(v) + 1, plan, spacing, rng)
        for tag, image, fractured in ((f"{case}/labelled", arr, False), (f"{case}/inserted", broken, True)):
            study = uid_for(tag + "/study")
            d = a.out / "train_images" / study
            if not (d / "0001.dcm").exists():
                write_series(ct, d, tag, arr=image, keep=keep)
            kept = seg[:, :, keep.start:keep.stop]
            nib.save(nib.Nifti1Image(rsna_mask(kept), np.eye(4)), str(seg_dir / f"{study}.nii.gz"))
            labels = [0] * len(LABELS)
            fractures = []
            if fractured:
                labels[0] = labels[VERTEBRAE.index(v) + 1] = 1
                fractures.append({"vertebra": v, "kind": plan["kind"],
                                  "location_mm": [float(x) for x in lps(*plan["centre"])],
                                  "normal": [float(x) for x in plan["normal"]],
                                  "gap_mm": float(plan["gap"]),
                                  "displacement_mm": [float(x) for x in plan["shift"]]})
            (gt_dir / f"{study}.json").write_text(json.dumps(
                {"study_instance_uid": study, "source": f"realct {case}", "fractures": fractures}, indent=1))
            rows.append([study] + labels)
        print(f"{case}: levels {','.join(bounds)}, slices {keep.start}-{keep.stop - 1}, "
              f"{v} {plan['kind']} gap {plan['gap']:.1f} mm", flush=True)
    with open(a.out / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["StudyInstanceUID", *LABELS])
        w.writerows(rows)
    print(f"{len(todo)} real necks ({a.part}), each labelled and with an inserted fracture, in {a.out}")


if __name__ == "__main__":
    main()
