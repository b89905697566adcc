"""CLI: python3 -m phantoms_b OUT_DIR --count N --seed S [--fracture half|random|none|yes|C1..C7]."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from concurrent.futures import ProcessPoolExecutor

from .study import generate
from .writer import append_csv


def _one(args):
    out, seed, i, fr, matrix = args
    t = time.time()
    r = generate(out, seed, i, fr, matrix)
    r["seconds"] = time.time() - t
    return i, r


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="phantoms_b", description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first-index", type=int, default=0)
    ap.add_argument("--fracture", default="random",
                    help="half (odd study indices fractured), random (~50 %%), none, yes, or C1..C7")
    ap.add_argument("--matrix", type=int, default=256, help="rows = columns (128-512)")
    ap.add_argument("--workers", type=int, default=1, help="processes (each about 11 s and 1-2 GB a study at 256)")
    a = ap.parse_args(argv)
    if not 128 <= a.matrix <= 512:
        sys.exit("--matrix must be 128-512")
    a.out.mkdir(parents=True, exist_ok=True)
    jobs = [(a.out, a.seed, i, a.fracture if a.fracture != "half" else ("yes" if i % 2 else "none"), a.matrix)
            for i in range(a.first_index, a.first_index + a.count)]
    with ProcessPoolExecutor(a.workers) if a.workers > 1 else _Serial() as pool:
        for i, r in pool.map(_one, jobs):  # in index order: train.csv rows too
            append_csv(a.out, r["study"], r["labels"])
            print(f"{i} {r['study']} labels {''.join(map(str, r['labels']))} {r['slices']} slices "
                  f"{','.join(r['kinds']) or '-'} {r['seconds']:.1f} s", flush=True)


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, jobs):
        return map(fn, jobs)


if __name__ == "__main__":
    main()
