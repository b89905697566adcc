#!/usr/bin/env bash
# GPU check: build with --features cuda, generate studies, run `infer` on CPU and on CUDA,
# print each study's model latency on both and the largest difference between their results.
# CUDA runs the dequantized graph (int8 weights dequantized to float at load, `--graph auto`;
# src/inference/dequantize.rs) and the CPU the int8 file as shipped; the last run shows what
# the default runtime gpu-or-cpu picks after its start-up probe.
#
#   benches/gpu.sh                      # builds target/release/cspine-triage --features cuda
#                                       # (on a Jetson: cuda-12060, JetPack 6; CUDA_FEATURE=...)
#   CSPINE_BIN=path/to/binary benches/gpu.sh   # use a binary built elsewhere (a CUDA feature)
#   MODEL=other/model.json              # another contract (default: the committed model)
#   STUDIES=3                           # studies per run; the first of each run warms up
#   CUDA_GRAPH=int8                     # run the int8 graph on CUDA too (default: auto)
#   CUDA_CACHE=DIR                      # keep NVRTC's kernels between runs (default: a
#                                       # temporary folder, so the first CUDA start is cold)
#
# cuDNN and cuBLAS must be loadable (ldconfig, or LD_LIBRARY_PATH: on the machines measured in
# BENCHMARKS.md, the lib folders of the pip nvidia-* wheels next to PyTorch).
# Self-contained: needs only the tree, a CUDA driver + toolkit (NVRTC headers) and either
# cargo with the dependencies already fetched (CARGO_OFFLINE=1 adds --offline) or CSPINE_BIN.
# The studies come from `cspine-triage synth` (python3 + pydicom as a fallback).
# Record the output (card, latencies, difference) in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${CSPINE_BIN:-}
# The CUDA level: on a Jetson (L4T, /etc/nv_tegra_release) JetPack 6's CUDA 12.6, elsewhere
# CUDA 13 (`cuda`); CUDA_FEATURE overrides (docs/DEPLOYMENT.md, "GPU").
if [ -z "${CUDA_FEATURE:-}" ]; then
    if [ -f /etc/nv_tegra_release ]; then CUDA_FEATURE=cuda-12060; else CUDA_FEATURE=cuda; fi
fi
if [ -z "$BIN" ]; then
    cargo build --release --features "$CUDA_FEATURE" ${CARGO_OFFLINE:+--offline}
    BIN=target/release/cspine-triage
fi
MODEL=${MODEL:-models/model.json}
STUDIES=${STUDIES:-3}
THREADS=${THREADS:-$(nproc)}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
CACHE=${CUDA_CACHE:-$WORK/cache}

if "$BIN" synth "$WORK/study" --count "$STUDIES" --seed 4242 --fracture C5 >"$WORK/synth.log" 2>&1; then
    echo "studies: cspine-triage synth --count $STUDIES --seed 4242 --fracture C5"
else
    echo "synth unavailable ($(tail -1 "$WORK/synth.log")); generating one study with pydicom"
    rm -rf "$WORK/study"
    python3 tests/python/infer_make_series.py "$WORK/study" --slices 80 --rows 256 --cols 256
fi

# synth writes RSNA's layout; only train_images/ holds DICOM
SERIES=$WORK/study; [ -d "$SERIES/train_images" ] && SERIES=$SERIES/train_images
if command -v nvidia-smi >/dev/null; then
    echo "card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
elif [ -f /etc/nv_tegra_release ]; then  # Jetson: no nvidia-smi
    echo "card: $(tr -d '\0' </proc/device-tree/model 2>/dev/null), $(head -1 /etc/nv_tegra_release)"
else
    echo "card: nvidia-smi not found"
fi
echo "model: $MODEL ($(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$MODEL"))"
run() { # runtime, tag
    RUST_LOG=info "$BIN" infer --model "$MODEL" --runtime "$1" --graph "${CUDA_GRAPH:-auto}" --threads "$THREADS" \
        --cuda-cache-dir "$CACHE" --json "$SERIES" >"$WORK/$2.json" 2>"$WORK/$2.log" || {
        echo "infer --runtime $1 failed:"; cat "$WORK/$2.log"; exit 1; }
    grep -o "ready on runtime [a-z]*.*" "$WORK/$2.log" | head -1 | sed "s/^/  $2: /"
    grep -o "[0-9]* model slices, preprocess .*" "$WORK/$2.log" | sed "s/^/  $2: /"
}
run cpu cpu
run cuda cuda-first  # with an empty cache, NVRTC compiles the kernels here
run cuda cuda
run gpu-or-cpu probe
grep -o "runtime gpu-or-cpu: .*" "$WORK/probe.log" | sed "s/^/  probe: /" || true
python3 - "$WORK/cpu.json" "$WORK/cuda.json" <<'PY'
import json, sys
cpu, cuda = ({r["series_instance_uid"]: r for r in map(json.loads, filter(str.strip, open(p)))}
             for p in sys.argv[1:3])
assert cpu.keys() == cuda.keys(), "CPU and CUDA analysed different series"
worst, compared = (0.0, None), 0
for uid, a in cpu.items():
    b = cuda[uid]
    assert a["runtime"] == "cpu" and b["runtime"] == "cuda", (a["runtime"], b["runtime"])
    diffs = {"patient": abs(a["patient"]["probability"] - b["patient"]["probability"])} if a["patient"] else {}
    for v in a["vertebrae"]:
        diffs[v] = abs(a["vertebrae"][v]["probability"] - b["vertebrae"][v]["probability"])
    print(f"status cpu={a['status']} cuda={b['status']}; key slice same: {a['key_slice'] == b['key_slice']}")
    for name, d in diffs.items():
        compared += 1
        if worst[1] is None or d > worst[0]:
            worst = (d, name)
print(f"max |probability difference| cpu vs cuda, {len(cpu)} studies: {worst[0]:.2e} ({worst[1]})"
      if compared else "no probabilities (all indeterminate)")
PY
