"""One loader for the RSNA 2022 Kaggle layout, used for real data and for our phantoms:

    ROOT/train.csv                      StudyInstanceUID,patient_overall,C1,...,C7
    ROOT/train_images/<study>/<n>.dcm   one CT series per study
    ROOT/segmentations/<study>.nii      optional, RSNA orientation (see `load_rsna_mask`)

Every study is preprocessed once through `preprocess.py` (the contract) and cached as
uint8 (`window` * 255) plus the vertebra labels on the stride-4 output grid, so epochs only
read small .npz files.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import preprocess as pp

LABELS = ["patient_overall", "C1", "C2", "C3", "C4", "C5", "C6", "C7"]


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
class Study:
    uid: str
    v: np.ndarray  # [S, 128, 128] uint8, windowed * 255
    seg: np.ndarray | None  # [S, 32, 32] uint8 labels, or None without a segmentation
    labels: np.ndarray  # [8] patient_overall, C1..C7

    def slices(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Model input [hi-lo, 3, 128, 128] float32 for model slices lo..hi; the 2.5D
        neighbours come from the whole study (clamped at its ends), as in the contract."""
        s = self.v.shape[0]
        hi = s if hi is None else hi
        idx = np.arange(lo, hi)
        x = np.stack([self.v[np.clip(idx - 1, 0, s - 1)], self.v[idx], self.v[np.clip(idx + 1, 0, s - 1)]], 1)
        return x.astype(np.float32) / 255.0


def _cache_one(args) -> str:
    root, uid, labels, cache = args
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
    tmp = cache / f".{uid}.tmp.npz"
    np.savez_compressed(tmp, v=v, seg=seg, labels=labels)
    os.replace(tmp, out)
    return uid


def load_dataset(root: str | Path, cache: str | Path, workers: int = 2, limit: int | None = None) -> list[Study]:
    root, cache = Path(root), Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = read_train_csv(root)[:limit]
    jobs = [(root, uid, lab, cache) for uid, lab in rows]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_cache_one, jobs))
    else:
        for j in jobs:
            _cache_one(j)
    studies = []
    for uid, _ in rows:
        z = np.load(cache / f"{uid}.npz")
        seg = z["seg"] if z["seg"].ndim == 3 else None
        studies.append(Study(uid, z["v"], seg, z["labels"]))
    return studies
