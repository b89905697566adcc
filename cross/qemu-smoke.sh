#!/usr/bin/env bash
# Runs an aarch64 build of cspine-triage under qemu-user and compares it with the host
# build: --version, check-config, synth, and `infer --json` on the same generated study
# (probabilities within a tolerance: float summation order differs between the NEON and
# AVX kernels).
# Usage: cross/qemu-smoke.sh AARCH64_BIN [HOST_BIN]   (HOST_BIN default: target/debug/cspine-triage)
# Needs: apt-get install qemu-user libc6-arm64-cross   (the aarch64 glibc for -L)
set -euo pipefail
cd "$(dirname "$0")/.."
ARM="${1:?usage: cross/qemu-smoke.sh AARCH64_BIN [HOST_BIN]}"
HOST="${2:-target/debug/cspine-triage}"
SYSROOT="${QEMU_LD_PREFIX:-/usr/aarch64-linux-gnu}"
TOL="${CSPINE_QEMU_TOL:-0.001}"

command -v qemu-aarch64 >/dev/null || { echo "error: qemu-aarch64 missing: apt-get install qemu-user" >&2; exit 1; }
[[ -e "$SYSROOT/lib/ld-linux-aarch64.so.1" ]] \
    || { echo "error: no aarch64 glibc in $SYSROOT: apt-get install libc6-arm64-cross" >&2; exit 1; }
[[ -x "$HOST" ]] || { echo "error: host binary $HOST missing: cargo build" >&2; exit 1; }
arm() { qemu-aarch64 -L "$SYSROOT" "$ARM" "$@"; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== --version"
arm --version
[[ "$(arm --version)" == "$("$HOST" --version)" ]] || { echo "error: versions differ" >&2; exit 1; }

echo "== check-config systemd/config.toml"
arm check-config systemd/config.toml >"$WORK/arm.toml"
"$HOST" check-config systemd/config.toml >"$WORK/host.toml"
diff -u "$WORK/host.toml" "$WORK/arm.toml"

echo "== synth (host and aarch64, same seed)"
start=$(date +%s)
"$HOST" synth "$WORK/study-host" --count 1 --seed 7 --fracture C2 --matrix 256
arm synth "$WORK/study-arm" --count 1 --seed 7 --fracture C2 --matrix 256
echo "aarch64 synth under qemu: $(( $(date +%s) - start )) s (host + qemu)"
n_host=$(find "$WORK/study-host" -type f | wc -l); n_arm=$(find "$WORK/study-arm" -type f | wc -l)
echo "files: host $n_host, aarch64 $n_arm"
[[ "$n_host" -gt 0 && "$n_host" == "$n_arm" ]] || { echo "error: synth outputs differ in file count" >&2; exit 1; }
if diff -rq "$WORK/study-host" "$WORK/study-arm" >/dev/null; then
    echo "synth output byte-identical"
else
    echo "note: synth output not byte-identical (libm rounding); infer compares on the host study"
fi

echo "== infer --json on the host-generated study"
# synth writes OUT/train_images/<StudyInstanceUID>/...
"$HOST" infer --model models/model.json --json "$WORK"/study-host/train_images/* >"$WORK/host.json"
start=$(date +%s)
arm infer --model models/model.json --json "$WORK"/study-host/train_images/* >"$WORK/arm.json"
echo "aarch64 infer under qemu: $(( $(date +%s) - start )) s"
python3 - "$WORK/host.json" "$WORK/arm.json" "$TOL" <<'PY'
import json, sys

def load(path):
    text = open(path).read().strip()
    try:
        doc = json.loads(text)
        return doc if isinstance(doc, list) else [doc]
    except json.JSONDecodeError:  # one JSON object per line
        return [json.loads(l) for l in text.splitlines() if l.strip()]

host, arm, tol = load(sys.argv[1]), load(sys.argv[2]), float(sys.argv[3])
assert len(host) == len(arm) > 0, f"result counts differ: {len(host)} vs {len(arm)}"
worst = 0.0
for h, a in zip(host, arm):
    for key in ("status", "study_instance_uid", "series_instance_uid"):
        assert h.get(key) == a.get(key), f"{key}: {h.get(key)!r} vs {a.get(key)!r}"
    pairs = [(f"vertebrae.{k}", v, a["vertebrae"][k]) for k, v in (h.get("vertebrae") or {}).items()]
    if h.get("patient"):
        pairs.append(("patient", h["patient"], a["patient"]))
    for name, hv, av in pairs:
        d = abs(hv["probability"] - av["probability"])
        worst = max(worst, d)
        assert d <= tol, f"{name}.probability {hv['probability']} vs {av['probability']} (> {tol})"
        thr = hv.get("threshold")
        near = thr is not None and abs(hv["probability"] - thr) <= tol
        assert near or hv["flagged"] == av["flagged"], f"{name}.flagged differs"
    hk, ak = h.get("key_slice"), a.get("key_slice")
    assert (hk or {}).get("sop_instance_uid") == (ak or {}).get("sop_instance_uid"), "key slice differs"
print(f"infer: {len(host)} result(s) agree; largest probability difference {worst:.2e} (tolerance {tol})")
PY
echo "ok: aarch64 build matches the host build"
