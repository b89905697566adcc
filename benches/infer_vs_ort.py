#!/usr/bin/env python3
"""tract (cspine-triage infer) against onnxruntime on the same ONNX, same input, same threads.

    cargo build --release
    python3 benches/infer_vs_ort.py [--bin target/release/cspine-triage] [--threads 2]
                                    [--runs 5] [--slices 80] [--profile]

Per study it reports, for both engines:
- model latency: the model call alone (tract: the `model` time `infer` prints; onnxruntime:
  `session.run`), median of --runs, on the same [S,3,128,128] input (Rust and the numpy
  reference agree to 1e-5, see tests/inference.rs);
- whole-infer latency: one process doing what `infer` does: read DICOM, load the model,
  preprocess, run, postprocess (onnxruntime side: pydicom + numpy reference + session);
- peak RSS of that process.
The ratio tract/onnxruntime is what is compared (shared, noisy machines: absolute numbers
only hold for the machine they were measured on; write it next to them).
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_series(out, slices, rows, quiet=False):
    """A square test series of `slices` x `rows` x `rows` in `out` (tests/python/infer_make_series.py)."""
    subprocess.run(
        [sys.executable, str(ROOT / "tests/python/infer_make_series.py"), out,
         "--slices", str(slices), "--rows", str(rows), "--cols", str(rows)],
        check=True, stdout=subprocess.DEVNULL if quiet else None,
    )
    return out


def run_measured(cmd, env=None):
    """Runs cmd; returns (wall seconds, peak RSS MiB, stdout, stderr)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    # communicate() has reaped the child; its rusage is in RUSAGE_CHILDREN only as a max
    # over all children, so each measurement runs in its own wrapper process instead.
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{err.decode()}")
    return wall, out.decode(), err.decode()


def wrapped(cmd, env=None):
    """Runs cmd under a tiny python wrapper that reports the child's own peak RSS."""
    wrapper = (
        "import os,sys,subprocess,resource,json;"
        "p=subprocess.run(sys.argv[1:]);"
        "r=resource.getrusage(resource.RUSAGE_CHILDREN);"
        "sys.stderr.write('\\nPEAK_RSS_KB=%d\\n'%r.ru_maxrss);sys.exit(p.returncode)"
    )
    wall, out, err = run_measured([sys.executable, "-c", wrapper, *cmd], env)
    rss = int(re.search(r"PEAK_RSS_KB=(\d+)", err).group(1)) / 1024
    return wall, rss, out, err


def ort_worker(series, threads, runs, model):
    """The onnxruntime side of one study, in one process (timed by the caller)."""
    t_start = time.perf_counter()
    sys.path.insert(0, str(ROOT / "models" / "training"))
    import numpy as np
    import onnxruntime as ort
    import preprocess

    vol = preprocess.load_dicom_series(series)
    t_load = time.perf_counter()
    x = preprocess.preprocess(vol)
    t_pre = time.perf_counter()
    contract = json.loads(Path(model).read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(
        str(Path(model).parent / contract["onnx"]), opts, providers=["CPUExecutionProvider"]
    )
    name = sess.get_inputs()[0].name
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        outs = sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    # Postprocessing is negligible next to the model; the sigmoid stands for it.
    _ = 1 / (1 + np.exp(-outs[1]))
    print(
        json.dumps(
            {
                "slices": int(x.shape[0]),
                "load_s": t_load - t_start,
                "preprocess_s": t_pre - t_load,
                "model_first_s": times[0],
                "model_median_s": statistics.median(times),
                "ort": ort.__version__,
            }
        )
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "cspine-triage"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--slices", type=int, default=80, help="source slices (2.5 mm)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--profile", action="store_true", help="print tract's per-op profile")
    ap.add_argument("--graph", default="int8", choices=["int8", "dequantized"],
                    help="the graph tract runs (infer --graph): the int8 file as shipped, or "
                         "dequantized to float at load (what CUDA runs); onnxruntime always runs the int8 file")
    ap.add_argument("--series", help="use this DICOM folder instead of a generated one")
    ap.add_argument("--model", default=str(ROOT / "models" / "model.json"),
                    help="model contract (model.json; its ONNX file lies next to it)")
    ap.add_argument("--ort-worker", nargs=4, metavar=("SERIES", "THREADS", "RUNS", "MODEL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ort_worker:
        ort_worker(a.ort_worker[0], int(a.ort_worker[1]), int(a.ort_worker[2]), a.ort_worker[3])
        return
    if not Path(a.bin).exists():
        raise SystemExit(f"{a.bin} not found: run `cargo build --release` first or pass --bin")

    with tempfile.TemporaryDirectory() as tmp:
        series = a.series or make_series(os.path.join(tmp, "series"), a.slices, a.rows)
        model = a.model
        env = dict(os.environ, RUST_LOG="warn", OMP_NUM_THREADS=str(a.threads))
        infer = [a.bin, "infer", "--model", model, "--runtime", "cpu", "--graph", a.graph,
                 "--threads", str(a.threads), series]

        tract_model, tract_wall, tract_rss, tract_pre = [], [], [], []
        ort_model, ort_wall, ort_rss, ort_pre = [], [], [], []
        for _ in range(a.runs):
            wall, rss, out, _ = wrapped(infer, env)
            m = re.search(r"\[(\d+) slices, preprocess ([\d.]+) s, model ([\d.]+) s", out)
            if not m:
                raise SystemExit(f"cannot parse infer output: {out}")
            tract_pre.append(float(m.group(2)))
            tract_model.append(float(m.group(3)))
            tract_wall.append(wall)
            tract_rss.append(rss)
            wall, rss, out, _ = wrapped(
                [sys.executable, __file__, "--ort-worker", series, str(a.threads), "1", model], env
            )
            r = json.loads(out)
            ort_model.append(r["model_median_s"])
            ort_pre.append(r["preprocess_s"])
            ort_wall.append(wall)
            ort_rss.append(rss)

        med = statistics.median
        print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus; "
              f"threads {a.threads}; runs {a.runs}; study {series} ({r['slices']} model slices); "
              f"onnxruntime {r['ort']}")
        print(f"{'':24}{'tract':>10}{'onnxruntime':>14}{'ratio':>8}")
        for label, t, o in [
            ("model latency s", tract_model, ort_model),
            ("preprocess s", tract_pre, ort_pre),
            ("whole infer s", tract_wall, ort_wall),
            ("peak RSS MiB", tract_rss, ort_rss),
        ]:
            print(f"{label:24}{med(t):>10.3f}{med(o):>14.3f}{med(t) / med(o):>8.2f}")

        if a.profile:
            _, _, _, err = wrapped(infer + ["--profile"], env)
            print("tract profile (one run):")
            print("\n".join(l for l in err.splitlines() if l.startswith(("profile", "  "))))


if __name__ == "__main__":
    main()
