"""Writes `models/model.json`, the contract between this recipe and the daemon
(see docs/model-contract.md). Preprocessing constants live here once and are imported by
`preprocess.py`, so the two cannot drift apart."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "cspine-triage/model-contract/v1"
NAME = "cspine-triage-synthetic"
VERSION = "0.7.0"

INPUT = {
    "name": "slices",
    "dtype": "float32",
    "layout": "SCHW",
    "channels": 3,
    "height": 128,
    "width": 128,
    "spacing_mm": {"slice": 2.0, "row": 1.25, "column": 1.25},
    "window": {"center": 400.0, "width": 1800.0},
    "pad_hu": -1024.0,
    "min_slices": 8,
    "max_slices": 256,
}

OUTPUTS = {
    "segmentation": {
        "name": "seg_logits",
        "shape": ["S", 8, 32, 32],
        "stride": 4,
        "classes": ["background", "C1", "C2", "C3", "C4", "C5", "C6", "C7"],
    },
    "vertebra_logits": {"name": "vertebra_logits", "shape": [7]},
    "patient_logit": {"name": "patient_logit", "shape": [1]},
    "attention": {"name": "attention", "shape": [7, "S"]},
}

# max_lateral_tilt_deg: the sideways tilt the model was trained on (`train.py --pose-deg` Y of
# the `pose` run, 0.7.0); beyond it the daemon answers `indeterminate` (docs/model-contract.md).
# Not tuned: robustness.py's estimate of it reads 0.0 +- 0.5 degrees on straight phantoms and
# 13.4 on ones tilted 15 (MODEL_CARD "Robustness to patient pose").
COVERAGE = {"min_vertebrae": 5, "min_pixels": 4, "max_lateral_tilt_deg": 12.0}
VERTEBRAE = ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]

# The acquisitions `cspine-triage synth` generates (src/synth/study.rs) and the model was trained
# and tested on; outside them the daemon answers `indeterminate` (docs/model-contract.md
# "Acquisition envelope"). Pixel spacing: FOV 140-250 mm over a 256-512 matrix (training used
# --matrix 256, 0.55-0.98 mm; test seeds 3003/3004 the full range). Slices: thickness 0.6-3 mm,
# spacing equal or overlapping down to 0.5 mm. Kernels: BONE, BONEPLUS, B70f, Br64, FC30, YC
# (the recognised ones are all bone kernels). Coverage: every phantom holds C1-C7 with margins;
# min_coverage_mm: 400 phantoms (`synth --count 400 --seed 778 --matrix 64`) cover 140-224 mm
# (median 180; C1 top to C7 bottom 107-155 mm). That z bound (min_coverage_mm 130) is gone
# since the daemon analyses partial coverage (docs/model-contract.md "Partial coverage"):
# min_covered_vertebrae is a policy floor (2 contiguous levels in view), not a measured one.
ENVELOPE = {
    "pixel_spacing_mm": {"min": 0.27, "max": 0.98},
    "slice_spacing_mm": {"min": 0.5, "max": 3.0},
    "slice_thickness_mm": {"min": 0.6, "max": 3.0},
    "kernel_families": ["bone"],
    "min_covered_vertebrae": 2,
}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_model_json(
    onnx_path: str | Path,
    json_path: str | Path,
    patient_threshold: float = 0.5,
    vertebra_thresholds: dict | None = None,
    version: str = VERSION,
) -> dict:
    onnx_path = Path(onnx_path)
    vt = {v: 0.5 for v in VERTEBRAE}
    if vertebra_thresholds:
        vt.update({k: float(x) for k, x in vertebra_thresholds.items()})
    doc = {
        "format": FORMAT,
        "name": NAME,
        "version": version,
        "onnx": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "input": INPUT,
        "outputs": OUTPUTS,
        "thresholds": {"patient": float(patient_threshold), "vertebrae": vt},
        "coverage": COVERAGE,
        "envelope": ENVELOPE,
    }
    Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")
    return doc
