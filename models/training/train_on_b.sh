#!/usr/bin/env bash
# Cross-generator protocol, the training half: train the shipped architecture from random
# weights on phantom family B (phantoms_b/) with from_scratch.sh's recipe, then test it on
# both families with cross_generator.py (the "train on B, test on A" numbers). From the repo root:
#   cargo build && bash models/training/train_on_b.sh /tmp/cspine-train-b
# Not run yet (MODEL_CARD.md, "Generalisation, measured"): the shared CPU does not allow it.
# Cost on 2 free cores: family-B generation about 11 s and 1-2 GB per study per worker (1000
# training + 100 validation studies: about 1.5 h with 2 workers), then stage A + stage B
# training as from_scratch.sh (32-34 min), export, int8, and the evaluation (~15 min).
# Seeds: training 9200-9224 (40 studies each, ~50 % fractured), validation 9300 (100, half
# fractured); cross_generator.py's held-out sets are A 9000 and B 9100, never trained on.
# STEPS_A=..., INIT_SEED=..., SEED_A=..., SEED_B=..., CRACK_SLICES=...: as in from_scratch.sh.
set -euo pipefail
W=${1:?work dir}
BIN=${BIN:-$PWD/target/debug/cspine-triage}
PY=${PY:-python3}
WORKERS=${WORKERS:-2}
STEPS_A=${STEPS_A:-7500}
INIT_SEED=${INIT_SEED:-0}
SEED_A=${SEED_A:-21}
SEED_B=${SEED_B:-23}
CRACK_SLICES=${CRACK_SLICES:-8}
cd "$(dirname "$0")"
. ./recipe_lib.sh
D=$W/data C=$W/cache R=$W/runs M=$W/model
mkdir -p "$D" "$C" "$R" "$M"
export OMP_NUM_THREADS=1

# 1. Family-B phantoms; each training chunk cached (uint8, ~1 MB a study) and its DICOM deleted.
gen() { [ -f "$1/train.csv" ] || "$PY" -m phantoms_b "$@" --workers "$WORKERS" >/dev/null; }
TRAIN=()
for s in $(seq 9200 9224); do
  gen "$D/b$s" --count 40 --seed "$s" --fracture random
  cache_root "$D/b$s"
  TRAIN+=("$D/b$s")
done
gen "$D/val" --count 100 --seed 9300 --fracture half

# 2-4. Random weights in the shipped architecture, stage A, stage B: from_scratch.sh's steps.
random_init "$R/random_init.pt" "$INIT_SEED"
"$PY" train.py --init "$R/random_init.pt" --data "${TRAIN[@]}" --cached-only --val-data "$D/val" --cache "$C" \
  --out "$R/b_a" --window 40 --steps-a "$STEPS_A" --crack-slices "$CRACK_SLICES" --steps-b 0 --eval-every 3000 --ema 0.999 \
  --frac-hires 16 --seed "$SEED_A" --threads 2 --mil-weight 1 --frac-loss balanced --frac-weight 1 --hard-negatives 64
"$PY" train.py --init "$R/b_a/ema_a_$STEPS_A.pt" --data "${TRAIN[@]:0:17}" --cached-only --val-data "$D/val" \
  --cache "$C" --out "$R/b_b" --steps-a 0 --steps-b 1500 --eval-every-b 500 --seed "$SEED_B" --threads 2

# 5. fp32 ONNX, int8 (calibrated on 8 family-B training studies), a model.json naming it (the
#    shipped contract with this file's sha256: thresholds are the shipped model's, so only the
#    AUCs and localisation apply), then both held-out families through the product path.
"$PY" export.py "$R/b_b/model.pt" "$R/b_b/model_fp32.onnx"
"$PY" quantize.py "$R/b_b/model_fp32.onnx" "$M/model_int8.onnx" --data "${TRAIN[0]}" --cache "$C" --calib 8
"$PY" -c "
import json
from contract import sha256_file
m = json.load(open('../model.json'))
m.update(name=m['name'] + '-trained-on-b', onnx='model_int8.onnx', sha256=sha256_file('$M/model_int8.onnx'))
json.dump(m, open('$M/model.json', 'w'), indent=2)"
cd ../..
"$PY" models/training/cross_generator.py --bin "$BIN" --model "$M/model.json" --out "$W/cross_generator"
