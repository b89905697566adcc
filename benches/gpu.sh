#!/usr/bin/env bash
# GPU check: build with --features cuda, generate a study, run `infer` on CPU and on CUDA,
# print both model latencies and the largest difference between their results.
#
#   benches/gpu.sh                      # builds target/release/cspine-triage --features cuda
#   CSPINE_BIN=path/to/binary benches/gpu.sh   # use a binary built elsewhere (--features cuda)
#
# cuDNN and cuBLAS must be loadable (ldconfig, or LD_LIBRARY_PATH: on the machine measured in
# BENCHMARKS.md, the lib folders of the pip nvidia-* wheels next to PyTorch).
# Self-contained: needs only the tree, a CUDA driver + toolkit (NVRTC headers) and either
# cargo with the dependencies already fetched (CARGO_OFFLINE=1 adds --offline) or CSPINE_BIN.
# The study comes from `cspine-triage synth` (python3 + pydicom as a fallback).
# Record the output (card, latencies, difference) in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${CSPINE_BIN:-}
if [ -z "$BIN" ]; then
    cargo build --release --features cuda ${CARGO_OFFLINE:+--offline}
    BIN=target/release/cspine-triage
fi
THREADS=${THREADS:-$(nproc)}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if "$BIN" synth "$WORK/study" --count 1 --seed 4242 --fracture C5 >"$WORK/synth.log" 2>&1; then
    echo "study: cspine-triage synth --seed 4242 --fracture C5"
else
    echo "synth unavailable ($(tail -1 "$WORK/synth.log")); generating with pydicom"
    rm -rf "$WORK/study"
    python3 tests/python/infer_make_series.py "$WORK/study" --slices 80 --rows 256 --cols 256
fi

echo "card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not found')"
run() { # runtime, tag
    RUST_LOG=info "$BIN" infer --model models/model.json --runtime "$1" --threads "$THREADS" \
        --cuda-cache-dir "$WORK/cache" --json "$WORK/study" >"$WORK/$2.json" 2>"$WORK/$2.log" || {
        echo "infer --runtime $1 failed:"; cat "$WORK/$2.log"; exit 1; }
    grep -o "ready on runtime [a-z]*.*" "$WORK/$2.log" | head -1 | sed "s/^/  $2: /"
    grep -o "model slices, preprocess .*" "$WORK/$2.log" | sed "s/^/  $2: /"
}
run cpu cpu
run cuda cuda-cold   # first CUDA run compiles the kernels with NVRTC into the cache
run cuda cuda
python3 - "$WORK/cpu.json" "$WORK/cuda.json" <<'PY'
import json, sys
a, b = (json.loads(open(p).readline()) for p in sys.argv[1:3])
assert a["runtime"] == "cpu" and b["runtime"] == "cuda", (a["runtime"], b["runtime"])
diffs = {"patient": abs(a["patient"]["probability"] - b["patient"]["probability"])} if a["patient"] else {}
for v in a["vertebrae"]:
    diffs[v] = abs(a["vertebrae"][v]["probability"] - b["vertebrae"][v]["probability"])
worst = max(diffs, key=diffs.get) if diffs else None
print(f"status cpu={a['status']} cuda={b['status']}; key slice same: {a['key_slice'] == b['key_slice']}")
print(f"max |probability difference| cpu vs cuda: {diffs[worst]:.2e} ({worst})" if worst else "no probabilities (indeterminate)")
PY
