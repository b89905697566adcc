"""Before/after sizes for the model card: the fp32 network and the shipped one (pruned,
fine-tuned, and possibly grown by the high-resolution fracture branch after pruning), plus
what pruning alone did (`prune.py`'s report).

  python3 size_report.py runs/fp32/model.pt runs/final/model.pt runs/prune_report.json runs/size_report.json
"""

from __future__ import annotations

import json
import sys

from model import count_params, load_checkpoint
from prune import macs


def main():
    fp32_ck, shipped_ck, prune_report, out = sys.argv[1:5]
    a, b = load_checkpoint(fp32_ck), load_checkpoint(shipped_ck)
    rep = json.load(open(prune_report))
    doc = {
        "keep": rep["keep"],
        "before": {"params": count_params(a), "macs_S64": macs(a), "config": a.config()},
        "after_pruning": rep["after"],
        "after": {"params": count_params(b), "macs_S64": macs(b), "config": b.config()},
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    print(json.dumps({k: doc[k]["params"] for k in ("before", "after_pruning", "after")}))


if __name__ == "__main__":
    main()
