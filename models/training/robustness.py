"""How the model's ranking holds up when the patient lies rotated in the scanner.

The phantoms vary the spine's own shape (lordosis, lateral bend, per-vertebra axial rotation)
but always lay the neck along the scanner's z axis, facing anteriorly: a patient whose head is
turned or tilted, or who lies askew on the table, is outside that. This script measures it
without new phantoms: the contract's model grid is rotated about its own centre before the
source volume is sampled (`preprocess.py` otherwise, float, no cache), which shows the model the
same anatomy rotated the other way. Pose 0 is exactly `preprocess.preprocess`.

  python3 robustness.py ../cspine_triage_int8.onnx [MORE.onnx ...] --data ROOT \
      --contract ../model.json --out runs/robustness_eval.json

Each study is loaded once and each pose sampled once for all the models given.

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
from contract import VERTEBRAE
from data import read_train_csv
from evaluate import sigmoid
from metrics import brief, summary, write_json

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx", nargs="+")
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="RSNA-layout roots, pooled")
    ap.add_argument("--contract", type=Path, required=True, help="model.json (thresholds)")
    ap.add_argument("--poses", nargs="+", default=DEFAULT_POSES)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
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
    for n, (root, uid, _) in enumerate(rows):
        vol = pp.load_dicom_series(root / "train_images" / uid)
        for pose in args.poses:
            x = pp.preprocess(vol) if pose == "0" else rotated_input(vol, rotation(pose))
            for path, sess in zip(args.onnx, sessions):
                seg, vlog, plog, att = sess.run(None, {"slices": x})
                probs[path, pose].append(sigmoid(np.concatenate([plog, vlog])))
        if (n + 1) % 20 == 0:
            print(f"{n + 1}/{len(rows)} studies", flush=True)
    results = {"data": " ".join(map(str, args.data)), "n_studies": len(rows),
               "n_fractured": int(y[:, 0].sum()), "thresholds": str(args.contract), "models": {}}
    for path in args.onnx:
        print(path)
        per = results["models"][path] = {}
        for pose in args.poses:
            m = per[pose] = summary(y, np.stack(probs[path, pose]), tp, tv)
            print(f"  pose {pose:>6}: {brief(m)}")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
