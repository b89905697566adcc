"""Real fracture-free necks as training negatives (`train.py --negatives`).

Writes the OpenKBP cases of the `train` part of the fixed split (realct_split.csv,
realct_eval.py; never `validation` or `test`, which judge the model) as an RSNA-layout
root: `train.csv` with every label 0 and `train_images/<StudyInstanceUID>/NNNN.dcm`, the same
DICOM series realct_eval.py gives the product. `data.load_dataset` then caches them on the
model grid like any phantom. No segmentation: these necks have no vertebra labels.

    python3 realct_negatives.py OUT [--realct ../../../shared/realct] [--limit N]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from data import LABELS
from realct_eval import ROOT, cases, uid_for, write_series


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--realct", type=Path, default=ROOT.parent / "shared" / "realct")
    ap.add_argument("--limit", type=int, default=0, help="only the first N cases (CI's smoke run)")
    a = ap.parse_args()
    todo = [(case, ct) for case, part, ct, _ in cases(a.realct) if part == "train"]
    if a.limit:
        todo = todo[: a.limit]
    rows = []
    for case, ct in todo:
        study = uid_for(case + "/study")
        d = a.out / "train_images" / study
        if not (d / "0001.dcm").exists():
            write_series(ct, d, case)
        rows.append(study)
    with open(a.out / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["StudyInstanceUID", *LABELS])
        for study in rows:
            w.writerow([study] + [0] * len(LABELS))
    print(f"{len(rows)} real necks (train) in {a.out}")


if __name__ == "__main__":
    main()
