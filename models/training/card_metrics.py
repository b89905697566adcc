"""Collects the model card's numbers into models/metrics.json (read by tests/model.rs).

  python3 card_metrics.py runs/test_eval.json runs/prune_report.json ../metrics.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from metrics import finite


def main():
    test_eval, prune_report, out = map(Path, sys.argv[1:4])
    ev = json.loads(test_eval.read_text())
    pr = json.loads(prune_report.read_text())
    models = list(ev["models"].items())
    names = ["fp32", "pruned", "int8"]
    doc = {
        "note": "Synthetic phantoms only (cspine-triage synth). No number here is clinical.",
        "test_set": {"data": ev["data"], "n_studies": ev["n_studies"], "seeds": [3000, 3001]},
        "params": {"fp32": pr["before"]["params"], "pruned": pr["after"]["params"]},
        "macs_per_64_slices": {"fp32": pr["before"]["macs_S64"]["total"], "pruned": pr["after"]["macs_S64"]["total"]},
    }
    for name, (path, m) in zip(names, models):
        doc[name] = {**m, "onnx": os.path.basename(path), "onnx_bytes": os.path.getsize(path)}
    doc["int8_auc_loss"] = {
        "patient": doc["fp32"]["patient_auc"] - doc["int8"]["patient_auc"],
        "mean_vertebra": doc["fp32"]["mean_vertebra_auc"] - doc["int8"]["mean_vertebra_auc"],
        "patient_vs_pruned_fp32": doc["pruned"]["patient_auc"] - doc["int8"]["patient_auc"],
    }
    out.write_text(json.dumps(finite(doc), indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("int8_auc_loss",)}, indent=2))


if __name__ == "__main__":
    main()
