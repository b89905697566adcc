"""CLI: python3 -m phantoms_b OUT_DIR --count N --seed S [--fracture half|random|none|yes|C1..C7]."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .study import generate


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="phantoms_b", description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first-index", type=int, default=0)
    ap.add_argument("--fracture", default="random",
                    help="half (odd study indices fractured), random (~50 %%), none, yes, or C1..C7")
    ap.add_argument("--matrix", type=int, default=256, help="rows = columns (128-512)")
    a = ap.parse_args(argv)
    if not 128 <= a.matrix <= 512:
        sys.exit("--matrix must be 128-512")
    a.out.mkdir(parents=True, exist_ok=True)
    for i in range(a.first_index, a.first_index + a.count):
        fr = a.fracture if a.fracture != "half" else ("yes" if i % 2 else "none")
        t = time.time()
        r = generate(a.out, a.seed, i, fr, a.matrix)
        print(f"{i} {r['study']} labels {''.join(map(str, r['labels']))} {r['slices']} slices "
              f"{','.join(r['kinds']) or '-'} {time.time() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
