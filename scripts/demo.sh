#!/usr/bin/env bash
# The whole appliance on one machine, no hospital needed: builds cspine-triage, starts
# `serve` with its embedded MQTT broker, generates a fractured and a clean phantom study,
# sends both over DICOM as a scanner would, and prints the results a dashboard receives.
# Everything it writes goes to demo-out/ (or $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out}
DICOM_PORT=${DICOM_PORT:-11112}
MQTT_PORT=${MQTT_PORT:-18830}

# PROFILE=dev reuses a debug build (faster to build, slower to run).
PROFILE=${PROFILE:-release}

# Prerequisites, checked before minutes of building: the C/C++ parts of the dependency
# tree (CharLS for JPEG-LS, aws-lc for MQTT TLS) are compiled by cmake + make + a C and
# a C++ compiler; pkg-config is asked for system libraries; python3 (standard library
# only) prints the summary. Run as root, this installs what is missing with apt-get;
# otherwise it prints the one apt-get command to run and stops. DCMTK is optional.
prereq_missing() { # prints the Debian/Ubuntu package of each missing tool
  command -v cmake >/dev/null || echo cmake
  command -v make >/dev/null || echo make
  command -v cc >/dev/null || command -v gcc >/dev/null || echo gcc
  command -v c++ >/dev/null || command -v g++ >/dev/null || echo g++
  command -v pkg-config >/dev/null || echo pkg-config
  command -v python3 >/dev/null || echo python3
}
missing=$(prereq_missing | tr '\n' ' ' | sed 's/ *$//')
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing missing build prerequisites: $missing"
    apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    missing=$(prereq_missing | tr '\n' ' ' | sed 's/ *$//')
    [ -z "$missing" ] || { echo "error: still missing after apt-get: $missing" >&2; exit 1; }
  else
    echo "error: missing build prerequisites: $missing" >&2
    echo "install them, then run this script again:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $missing" >&2
    exit 1
  fi
fi
rust_needed=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
rust_have=$( (rustc --version 2>/dev/null || true) | awk '{print $2}')
if ! command -v cargo >/dev/null || [ -z "$rust_have" ] ||
  [ "$(printf '%s\n%s\n' "$rust_needed" "$rust_have" | sort -V | head -n 1)" != "$rust_needed" ]; then
  echo "error: needs Rust >= $rust_needed (found: ${rust_have:-none}); Debian's rustc is older:" >&2
  echo "  install rustup (https://rustup.rs), then: rustup toolchain install stable" >&2
  exit 1
fi
# DCMTK's storescu when installed (pynetdicom installs another program of that name).
STORESCU=""
for candidate in /usr/bin/storescu "$(command -v storescu || true)"; do
  if [ -x "$candidate" ] && "$candidate" --version 2>&1 | grep -qi dcmtk; then
    STORESCU=$candidate
    break
  fi
done
[ -n "$STORESCU" ] ||
  echo "note: DCMTK not found (optional: apt-get install dcmtk); sending with cspine-triage send"

echo "== building ($PROFILE)"
cargo build --profile "$PROFILE" --locked --quiet
BIN=${CARGO_TARGET_DIR:-$PWD/target}/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/cspine-triage

rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

cat > "$OUT/config.toml" <<TOML
[dicom]
ae_title = "CSPINE"
bind = "127.0.0.1"
port = $DICOM_PORT
spool_dir = "$OUT/spool"

[series]
quiet_period_secs = 2.0

[inference]
model = "$PWD/models/model.json"

[alert]
site = "demo"
device = "box1"
outbox_dir = "$OUT/outbox"
embedded_broker_port = $MQTT_PORT
TOML
"$BIN" check-config "$OUT/config.toml" > /dev/null

echo "== generating two phantom studies (C5 fracture, no fracture)"
"$BIN" synth "$OUT/studies" --count 1 --seed 7 --fracture C5 --matrix 384 > /dev/null
"$BIN" synth "$OUT/studies-clean" --count 1 --seed 8 --fracture none --matrix 384 > /dev/null

echo "== starting the daemon (log: $OUT/serve.log)"
"$BIN" serve --config "$OUT/config.toml" > "$OUT/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill $SERVE_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q "ready" "$OUT/serve.log" && break
  kill -0 $SERVE_PID 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 0.2
done

echo "== subscribing as a dashboard would"
"$BIN" watch --mqtt "mqtt://127.0.0.1:$MQTT_PORT" --prefix "cspine/demo/box1/" --count 2 \
  --timeout 600 --keyimage-dir "$OUT/keyimages" > "$OUT/results.jsonl" 2> "$OUT/watch.log" &
WATCH_PID=$!
sleep 1

echo "== sending both studies over DICOM"
for study in "$OUT"/studies/train_images/* "$OUT"/studies-clean/train_images/*; do
  if [ -n "$STORESCU" ]; then
    "$STORESCU" -aec CSPINE -aet DEMO-CT +sd +r 127.0.0.1 "$DICOM_PORT" "$study"
  else
    "$BIN" send "127.0.0.1:$DICOM_PORT" "$study" --called-ae CSPINE --calling-ae DEMO-CT
  fi
done

echo "== waiting for both results"
wait $WATCH_PID
python3 - "$OUT/results.jsonl" <<'PY' 2>/dev/null || cat "$OUT/results.jsonl"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    flagged = [v for v, x in r.get("vertebrae", {}).items() if x["flagged"]]
    p = r.get("patient") or {}
    print(f'{r["status"]:>13}  p={p.get("probability", float("nan")):.3f}  flagged={",".join(flagged) or "-"}'
          f'  series={r["series_instance_uid"]}  key_slice_z={(r.get("key_slice") or {}).get("z_mm")}')
PY
echo "results: $OUT/results.jsonl   key images: $OUT/keyimages/   daemon log: $OUT/serve.log"
