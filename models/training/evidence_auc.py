"""How well a checkpoint's fracture-evidence map tells cracks apart, on cached studies:
  - per cell, inside the vertebrae: crack cells against the other bone cells (AUC);
  - per vertebra: the strongest evidence inside it (what `TriageNet.pool` passes on as
    `frac_max`) for fractured against intact vertebrae (AUC, pooled over C1-C7).
The second is what the heads can build on; a map that only tells bone from air scores ~0.5.

  python3 evidence_auc.py CHECKPOINT.pt --data VAL_ROOT --cache CACHE_DIR [--limit 40]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from data import load_dataset
from metrics import auc
from model import load_checkpoint
from train import encode_study, encoded_features


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="an RSNA-layout root (phantoms: they carry crack cells)")
    ap.add_argument("--cache", type=Path, required=True, help="its training cache (built if missing)")
    ap.add_argument("--limit", type=int, help="only the first N studies")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint).eval()
    studies = load_dataset(args.data, args.cache, workers=1, limit=args.limit)
    cell_y, cell_p, vert_y, vert_p = [], [], [], []
    with torch.no_grad():
        for st in studies:
            _, frac, _, seq = encoded_features(model, encode_study(model, st))
            if st.frac is not None and st.seg is not None:
                bone = st.seg.reshape(-1) > 0
                cell_y.append(st.frac.reshape(-1)[bone] > 0)
                cell_p.append(torch.sigmoid(frac[:, 0]).numpy().reshape(-1)[bone])
            vert_p.append(seq[:, :, -2].amax(0).numpy())
            vert_y.append(st.labels[1:])
    cell_y, cell_p = np.concatenate(cell_y), np.concatenate(cell_p)
    print(f"{args.checkpoint}: {len(studies)} studies; crack cells vs other bone cells AUC "
          f"{auc(cell_y, cell_p):.3f} ({int(cell_y.sum())} crack cells); strongest evidence per vertebra, "
          f"fractured vs intact AUC {auc(np.concatenate(vert_y), np.concatenate(vert_p)):.3f}")


if __name__ == "__main__":
    main()
