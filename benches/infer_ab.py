#!/usr/bin/env python3
"""Two models through the same `cspine-triage infer` binary, alternated run by run (A, B, A,
B, ...), on one series: for comparing models on a shared, noisy machine.

    python3 benches/infer_ab.py --bin /tmp/cspine-triage OLD/model.json NEW/model.json \
        [--pairs 15] [--slices 60] [--rows 256] [--threads 2] [--series DIR]

With `--bin-b OTHER_BINARY`, B runs that binary instead (two builds, e.g. a patched tract,
on the same model: give the same model.json twice); the script then also reports the
largest difference between the two builds' probabilities.

Per run it takes `inference_end - inference_start` of `infer --json` (ns timestamps:
preprocessing + model; the preprocessing is the same for both models, so the difference is
the model's). `infer`'s text output rounds the model time to 10 ms, too coarse for this.
Prints median/mean/min per model, the paired difference A - B and the load average.
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path

from infer_vs_ort import make_series

ROOT = Path(__file__).resolve().parents[1]


def seconds(stamp: str) -> float:
    """RFC 3339 with up to 9 fractional digits ('2026-11-27T22:58:56.786586348Z')."""
    whole, frac = stamp.rstrip("Z").split(".")
    return datetime.fromisoformat(whole + "+00:00").timestamp() + int(frac) / 10 ** len(frac)


def probabilities(result: dict) -> list:
    """Patient and vertebra probabilities of an `infer --json` result (none when indeterminate)."""
    patient = [result["patient"]["probability"]] if result.get("patient") else []
    return patient + [v["probability"] for v in (result.get("vertebrae") or {}).values()]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("a", help="model.json of model A")
    ap.add_argument("b", help="model.json of model B")
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "cspine-triage"))
    ap.add_argument("--bin-b", help="binary for B (default: --bin)")
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slices", type=int, default=60, help="source slices (2.5 mm)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--series", help="use this DICOM folder instead of a generated one")
    a = ap.parse_args()
    env = dict(os.environ, RUST_LOG="warn")
    with tempfile.TemporaryDirectory() as tmp:
        series = a.series or make_series(os.path.join(tmp, "series"), a.slices, a.rows, quiet=True)
        times = {"A": [], "B": []}
        probs = {}
        runs = (("A", a.bin, a.a), ("B", a.bin_b or a.bin, a.b))
        print(f"load average before: {load()}")
        for _ in range(a.pairs):
            for tag, binary, model in runs:
                out = subprocess.run(
                    [binary, "infer", "--json", "--model", model, "--runtime", "cpu",
                     "--threads", str(a.threads), series],
                    capture_output=True, text=True, env=env, check=True,
                ).stdout
                result = json.loads(out.splitlines()[0])
                t = result["timings"]
                times[tag].append(seconds(t["inference_end"]) - seconds(t["inference_start"]))
                probs[tag] = (result["status"], probabilities(result))
        print(f"load average after: {load()}")
    for tag, binary, model in runs:
        v = times[tag]
        print(f"{tag} {binary} {model}: median {statistics.median(v) * 1e3:.1f} ms, mean {statistics.mean(v) * 1e3:.1f} ms, "
              f"min {min(v) * 1e3:.1f} ms")
    d = [x - y for x, y in zip(times["A"], times["B"])]
    print(f"A - B paired: median {statistics.median(d) * 1e3:.1f} ms, mean {statistics.mean(d) * 1e3:.1f} ms; "
          f"B faster in {sum(x > 0 for x in d)} of {len(d)} pairs")
    if a.bin_b:
        (status_a, pa), (status_b, pb) = probs["A"], probs["B"]
        diff = max((abs(x - y) for x, y in zip(pa, pb)), default=0.0)
        print(f"status A {status_a}, B {status_b}; largest |difference| between their "
              f"{len(pa)} probabilities (patient, vertebrae): {diff:.3g}")


if __name__ == "__main__":
    main()
