#!/usr/bin/env bash
# What one small change in tract would give (BENCHMARKS.md, "Inference"): tract-linalg
# 0.23.9 packs an int8 im2col row that is wider than its 8/16-column panel one byte at a
# time (`KOut4Writer::write_slice`); tract-linalg-kout4.patch splits the row at panel
# boundaries instead. This script builds cspine-triage at HEAD against the patched crate
# (in target/kout4; the tree and its Cargo.lock are not touched), then times it against
# the normal release build on the same model and a C5-fracture phantom, alternated run by run
# (benches/infer_ab.py --bin-b), and prints the largest difference between the two
# builds' probabilities (the patch changes where bytes are written, not their values).
#
#   cargo build --release --locked && benches/upstream/tract_kout4.sh [PAIRS]
#   BUILD_ONLY=1 benches/upstream/tract_kout4.sh     (only the patched build, e.g. while the machine is busy)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PAIRS=${1:-15}
W=$ROOT/target/kout4
SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tract-linalg-0.23.9 2>/dev/null | head -1)
[ -n "$SRC" ] || { echo "tract-linalg 0.23.9 is not in cargo's registry: run cargo fetch first" >&2; exit 1; }
[ -x target/release/cspine-triage ] || { echo "build the baseline first: cargo build --release --locked" >&2; exit 1; }

# The patched copy is kept between runs (a fresh copy would rebuild tract); the tree is
# re-extracted with the commit's file times, so an unchanged HEAD is not rebuilt either.
STAMP=$(sha256sum benches/upstream/tract-linalg-kout4.patch | cut -c1-16)
if [ "$(cat "$W/tract-linalg/.kout4-patch" 2>/dev/null)" != "$STAMP" ]; then
  rm -rf "$W/tract-linalg"
  mkdir -p "$W"
  cp -r "$SRC" "$W/tract-linalg"
  patch -s -d "$W/tract-linalg" -p1 < benches/upstream/tract-linalg-kout4.patch
  echo "$STAMP" > "$W/tract-linalg/.kout4-patch"
fi
rm -rf "$W/tree"
mkdir -p "$W/tree"
git archive HEAD | tar -x -C "$W/tree"
(cd "$W/tree" && CARGO_TARGET_DIR="$W/target" cargo build --release --quiet \
  --config "patch.crates-io.tract-linalg.path=\"$W/tract-linalg\"")

[ "${BUILD_ONLY:-0}" = 1 ] && exit 0
# A fractured neck phantom, so that both builds produce probabilities to compare.
[ -f "$W/phantom/train.csv" ] || target/release/cspine-triage synth "$W/phantom" --count 1 --seed 7 \
  --fracture C5 --matrix 256 2>/dev/null
python3 benches/infer_ab.py --bin target/release/cspine-triage --bin-b "$W/target/release/cspine-triage" \
  --pairs "$PAIRS" --series "$(ls -d "$W"/phantom/train_images/*)" models/model.json models/model.json
