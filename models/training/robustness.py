"""How the model's ranking holds up when the patient lies rotated in the scanner.

The phantoms vary the spine's own shape (lordosis, lateral bend, per-vertebra axial rotation)
but always lay the neck along the scanner's z axis, facing anteriorly: a patient whose head is
turned or tilted, or who lies askew on the table, is outside that. This script measures it
without new phantoms: the contract's model grid is rotated about its own centre before the
source volume is sampled (`preprocess.py` otherwise, float, no cache), which shows the model the
same anatomy rotated the other way. Pose 0 is exactly `preprocess.preprocess`.

  python3 robustness.py ../cspine_triage_int8.onnx [MORE.onnx ...] --data ROOT \
      --contract ../model.json --out runs/robustness_eval.json

Each study is loaded once and each pose sampled once for all the models given. It also
prints, per pose, the neck's sideways tilt as the daemon estimates it from the first model's
segmentation (`lateral_tilt_deg`, the reference of `postprocess::lateral_tilt_deg`, which
answers `indeterminate` beyond the contract's `coverage.max_lateral_tilt_deg`).

Poses are rotations in degrees about the patient's axes (LPS): `z` turns the head (yaw, in
the axial plane), `y` tilts it towards a shoulder (roll), `x` nods it (pitch, on top of the
phantoms' own 5-45 degrees of lordosis). Not a test set for choosing anything: a stress test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

import preprocess as pp
from contract import COVERAGE, INPUT, OUTPUTS, VERSION, VERTEBRAE, write_model_json
from data import read_train_csv
from evaluate import sigmoid
from metrics import brief, choose_thresholds, summary, write_json

DEFAULT_POSES = ["0", "z:-20", "z:-10", "z:10", "z:20", "y:-10", "y:10", "x:-10", "x:10"]


def axis_rotation(axis: str, deg: float) -> np.ndarray:
    """3x3 rotation by `deg` degrees about LPS axis `axis` (x, y or z), acting on points."""
    a = np.deg2rad(deg)
    i = "xyz".index(axis)
    j, k = [n for n in range(3) if n != i]
    r = np.eye(3)
    r[j, j], r[j, k], r[k, j], r[k, k] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
    return r


def rotation(pose: str) -> np.ndarray:
    """`AXIS:DEGREES` (or `0`) -> 3x3 rotation matrix acting on LPS points."""
    if pose == "0":
        return np.eye(3)
    axis, deg = pose.split(":")
    return axis_rotation(axis, float(deg))


def rotated_input(vol: pp.Volume, rot: np.ndarray) -> np.ndarray:
    """The contract's model input with the model grid rotated by `rot` about its centre."""
    hu = pp.resample_hu(vol, pp.target_grid(vol), rotation=rot)
    return np.ascontiguousarray(pp.stack_channels(pp.window(hu)))


MAX_GAP_SLICES = 2  # as src/inference/postprocess/segmentation.rs


def vertebra_runs(labels: np.ndarray, min_pixels: int) -> list:
    """Per vertebra, the slices of its main run (the daemon's `vertebra_extent`): slices with at
    least `min_pixels` cells of it, gaps of up to MAX_GAP_SLICES bridged, the run with most cells."""
    runs = []
    for v in range(1, 8):
        counts = (labels == v).reshape(labels.shape[0], -1).sum(1)
        best, cur = None, None
        for k, n in enumerate(counts):
            if n < max(min_pixels, 1):
                continue
            cur = (cur[0], k, cur[2] + n) if cur and k - cur[1] <= MAX_GAP_SLICES + 1 else (k, k, n)
            if best is None or cur[2] > best[2]:
                best = cur
        runs.append(None if best is None else (best[0], best[1]))
    return runs


def lateral_tilt_deg(seg: np.ndarray) -> float | None:
    """Angle (degrees) of the neck's axis from the scanner's z axis in the coronal plane, from
    the segmentation alone: the column centroid of each vertebra found, over its main run, fitted
    against its slice centroid by least squares. A head tilted towards a shoulder tilts it; a turn
    or a nod does not (lordosis bends the neck in the sagittal plane). None below the contract's
    minimum vertebra count."""
    labels = seg.argmax(1)  # [S, H, W]
    cell_mm = OUTPUTS["segmentation"]["stride"] * INPUT["spacing_mm"]["column"]
    xs, zs = [], []
    for v, run in enumerate(vertebra_runs(labels, COVERAGE["min_pixels"]), start=1):
        if run is None:
            continue
        k, _, col = np.nonzero(labels[run[0]: run[1] + 1] == v)
        xs.append(col.mean() * cell_mm)
        zs.append((k.mean() + run[0]) * INPUT["spacing_mm"]["slice"])
    if len(xs) < COVERAGE["min_vertebrae"]:
        return None
    xs, zs = np.array(xs), np.array(zs)
    slope = ((zs - zs.mean()) * (xs - xs.mean())).sum() / ((zs - zs.mean()) ** 2).sum()
    return float(np.degrees(np.arctan(slope)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx", nargs="+")
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="RSNA-layout roots, pooled")
    ap.add_argument("--contract", type=Path, required=True, help="model.json (thresholds)")
    ap.add_argument("--poses", nargs="+", default=DEFAULT_POSES)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--choose-thresholds", action="store_true",
                    help="on VALIDATION data only: choose thresholds from the first model's "
                         "probabilities pooled over every study and pose, write them into --contract")
    ap.add_argument("--min-sens", type=float, default=0.95)
    args = ap.parse_args()

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sessions = [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for p in args.onnx]
    contract = json.loads(args.contract.read_text())
    tp = contract["thresholds"]["patient"]
    tv = [contract["thresholds"]["vertebrae"][v] for v in VERTEBRAE]
    rows = [(root, uid, lab) for root in args.data for uid, lab in read_train_csv(root)[: args.limit]]
    y = np.stack([lab for _, _, lab in rows])
    probs = {(path, pose): [] for path in args.onnx for pose in args.poses}
    tilts = {pose: [] for pose in args.poses}  # estimated from the first model's segmentation
    for n, (root, uid, _) in enumerate(rows):
        vol = pp.load_dicom_series(root / "train_images" / uid)
        for pose in args.poses:
            x = pp.preprocess(vol) if pose == "0" else rotated_input(vol, rotation(pose))
            for path, sess in zip(args.onnx, sessions):
                seg, vlog, plog, att = sess.run(None, {"slices": x})
                probs[path, pose].append(sigmoid(np.concatenate([plog, vlog])))
                if path == args.onnx[0]:
                    tilts[pose].append(lateral_tilt_deg(seg))
        if (n + 1) % 20 == 0:
            print(f"{n + 1}/{len(rows)} studies", flush=True)
    if args.choose_thresholds:
        # The poses a model is claimed for are the population its operating point must hold on.
        tp, tv = choose_thresholds(np.concatenate([y] * len(args.poses)),
                                   np.concatenate([np.stack(probs[args.onnx[0], pose]) for pose in args.poses]),
                                   args.min_sens)
        onnx_path = args.contract.parent / contract["onnx"]
        contract = write_model_json(onnx_path, args.contract, tp, dict(zip(VERTEBRAE, tv)), version=VERSION)
        tv = [contract["thresholds"]["vertebrae"][v] for v in VERTEBRAE]
        print(f"thresholds (validation over {len(args.poses)} poses, sensitivity >= {args.min_sens}): "
              f"patient {tp:.4f}, vertebrae {tv[0]:.4f}")
    results = {"data": " ".join(map(str, args.data)), "n_studies": len(rows),
               "n_fractured": int(y[:, 0].sum()), "thresholds": str(args.contract), "models": {}}
    for path in args.onnx:
        print(path)
        per = results["models"][path] = {}
        for pose in args.poses:
            m = per[pose] = summary(y, np.stack(probs[path, pose]), tp, tv)
            print(f"  pose {pose:>6}: {brief(m)}")
    print(f"estimated lateral tilt (degrees; {args.onnx[0]}), per pose: mean, sd, min, max, not found")
    results["lateral_tilt_deg"] = {}
    for pose in args.poses:
        t = np.array([a for a in tilts[pose] if a is not None])
        results["lateral_tilt_deg"][pose] = tilts[pose]
        if len(t):
            print(f"  pose {pose:>6}: {t.mean():6.1f} {t.std():5.1f} {t.min():6.1f} {t.max():6.1f}"
                  f"  {len(tilts[pose]) - len(t)}")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
