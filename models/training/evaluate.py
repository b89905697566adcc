"""Evaluates one or more ONNX models with onnxruntime on whole studies of an RSNA-layout root.
Each study goes through the exact float preprocessing of `preprocess.py` once (not the uint8
training cache) and through every model given.

  # choose thresholds on the VALIDATION set (shipped model), write them into model.json:
  python3 evaluate.py ../cspine_triage_int8.onnx --data VAL_ROOT --choose-thresholds \
      --contract ../model.json --out runs/val_eval.json
  # held-out TEST set, thresholds read from model.json:
  python3 evaluate.py runs/fp32/model_fp32.onnx runs/pruned/model_fp32.onnx ../cspine_triage_int8.onnx \
      --data TEST_ROOT --contract ../model.json --out runs/test_eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import preprocess as pp
from contract import VERSION, VERTEBRAE, write_model_json
from data import read_train_csv
from metrics import auc, brief, choose_thresholds, summary, write_json


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def bootstrap_intervals(y: np.ndarray, p: np.ndarray, n: int, seed: int = 0) -> dict:
    """95 % percentile intervals of the patient and mean vertebra AUC over studies resampled
    with replacement: how far a test set this size can move the numbers."""
    rng = np.random.default_rng(seed)
    pat, vert = [], []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        pat.append(auc(y[i, 0], p[i, 0]))
        vert.append(np.nanmean([auc(y[i, 1 + v], p[i, 1 + v]) for v in range(7)]))
    q = lambda a: [float(np.nanpercentile(a, 2.5)), float(np.nanpercentile(a, 97.5))]
    return {"patient_auc": q(pat), "mean_vertebra_auc": q(vert)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx", nargs="+")
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="one or more RSNA-layout roots, pooled")
    ap.add_argument("--contract", type=Path, required=True, help="model.json (thresholds)")
    ap.add_argument("--choose-thresholds", action="store_true",
                    help="choose thresholds on this (validation) set from the LAST model and write them into --contract")
    ap.add_argument("--min-sens", type=float, default=0.95)
    ap.add_argument("--vertebra-thresholds", choices=("pooled", "per-vertebra"), default="pooled",
                    help="one threshold for all seven vertebrae (default), or one each (needs many positives)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--by-root", action="store_true",
                    help="with several --data roots, also report each root on its own (one preprocessing pass)")
    ap.add_argument("--limit", type=int, help="only the first N studies of each root's train.csv")
    ap.add_argument("--bootstrap", type=int, default=2000,
                    help="resamples of the studies for the 95 %% intervals of the AUCs (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path,
                    help="use the uint8 training cache (window rounded to 1/255, about 3.5 HU) instead of "
                         "preprocessing each study in float: much faster on a busy machine")
    args = ap.parse_args()

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sessions = [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for p in args.onnx]
    rows = [(root, uid, lab) for root in args.data for uid, lab in read_train_csv(root)[: args.limit]]
    y = np.stack([lab for _, _, lab in rows])
    probs = [[] for _ in sessions]
    secs = [0.0 for _ in sessions]
    n_slices = []
    cached = {}
    if args.cache:
        from data import load_dataset

        cached = {st.uid: st for root in args.data
                  for st in load_dataset(root, args.cache / root.name, limit=args.limit)}
    for root, uid, _ in rows:
        if args.cache:
            x = cached[uid].slices()
        else:
            x = pp.preprocess(pp.load_dicom_series(root / "train_images" / uid))
        n_slices.append(x.shape[0])
        for i, s in enumerate(sessions):
            t = time.perf_counter()
            seg, vlog, plog, att = s.run(None, {"slices": x})
            secs[i] += time.perf_counter() - t
            probs[i].append(sigmoid(np.concatenate([plog, vlog])))
    probs = [np.stack(p) for p in probs]

    contract = json.loads(args.contract.read_text())
    if args.choose_thresholds:
        tp, tv = choose_thresholds(y, probs[-1], args.min_sens, args.vertebra_thresholds == "per-vertebra")
        tv = dict(zip(VERTEBRAE, tv))
        onnx_path = args.contract.parent / contract["onnx"]
        contract = write_model_json(onnx_path, args.contract, tp, tv, version=VERSION)
        print(f"thresholds (validation, sensitivity >= {args.min_sens}): patient {tp:.4f}, vertebrae {tv}")
    tp = contract["thresholds"]["patient"]
    tv = [contract["thresholds"]["vertebrae"][v] for v in VERTEBRAE]
    results = {"data": " ".join(map(str, args.data)), "n_studies": len(rows),
               "preprocessing": "uint8 cache" if args.cache else "float (preprocess.py)",
               "mean_model_slices": float(np.mean(n_slices)), "models": {}}

    def score(y, p) -> dict:
        """The summary metrics at the contract's thresholds, with bootstrap intervals if asked."""
        m = summary(y, p, tp, tv)
        if args.bootstrap:
            m["bootstrap_95"] = bootstrap_intervals(y, p, args.bootstrap)
        return m

    for path, p, sec in zip(args.onnx, probs, secs):
        m = score(y, p)
        m["ort_ms_per_study"] = 1000 * sec / len(rows)
        results["models"][path] = m
        print(f"{path}: patient AUC {m['patient_auc']:.4f}, mean vertebra AUC {m['mean_vertebra_auc']:.4f}, "
              f"RSNA wll {m['rsna_wll']:.4f}, patient sens/spec {m['patient_sens']:.3f}/{m['patient_spec']:.3f}, "
              f"vertebra sens/spec {m['vertebra_sens']:.3f}/{m['vertebra_spec']:.3f}, "
              f"published status sens/spec {m['status_sens']:.3f}/{m['status_spec']:.3f}")
        if args.bootstrap:
            b = m["bootstrap_95"]
            print(f"  95 % bootstrap intervals ({args.bootstrap} resamples of the studies): patient AUC "
                  f"{b['patient_auc'][0]:.3f}-{b['patient_auc'][1]:.3f}, mean vertebra AUC "
                  f"{b['mean_vertebra_auc'][0]:.3f}-{b['mean_vertebra_auc'][1]:.3f}")
    if args.by_root:
        results["by_root"] = {}
        for root in args.data:
            mask = np.array([r == root for r, _, _ in rows])
            per = results["by_root"][str(root)] = {"n_studies": int(mask.sum()), "models": {}}
            for path, p in zip(args.onnx, probs):
                m = per["models"][path] = score(y[mask], p[mask])
                print(f"  {root} ({mask.sum()} studies) {path}: {brief(m)}")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
