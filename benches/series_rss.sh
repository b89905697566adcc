#!/usr/bin/env bash
# Peak memory of building a 700 x 512 x 512 CT volume (target: <= ~2x its int16 size),
# against pydicom + numpy building the same HU volume in the same run.
#
# usage: benches/series_rss.sh [SLICES] [SIZE]
# Needs python3 with pydicom and numpy, and GNU time (/usr/bin/time). Set PROFILE=release
# to measure an optimised build (memory does not depend on the profile; time does).
set -euo pipefail
cd "$(dirname "$0")/.."
slices=${1:-700}
size=${2:-512}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

profile_flag=()
[[ "${PROFILE:-dev}" == release ]] && profile_flag=(--release)
cargo build -q "${profile_flag[@]}" --bench series_volume
bin=$(cargo build "${profile_flag[@]}" --bench series_volume --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "series_volume" and m.get("executable"):
        print(m["executable"])')

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), profile ${PROFILE:-dev}"
python3 benches/series_make_big.py "$work/series" "$slices" "$size"
echo "series: $slices x $size x $size, $(du -sm "$work/series" | cut -f1) MB on disk"

/usr/bin/time -f "ours: max_rss_kib=%M wall_s=%e" "$bin" "$work/series"

cat > "$work/peer.py" <<'PY'
import os, sys, time
import numpy as np, pydicom
d = sys.argv[1]
t = time.time()
dss = [pydicom.dcmread(os.path.join(d, f)) for f in os.listdir(d)]
dss.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
vol = np.stack([(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.int16) for ds in dss])
print(f"peer (pydicom read all, sort, np.stack): shape={vol.shape} build_s={time.time() - t:.2f}")
PY
/usr/bin/time -f "peer: max_rss_kib=%M wall_s=%e" python3 "$work/peer.py" "$work/series"
