"""Collects the model card's numbers into models/metrics.json (read by tests/model.rs).

  python3 card_metrics.py runs/test_eval.json runs/size_report.json ../metrics.json \
      [--unpruned-from OLD_METRICS_JSON]

`test_eval.json` holds either three models (the unpruned fp32 network, the shipped network
in fp32, the shipped int8 file, in that order) or, with `--unpruned-from`, the last two: the
unpruned network's ONNX export was not kept after 0.6.0, so its row is carried from an
earlier metrics.json measured on the same test studies (the phantoms regenerate bit for bit
from their seeds), and says so in `unpruned_source`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from metrics import finite


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("test_eval", type=Path)
    ap.add_argument("size_report", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--unpruned-from", type=Path,
                    help="metrics.json whose `fp32` entry (the unpruned network) is carried over")
    args = ap.parse_args()
    ev = json.loads(args.test_eval.read_text())
    sr = json.loads(args.size_report.read_text())
    models = list(ev["models"].items())
    names = ["pruned", "int8"] if args.unpruned_from else ["fp32", "pruned", "int8"]
    if len(models) != len(names):
        raise SystemExit(f"{args.test_eval}: {len(models)} models, expected {len(names)} ({', '.join(names)})")
    doc = {
        "note": "Synthetic phantoms only (cspine-triage synth). No number here is clinical.",
        "test_set": {"data": ev["data"], "n_studies": ev["n_studies"], "seeds": [3000, 3001]},
        "params": {"fp32": sr["before"]["params"], "pruned": sr["after"]["params"]},
        "macs_per_64_slices": {"fp32": sr["before"]["macs_S64"]["total"], "pruned": sr["after"]["macs_S64"]["total"]},
    }
    if args.unpruned_from:
        old = json.loads(args.unpruned_from.read_text())
        doc["fp32"] = old["fp32"]
        doc["unpruned_source"] = f"carried from {args.unpruned_from.name}, measured on the same test studies"
    for name, (path, m) in zip(names, models):
        doc[name] = {**m, "onnx": os.path.basename(path), "onnx_bytes": os.path.getsize(path)}
    # What int8 costs is measured against the same network in fp32 ("pruned"); the unpruned
    # network is a different, shorter-trained one.
    doc["int8_auc_loss"] = {
        "patient": doc["pruned"]["patient_auc"] - doc["int8"]["patient_auc"],
        "mean_vertebra": doc["pruned"]["mean_vertebra_auc"] - doc["int8"]["mean_vertebra_auc"],
    }
    args.out.write_text(json.dumps(finite(doc), indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("int8_auc_loss",)}, indent=2))


if __name__ == "__main__":
    main()
