"""Which fractures a model ranks low, by kind (phantoms only: needs `ground_truth/*.json`).

For every fractured study: its patient logit's rank among the intact studies of the same
roots (1.0: above every intact study; the mean over a kind is that kind's patient AUC
against all intact studies). Input through the uint8 training cache, as `evaluate.py
--cache`.

  python3 by_kind.py MODEL.onnx --data VAL VAL2 VAL3 --cache C
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from data import load_dataset


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx")
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="RSNA-layout phantom roots, pooled")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--worst", type=int, default=12, help="list this many lowest-ranked fractured studies")
    args = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(args.onnx, opts, providers=["CPUExecutionProvider"])
    rows = []  # (patient logit, fractured, the ground truth's fractures, study UID)
    for root in args.data:
        for st in load_dataset(root, args.cache / root.name):
            _, _, patient_logit, _ = session.run(None, {"slices": st.slices()})
            truth = json.loads((root / "ground_truth" / f"{st.uid}.json").read_text())
            rows.append((float(patient_logit[0]), bool(st.labels[0]), truth.get("fractures") or [], st.uid))
    intact = np.array([p for p, fractured, _, _ in rows if not fractured])

    def rank(p: float) -> float:
        return float((intact < p).mean() + 0.5 * (intact == p).mean())

    print(f"{len(rows)} studies, {len(intact)} intact")
    by_kind = defaultdict(list)
    for p, fractured, fractures, _ in rows:
        for f in fractures if fractured else []:
            by_kind[f["kind"]].append(rank(p))
    for kind, ranks in sorted(by_kind.items()):
        print(f"{kind:24s} {len(ranks):4d} studies  mean rank {np.mean(ranks):.4f}  below 0.9: "
              f"{sum(r < 0.9 for r in ranks)}")
    print("lowest-ranked fractured studies (study UID: the same study across models):")
    for p, _, fractures, uid in sorted((r for r in rows if r[1]), key=lambda r: r[0])[: args.worst]:
        kinds = (f["kind"] + (f" ({f['height_loss']:.0%} height loss)" if f["height_loss"] else "")
                 for f in fractures)
        print(f"  logit {p:7.3f}  rank {rank(p):.3f}  {' + '.join(kinds)}  {uid}")


if __name__ == "__main__":
    main()
