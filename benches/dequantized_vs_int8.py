#!/usr/bin/env python3
"""The dequantized graph (what CUDA runs, `infer --graph dequantized`) against the int8 graph
(what the CPU runs), both in tract on the CPU, and against onnxruntime running the int8 file.

    cargo build
    python3 benches/dequantized_vs_int8.py [--bin target/debug/cspine-triage] [--seed 5150]
        [--count 10] [--seeds 2] [--realct ../shared/realct] [--realct-cases 4] [--threads 2]

Phantoms: `cspine-triage synth --seed SEED..SEED+seeds-1 --count COUNT --fracture random`
(about half fractured; seeds 5150+ are not used by models/training, see its README).
Real CT (optional, development data only): the first --realct-cases OpenKBP cases of the
"test" part, written as DICOM by models/training/realct_eval.py, run with --ignore-envelope.

Per series: both graphs through `infer --json --runtime cpu`; the largest |probability
difference| per output (patient, C1..C7), status and key-slice agreement. onnxruntime: the
numpy reference preprocessing (models/training/preprocess.py, equal to the Rust one to 1e-5,
tests/inference.rs) and the int8 file on onnxruntime's CPU provider, sigmoid of its logits
against both tract graphs' probabilities. Also the model time `infer` reports per graph.
"""

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models" / "training"))
VERTEBRAE = ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]


def infer(binary, model, graph, dirs, threads, ignore_envelope):
    cmd = [str(binary), "infer", "--json", "--runtime", "cpu", "--graph", graph,
           "--threads", str(threads), "--model", str(model), *map(str, dirs)]
    if ignore_envelope:
        cmd.insert(2, "--ignore-envelope")
    p = subprocess.run(cmd, capture_output=True, text=True, env={"RUST_LOG": "info", "PATH": "/usr/bin:/bin"})
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    results = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["series_instance_uid"]] = r
    model_s = [float(m) for m in re.findall(r"model ([0-9.]+) s on cpu", p.stderr)]
    return results, model_s


def probs(r):
    out = {}
    if r.get("patient"):
        out["patient"] = r["patient"]["probability"]
    for v, x in (r.get("vertebrae") or {}).items():
        out[v] = x["probability"]
    return out


def key(r):
    k = r.get("key_slice")
    return k and k["sop_instance_uid"]


def ort_probs(series_dirs):
    """SeriesInstanceUID -> {patient, C1..C7} from onnxruntime on the int8 file."""
    import onnxruntime as ort
    import pydicom
    import preprocess

    contract = json.loads((ROOT / "models" / "model.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(ROOT / "models" / contract["onnx"]), opts,
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    sig = lambda x: 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))  # noqa: E731
    out = {}
    for d in series_dirs:
        first = next(p for p in sorted(Path(d).rglob("*.dcm")))
        uid = pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID
        x = preprocess.preprocess(preprocess.load_dicom_series(d))
        o = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))
        p = {"patient": float(sig(o["patient_logit"]).reshape(-1)[0])}
        p.update({v: float(s) for v, s in zip(VERTEBRAE, sig(o["vertebra_logits"]).reshape(-1))})
        out[uid] = p
    return out


def compare(label, a, b, worst):
    """Updates worst[output] with |a - b| over the series both have."""
    for uid in a.keys() & b.keys():
        pa, pb = probs(a[uid]) if "status" in a[uid] else a[uid], probs(b[uid]) if "status" in b[uid] else b[uid]
        for name in pa.keys() & pb.keys():
            d = abs(pa[name] - pb[name])
            if d > worst.setdefault(label, {}).get(name, (0.0, None))[0]:
                worst[label][name] = (d, uid)


def report(title, int8, deq, ort_p, times):
    print(f"== {title}: {len(int8)} series")
    same_status = sum(int8[u]["status"] == deq[u]["status"] for u in int8)
    same_key = sum(key(int8[u]) == key(deq[u]) for u in int8)
    statuses = {}
    for u in int8:
        statuses[int8[u]["status"]] = statuses.get(int8[u]["status"], 0) + 1
    print(f"status agreement {same_status}/{len(int8)} (int8 statuses {statuses}); "
          f"key slice agreement {same_key}/{len(int8)}")
    for u in int8:
        if int8[u]["status"] != deq[u]["status"] or key(int8[u]) != key(deq[u]):
            print(f"  differs: {u}: status {int8[u]['status']} / {deq[u]['status']}, "
                  f"probabilities int8 {probs(int8[u])} dequantized {probs(deq[u])}")
    worst = {}
    compare("dequantized vs int8 (tract)", deq, int8, worst)
    if ort_p is not None:
        compare("int8 tract vs onnxruntime", int8, ort_p, worst)
        compare("dequantized vs onnxruntime int8", deq, ort_p, worst)
    for label, w in worst.items():
        cells = ", ".join(f"{n} {w[n][0]:.1e}" for n in ["patient", *VERTEBRAE] if n in w)
        top = max(w.values(), default=(0.0, None))[0]
        print(f"max |probability difference| {label}: {top:.2e} ({cells})")
    for g, t in times.items():
        if t:
            print(f"model time on cpu, graph {g}: median {np.median(t):.2f} s over {len(t)} series")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "debug" / "cspine-triage")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "model.json")
    ap.add_argument("--seed", type=int, default=5150)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--realct", type=Path, default=ROOT.parent / "shared" / "realct")
    ap.add_argument("--realct-cases", type=int, default=4)
    ap.add_argument("--no-ort", action="store_true")
    args = ap.parse_args()
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, bin {args.bin}, threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = []
        for s in range(args.seed, args.seed + args.seeds):
            out = tmp / f"synth{s}"
            subprocess.run([str(args.bin), "synth", str(out), "--count", str(args.count),
                            "--seed", str(s), "--fracture", "random", "--threads", "1"],
                           check=True, capture_output=True)
            dirs += sorted(p for p in (out / "train_images").iterdir() if p.is_dir())
        int8, t8 = infer(args.bin, args.model, "int8", dirs, args.threads, False)
        deq, tq = infer(args.bin, args.model, "dequantized", dirs, args.threads, False)
        ort_p = None if args.no_ort else ort_probs(dirs)
        report(f"phantoms (synth --seed {args.seed}..{args.seed + args.seeds - 1} "
               f"--count {args.count} --fracture random)", int8, deq, ort_p,
               {"int8": t8, "dequantized": tq})
        if args.realct_cases and (args.realct / "openkbp-train").is_dir():
            import realct_eval
            picked = [c for c in realct_eval.cases(args.realct) if c[1] == "test"][: args.realct_cases]
            rdirs = []
            for case, _, ct, _ in picked:
                d = tmp / "realct" / case
                realct_eval.write_series(ct, d, case)
                rdirs.append(d)
            int8, t8 = infer(args.bin, args.model, "int8", rdirs, args.threads, True)
            deq, tq = infer(args.bin, args.model, "dequantized", rdirs, args.threads, True)
            ort_p = None if args.no_ort else ort_probs(rdirs)
            report(f"real CT ({', '.join(c[0] for c in picked)}; --ignore-envelope)",
                   int8, deq, ort_p, {"int8": t8, "dequantized": tq})


if __name__ == "__main__":
    main()
