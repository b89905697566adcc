"""One loader for the RSNA 2022 Kaggle layout, used for real data and for our phantoms:

    ROOT/train.csv                      StudyInstanceUID,patient_overall,C1,...,C7
    ROOT/train_images/<study>/<n>.dcm   one CT series per study
    ROOT/segmentations/<study>.nii      optional, RSNA orientation (see `load_rsna_mask`)
    ROOT/train_bounding_boxes.csv       optional, RSNA fracture boxes (x,y,width,height,slice_number)
    ROOT/ground_truth/<study>.json      optional, our phantoms' exact fracture locations

Every study is preprocessed once through `preprocess.py` (the contract) and cached as
uint8 (`window` * 255) plus, on the stride-4 output grid, the vertebra labels and a fracture
target (cells near a known fracture: from the phantom ground truth or the RSNA boxes), so
epochs only read small .npz files.
"""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import preprocess as pp

LABELS = ["patient_overall", "C1", "C2", "C3", "C4", "C5", "C6", "C7"]
CACHE_VERSION = 3  # bump when the cached arrays change
FRACTURE_RADIUS_MM = 10.0  # cells within this distance of a fracture point are targets
CRACK_RADIUS_MM = 15.0  # along a crack plane: how far from its located point it is a target
CRACK_SLAB_MM = 3.0  # cells whose centre is within gap/2 + this of the crack plane


def read_train_csv(root: Path) -> list[tuple[str, np.ndarray]]:
    rows = []
    with open(root / "train.csv", newline="") as f:
        for r in csv.DictReader(f):
            rows.append((r["StudyInstanceUID"], np.array([float(r[k]) for k in LABELS], np.float32)))
    return rows


def load_rsna_mask(path: Path) -> np.ndarray:
    """RSNA convention: m[k, row, col] with k = InstanceNumber - 1."""
    import nibabel as nib

    return np.asarray(nib.load(str(path)).get_fdata()[:, ::-1, ::-1].transpose(2, 1, 0)).astype(np.uint8)


@dataclass
class FractureSite:
    """Where a fracture is, in patient mm: cells within `radius` of `point` (and, for a crack
    with a known plane, within `half_width` of that plane) are fracture targets."""

    point: np.ndarray
    radius: float
    label: int = 0  # vertebra 1..7, 0 when unknown
    normal: np.ndarray | None = None  # crack plane normal, None for a blob (wedge, RSNA box)
    half_width: float = 0.0


FRACTURE_TARGETS = ("crack", "ball")


def fracture_sites(root: Path, uid: str, vol: "pp.Volume", target: str = "crack") -> list[FractureSite] | None:
    """Known fractures of a study, or None when the study has no localisation (then only its
    labels are used).

    Phantoms: `ground_truth/<uid>.json` gives each fracture's location on its crack plane,
    the plane's normal and the gap: the target is the crack itself (what the image shows),
    not a ball around it, which would teach "vertebral body" rather than "crack". A wedge
    compression has no gap: a ball. RSNA: `train_bounding_boxes.csv` gives boxes in pixels on
    slice `slice_number` (the InstanceNumber); the box centre becomes the point and half its
    diagonal the radius. `target="ball"` makes every phantom fracture a ball (the first
    design, used for the first training runs of the committed model)."""
    gt = root / "ground_truth" / f"{uid}.json"
    if gt.exists():
        sites = []
        for f in json.loads(gt.read_text())["fractures"]:
            point, label = np.array(f["location_mm"], np.float64), int(f["vertebra"][1:])
            if target == "crack" and f.get("gap_mm", 0.0) > 0.0:
                sites.append(FractureSite(point, CRACK_RADIUS_MM, label, np.array(f["normal"], np.float64),
                                          0.5 * f["gap_mm"] + CRACK_SLAB_MM))
            else:
                sites.append(FractureSite(point, FRACTURE_RADIUS_MM, label))
        return sites
    boxes = root / "train_bounding_boxes.csv"
    if not boxes.exists():
        return None
    rows = [r for r in csv.DictReader(open(boxes, newline="")) if r["StudyInstanceUID"] == uid]
    if not rows:
        return None
    dr, dc = vol.spacing
    pts = []
    for r in rows:
        k = np.flatnonzero(vol.instance_numbers == int(float(r["slice_number"])))
        if not k.size:
            continue
        x, y, w, h = (float(r[c]) for c in ("x", "y", "width", "height"))
        p = vol.positions[k[0]] + vol.row_cos * (x + w / 2) * dc + vol.col_cos * (y + h / 2) * dr
        pts.append(FractureSite(p, max(0.5 * np.hypot(w * dc, h * dr), FRACTURE_RADIUS_MM)))
    return pts


def fracture_target(vol: "pp.Volume", grid: "pp.Grid", seg: np.ndarray | None,
                    sites: list[FractureSite]) -> np.ndarray:
    """[S, 32, 32] uint8: 1 where a cell centre lies on a fracture site (and, when the
    vertebra is known and a segmentation exists, inside that vertebra)."""
    cells = np.arange(pp.H // pp.SEG_STRIDE) * pp.SEG_STRIDE + (pp.SEG_STRIDE - 1) / 2
    xyz = pp.grid_points(grid, cells, cells)  # [S,32,32,3]
    out = np.zeros(xyz.shape[:3], bool)
    for site in sites:
        near = np.linalg.norm(xyz - site.point, axis=-1) <= site.radius
        if site.normal is not None:
            near &= np.abs((xyz - site.point) @ site.normal) <= site.half_width
        if site.label and seg is not None and seg.ndim == 3:
            near &= seg == site.label
        out |= near
    return out.astype(np.uint8)


@dataclass
class Study:
    uid: str
    v: np.ndarray  # [S, 128, 128] uint8, windowed * 255
    seg: np.ndarray | None  # [S, 32, 32] uint8 labels, or None without a segmentation
    labels: np.ndarray  # [8] patient_overall, C1..C7
    frac: np.ndarray | None = None  # [S, 32, 32] uint8 fracture target, None without localisation

    def slices(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Model input [hi-lo, 3, 128, 128] float32 for model slices lo..hi; the 2.5D
        neighbours come from the whole study (clamped at its ends), as in the contract."""
        s = self.v.shape[0]
        hi = s if hi is None else hi
        idx = np.arange(lo, hi)
        x = np.stack([self.v[np.clip(idx - 1, 0, s - 1)], self.v[idx], self.v[np.clip(idx + 1, 0, s - 1)]], 1)
        return x.astype(np.float32) / 255.0


def _cache_one(args) -> str:
    root, uid, labels, cache, target = args
    out = cache / f"{uid}.npz"
    if out.exists():
        return uid
    vol = pp.load_dicom_series(root / "train_images" / uid)
    grid = pp.target_grid(vol)
    hu = pp.resample_hu(vol, grid)
    v = np.rint(pp.window(hu) * 255).astype(np.uint8)
    seg = np.zeros((0,), np.uint8)
    nii = root / "segmentations" / f"{uid}.nii"
    if not nii.exists():
        nii = root / "segmentations" / f"{uid}.nii.gz"
    if nii.exists():
        m = load_rsna_mask(nii)
        m = m[vol.instance_numbers - 1]  # into the volume's sorted slice order
        seg = pp.resample_labels(vol, m, grid)
    sites = fracture_sites(root, uid, vol, target)
    frac = np.zeros((0,), np.uint8) if sites is None else fracture_target(vol, grid, seg, sites)
    tmp = cache / f".{uid}.tmp.npz"
    np.savez_compressed(tmp, v=v, seg=seg, labels=labels, frac=frac, version=CACHE_VERSION, target=target)
    os.replace(tmp, out)
    return uid


def load_dataset(
    root: str | Path, cache: str | Path, workers: int = 2, limit: int | None = None, cached_only: bool = False,
    fracture_target: str = "crack",
) -> list[Study]:
    """All studies of `root` (cached first), or with `cached_only` just those already cached.
    `fracture_target`: see `fracture_sites`; a cache holds one kind."""
    root, cache = Path(root), Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = read_train_csv(root)[:limit]
    if cached_only:
        rows = [r for r in rows if (cache / f"{r[0]}.npz").exists()]
    jobs = [(root, uid, lab, cache, fracture_target) for uid, lab in rows]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_cache_one, jobs))
    else:
        for j in jobs:
            _cache_one(j)
    studies = []
    for uid, _ in rows:
        z = np.load(cache / f"{uid}.npz")
        version = int(z["version"]) if "version" in z.files else 1
        cached_target = str(z["target"]) if "target" in z.files else "crack"
        if version != CACHE_VERSION or cached_target != fracture_target:
            raise SystemExit(f"{cache} was written by another data.py or for other fracture targets "
                             f"({cached_target}): delete it or use another --cache")
        seg = z["seg"] if z["seg"].ndim == 3 else None
        frac = z["frac"] if z["frac"].ndim == 3 else None
        studies.append(Study(uid, z["v"], seg, z["labels"], frac))
    return studies
