"""Vertebral reference levels for the real necks of ../shared/realct (OpenKBP), derived
semi-automatically from the image along the spinal cord, and the shipped model's localisation
against them.

Derivation (per case, patient z in mm, LPS, the axis of the result's `z_range_mm`):
1. The cord label (OpenKBP label 1) gives, per axial slice, the cord centre (x, y); slices
   without cord take the nearest labelled slice's centre. Its top is the foramen magnum
   (realct_eval.py, `cord_levels.csv`).
2. Body profile: per slice, the mean HU in a box in front of the cord, 10-24 mm anterior of the
   cord centre and 7 mm either side (where the vertebral bodies and discs are in an adult neck),
   minus its own 45 mm running mean.
3. Discs are minima of that profile: C2/C3 is the deepest minimum 25-55 mm below the foramen
   magnum; each next disc the deepest minimum 11-24 mm below the previous one, down to C7/T1
   or the end of the cord or scan. A disc whose profile dip is shallower than `MIN_DIP_HU` ends
   the chain (not derived further).
4. Reference centres: C1 = foramen magnum - 10 mm (assumed: the atlas sits just below it; C1 has
   no body to see), C2 = midway between foramen magnum - 12 mm and the C2/C3 disc (dens and
   body), C3-C7 = midway between their two discs.
Limits: slices are 2-3.3 mm apart and pixels ~4 mm, so a 4-6 mm disc is one or two slices; the
derivation is checked by its disc spacing (adult 13-21 mm) and reported per case (`ok`).

Localisation of the shipped model (its centres from realct/results_<part>.csv, written by
realct_eval.py; `<V>_below_fm_mm` = foramen magnum - model centre): each found vertebra is
assigned the nearest reference centre; "within one level" if that is the same vertebra or a
neighbour. A case passes when every cervical level whose reference centre lies inside the scan
is found and within one level.

Check where the answer is known (`selfcheck`): the same derivation on phantoms resampled to
3.9 mm pixels and 2.5 mm slices, with a cord put behind the bodies. On 6 family-B phantoms
(seed 77, all fractured) 35 of 36 discs within 2 mm, one study shifted by a whole level
(+18 to +21 mm) and still passing the spacing check; on the 22 family-A phantoms of seed 9000
whose geometry the check handles, 127 discs, 89 % within 8 mm, the misses again whole-level
shifts. So a chain can sit one level off without the spacing check noticing; on real necks
(and with the cord top only near the foramen magnum) that rate is unknown.

Usage:
    python3 models/training/realct_levels.py selfcheck --phantoms DIR
    python3 models/training/realct_levels.py derive [--realct ../shared/realct]   # writes realct/vertebra_levels.csv
    python3 models/training/realct_levels.py evaluate --part validation           # prints the localisation numbers
        [--results DIR]   # another model's realct_eval.py output (default: the shipped model's, realct/)
Choices (box, windows, thresholds) were made on the train and validation parts; never the test part.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VERTEBRAE = ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
DISCS = ["C2/C3", "C3/C4", "C4/C5", "C5/C6", "C6/C7", "C7/T1"]
MIN_DIP_HU = 15.0


def ladder(below, det, bottom) -> list[float]:
    """Disc positions (mm below the foramen magnum): the chain of profile minima with the best
    total depth minus a penalty on changes of spacing (dynamic programming over slices). The
    first disc (C2/C3) lies 25-55 mm below the foramen magnum, each next one 12-22 mm below
    the previous; the chain is as long as its discs stay deeper than MIN_DIP_HU."""
    cand = [i for i in range(len(det)) if not np.isnan(det[i]) and 25 <= below[i] <= bottom - 3]
    if not cand:
        return []
    depth = {i: -det[i] for i in cand}
    best = {}  # (prev, cur) -> (score, chain)
    for i in cand:
        if below[i] <= 55:
            best[(None, i)] = (depth[i], [i])
    chains = [v for v in best.values()]
    for _ in range(len(DISCS) - 1):
        nxt = {}
        for (prev, cur), (sc, ch) in best.items():
            for j in cand:
                sp = below[j] - below[cur]
                if not 12 <= sp <= 22:
                    continue
                pen = 0.0 if prev is None else ((sp - (below[cur] - below[prev])) / 3.0) ** 2 * 10.0
                v = sc + depth[j] - pen
                if (cur, j) not in nxt or nxt[(cur, j)][0] < v:
                    nxt[(cur, j)] = (v, ch + [j])
        if not nxt:
            break
        best = nxt
        chains += list(best.values())
    # Longest chain whose every disc dips by MIN_DIP_HU, best score among those.
    good = [(len(ch), sc, ch) for sc, ch in chains if all(depth[i] >= MIN_DIP_HU for i in ch)]
    if not good:
        return []
    n, _, ch = max(good, key=lambda t: (t[0], t[1]))
    return [float(below[i]) for i in ch]


def derive_case(ct: Path, oar: Path) -> dict:
    import nibabel as nib

    from realct_eval import lps_volume

    arr, lps, (sx, sy, sz) = lps_volume(nib.load(str(ct)), None)
    lab, _, _ = lps_volume(nib.load(str(oar)), None)
    arr = np.asarray(arr, np.float32)
    lab = np.asarray(lab)
    z = np.array([lps(0, 0, k)[2] for k in range(arr.shape[2])])
    return derive_arrays(arr, lab == 1, z, sx, sy, sz)


def cord_centres(cord: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per slice k of cord[i, j, k] (a mask with at least one labelled slice), the cord
    label's centre (i, j); slices without cord are interpolated between, or take, the
    nearest labelled ones."""
    nz = cord.shape[2]
    ks = np.nonzero(cord.any(axis=(0, 1)))[0]
    cx, cy = np.full(nz, np.nan), np.full(nz, np.nan)
    for k in ks:
        ii, jj = np.nonzero(cord[:, :, k])
        cx[k], cy[k] = ii.mean(), jj.mean()
    idx = np.arange(nz)
    return np.interp(idx, ks, cx[ks]), np.interp(idx, ks, cy[ks])


def derive_arrays(arr, cord, z, sx, sy, sz) -> dict:
    """arr[i, j, k]: HU with i along patient left, j posterior, k at height z[k] (mm);
    cord: the spinal-cord mask on the same grid."""
    nz = arr.shape[2]
    ks = np.nonzero(cord.any(axis=(0, 1)))[0]
    out = {"ok": 0, "why": ""}
    if not len(ks):
        out["why"] = "no cord label"
        return out
    cx, cy = cord_centres(cord)
    prof = np.full(nz, np.nan)
    for k in range(nz):
        i0, i1 = int(round(cx[k] - 7 / sx)), int(round(cx[k] + 7 / sx)) + 1
        j0, j1 = int(round(cy[k] - 24 / sy)), int(round(cy[k] - 10 / sy)) + 1  # anterior: smaller y
        box = arr[max(i0, 0):max(i1, 0), max(j0, 0):max(j1, 0), k]
        if box.size and (box > -900).mean() > 0.8:
            prof[k] = box.mean()
    fm = float(z[ks].max())
    order = np.argsort(-z)  # superior first
    zz, pp = z[order], prof[order]
    good = ~np.isnan(pp)
    if good.sum() < 10:
        out["why"] = "no profile"
        return out
    win = max(1, int(round(45 / sz)))
    pad = np.interp(np.arange(len(pp)), np.nonzero(good)[0], pp[good])
    trend = np.convolve(np.pad(pad, win // 2, mode="edge"), np.ones(win) / win, mode="valid")[: len(pp)]
    det = pad - trend
    det[~good] = np.nan
    below = fm - zz  # mm below the foramen magnum, increasing
    discs = ladder(below, det, fm - z.min())
    out["foramen_magnum_z"] = fm
    out["scan_bottom_below_fm"] = float(fm - z.min())
    for n, d in zip(DISCS, discs):
        out[f"{n}_below_fm"] = d
    ref = {"C1": 10.0}
    if discs:
        ref["C2"] = 0.5 * (12.0 + discs[0])
    for j in range(1, len(discs)):
        ref[VERTEBRAE[j + 1]] = 0.5 * (discs[j - 1] + discs[j])
    for n, r in ref.items():
        out[f"{n}_ref_below_fm"] = r
    sp = np.diff(discs)
    out["discs"] = len(discs)
    out["mean_spacing_mm"] = float(sp.mean()) if len(sp) else None
    out["ok"] = int(len(discs) >= 2 and all(13 <= s <= 21 for s in sp))
    if not out["ok"]:
        out["why"] = "fewer than 2 discs" if len(discs) < 2 else "disc spacing outside 13-21 mm"
    return out


def derive(realct: Path, out: Path) -> None:
    import sys

    sys.path.insert(0, str(HERE))
    from realct_eval import cases

    cols = ["case", "part", "ok", "why", "foramen_magnum_z", "scan_bottom_below_fm", "discs", "mean_spacing_mm",
            *[f"{d}_below_fm" for d in DISCS], *[f"{v}_ref_below_fm" for v in VERTEBRAE]]
    rows = []
    for case, part, ct, oar in cases(realct):
        if oar is None:
            continue
        r = {"case": case, "part": part, **derive_case(ct, oar)}
        rows.append(r)
        print(case, part, r["ok"], r.get("discs"), r["why"], flush=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else (f"{r[c]:.1f}" if isinstance(r.get(c), float) else r[c])
                        for c in cols])


def evaluate(levels: Path, results: Path, only_ok: bool, verdict_only: bool = False) -> dict:
    lv = {r["case"]: r for r in csv.DictReader(open(levels))}
    res = list(csv.DictReader(open(results)))
    n_cases = n_pass = n_levels = n_found = n_within = n_right = n_skipped = 0
    for r in res:
        L = lv.get(r["case"])
        if (L is None or not L["scan_bottom_below_fm"] or (only_ok and L["ok"] != "1")
                or (verdict_only and r["status"] not in ("positive", "negative"))):
            n_skipped += 1
            continue
        ref = {v: float(L[f"{v}_ref_below_fm"]) for v in VERTEBRAE if L[f"{v}_ref_below_fm"]}
        bottom = float(L["scan_bottom_below_fm"])
        inview = [v for v in ref if ref[v] <= bottom]
        model = {v: float(r[f"{v}_below_fm_mm"]) for v in VERTEBRAE if r.get(f"{v}_below_fm_mm")}
        n_cases += 1
        ok = True
        for v in inview:
            n_levels += 1
            if v not in model:
                ok = False
                continue
            n_found += 1
            near = min(ref, key=lambda m: abs(ref[m] - model[v]))
            d = abs(VERTEBRAE.index(near) - VERTEBRAE.index(v))
            n_right += d == 0
            n_within += d <= 1
            ok &= d <= 1
        n_pass += ok
    return {"cases": n_cases, "cases_skipped": n_skipped, "cases_all_within_one_level": n_pass,
            "levels_in_view": n_levels, "found": n_found, "right_level": n_right, "within_one_level": n_within}


def selfcheck(root: Path, pixel_mm: float, slice_mm: float) -> None:
    """The derivation on phantoms with known vertebrae (RSNA layout with ground_truth/, family
    A or B), resampled to OpenKBP-like voxels (block means in-plane, nearest slice in z). The
    cord is put 17 mm behind each vertebral body centre, its top 5 mm above the top of C1's
    label. Prints, per study, the derived discs against the true ones (midway between
    neighbouring centres): a check of the method where the answer is known, on anatomy that
    is not real."""
    import json

    import pydicom

    errs, n_ok, n = [], 0, 0
    for gtf in sorted((root / "ground_truth").glob("*.json")):
        gt = json.loads(gtf.read_text())
        d = root / "train_images" / gt["study_instance_uid"]
        dss = sorted((pydicom.dcmread(f) for f in d.glob("*.dcm")), key=lambda x: float(x.ImagePositionPatient[2]))
        vol = np.stack([x.pixel_array * float(x.RescaleSlope) + float(x.RescaleIntercept) for x in dss])
        ps = float(dss[0].PixelSpacing[0])
        zs = np.array([float(x.ImagePositionPatient[2]) for x in dss])
        f = max(1, int(round(pixel_mm / ps)))
        ny, nx = (vol.shape[1] // f) * f, (vol.shape[2] // f) * f
        vol = vol[:, :ny, :nx].reshape(len(zs), ny // f, f, nx // f, f).mean(axis=(2, 4))
        zc = np.arange(zs[0], zs[-1], slice_mm)
        vol = vol[np.abs(zs[None, :] - zc[:, None]).argmin(1)]
        x0, y0 = map(float, dss[0].ImagePositionPatient[:2])
        cen = {v["name"]: np.array(v["centre_mm"]) for v in gt["vertebrae"]}
        names = [v for v in ["C1", *VERTEBRAE[1:], "T1", "T2"] if v in cen]
        cz = np.array([cen[v][2] for v in names])
        top = cen["C1"][2] + 12.0
        arr = vol.transpose(2, 1, 0)  # [x, y, z]
        cord = np.zeros(arr.shape, bool)
        for k, zk in enumerate(zc):
            if zk > top:
                continue
            cx = np.interp(zk, cz[::-1], [cen[v][0] for v in names][::-1])
            cy = np.interp(zk, cz[::-1], [cen[v][1] for v in names][::-1]) + 17.0
            i, j = int((cx - x0) / (ps * f)), int((cy - y0) / (ps * f))
            if 0 <= i < arr.shape[0] and 0 <= j < arr.shape[1]:
                cord[i, j, k] = True
        out = derive_arrays(arr, cord, zc, ps * f, ps * f, slice_mm)
        fm = out.get("foramen_magnum_z")
        if fm is None:
            print(gtf.stem[:20], out["why"])
            continue
        true = [fm - 0.5 * (cen[a][2] + cen[b][2]) for a, b in zip(names[1:], names[2:])][: len(DISCS)]
        got = [out.get(f"{dn}_below_fm") for dn in DISCS]
        e = [g - t for g, t in zip(got, true) if g is not None]
        n += 1
        n_ok += out["ok"]
        errs += e
        print(gtf.stem[:20], "ok" if out["ok"] else out["why"], "derived - true disc (mm):", np.round(e, 1).tolist())
    e = np.abs(np.array(errs))
    print(f"{n} studies, {n_ok} pass the spacing check; {len(e)} discs derived, |error| median "
          f"{np.median(e):.1f} mm, within 8 mm (half a level) {(e <= 8).mean():.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["derive", "evaluate", "selfcheck"])
    ap.add_argument("--phantoms", type=Path, help="selfcheck: an RSNA-layout phantom set with ground_truth/")
    ap.add_argument("--pixel-mm", type=float, default=3.9)
    ap.add_argument("--slice-mm", type=float, default=2.5)
    ap.add_argument("--realct", type=Path, default=ROOT.parent / "shared" / "realct")
    ap.add_argument("--levels", type=Path, default=HERE / "realct" / "vertebra_levels.csv")
    ap.add_argument("--part", default="validation", choices=["train", "validation", "test"])
    ap.add_argument("--all-cases", action="store_true", help="evaluate also cases whose derivation is not ok")
    ap.add_argument("--results", type=Path, default=HERE / "realct",
                    help="evaluate: the folder of realct_eval.py's results_<part>.csv (another model's run)")
    # Without --all-cases: only cases whose derivation passed its spacing check (`ok`).
    a = ap.parse_args()
    if a.cmd == "derive":
        derive(a.realct, a.levels)
    elif a.cmd == "selfcheck":
        selfcheck(a.phantoms, a.pixel_mm, a.slice_mm)
    else:
        res = a.results / f"results_{a.part}.csv"
        for verdict in (False, True):
            s = evaluate(a.levels, res, not a.all_cases, verdict)
            print(f"{a.part}, {'derivation ok' if not a.all_cases else 'all derived'} cases, "
                  f"{'positive/negative results only' if verdict else 'every result'}: {s}")


if __name__ == "__main__":
    main()
