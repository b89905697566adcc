#!/usr/bin/env bash
# Ingest throughput: DCMTK storescu -> cspine-triage SCP (fsync + directory fsync before
# every Success) vs the same storescu -> DCMTK storescp (no fsync), same files, same
# disk, same max PDU, TCP_NODELAY=1, in the same run. Prints instances/s, MB/s and the
# ratio ours / storescp (median of RUNS alternating runs). Not a test: numbers depend on
# the disk (fsync latency) and on whatever else the machine is doing.
#
#   benches/ingest.sh                 # 300 slices of 512x512 int16, 3 runs each
#   SLICES=100 RUNS=5 benches/ingest.sh
#   BIN=target/debug/cspine-triage benches/ingest.sh   # default: target/release (built if missing)
#   NOSYNC=1 benches/ingest.sh        # ours with fsync/fdatasync made no-ops (LD_PRELOAD):
#                                     # NOT durable, only splits the cost (needs cc)
#
# Needs: DCMTK (storescu, storescp, echoscu), python3 with pydicom + numpy.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SLICES=${SLICES:-300}
SIZE=${SIZE:-512}
RUNS=${RUNS:-3}
PDU=${PDU:-65536}
BIN=${BIN:-$ROOT/target/release/cspine-triage}
# DCMTK, not same-named Python tools that may come first on PATH.
DCMTK_BIN=${DCMTK_BIN:-/usr/bin}
for t in storescu storescp echoscu; do
    v=$("$DCMTK_BIN/$t" --version 2>&1 || true)
    [[ ${v,,} == *dcmtk* ]] ||
        { echo "DCMTK $t not found in $DCMTK_BIN (apt-get install dcmtk, or set DCMTK_BIN)" >&2; exit 1; }
done
if [ ! -x "$BIN" ]; then
    echo "building release binary..." >&2
    (cd "$ROOT" && cargo build --release --bin cspine-triage)
fi

# Everything under one directory: the series and both receivers' outputs share a disk.
WORK=$(mktemp -d "${BENCH_DIR:-$ROOT/target}/ingest-bench.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

PRELOAD=
OURS_LABEL="cspine-triage (fsync per instance)"
if [ "${NOSYNC:-0}" = 1 ]; then
    printf 'int fsync(int fd){(void)fd;return 0;}\nint fdatasync(int fd){(void)fd;return 0;}\n' >"$WORK/nosync.c"
    cc -shared -fPIC -O2 -o "$WORK/nosync.so" "$WORK/nosync.c"
    PRELOAD=$WORK/nosync.so
    OURS_LABEL="cspine-triage (fsync OFF, not durable)"
fi

echo "generating $SLICES slices of ${SIZE}x${SIZE} int16 in $WORK/series" >&2
python3 "$ROOT/tests/python/scp_make_series.py" "$WORK/series" --slices "$SLICES" --size "$SIZE"
BYTES=$(cat "$WORK"/series/*.dcm | wc -c)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_echo() { # port
    for _ in $(seq 1 200); do
        "$DCMTK_BIN/echoscu" -aec CSPINE 127.0.0.1 "$1" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "receiver on port $1 did not come up" >&2; return 1
}
now() { date +%s.%N; }

send() { # port -> seconds
    local t0 t1
    t0=$(now)
    TCP_NODELAY=1 "$DCMTK_BIN/storescu" -aec CSPINE -pdu "$PDU" 127.0.0.1 "$1" "$WORK"/series/*.dcm
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f\n", b - a }'
}

run_ours() { # run index -> seconds
    local port dir pid secs
    port=$(free_port); dir="$WORK/ours-$1"; mkdir -p "$dir"
    cat >"$dir/cspine.toml" <<EOF
[dicom]
bind = "127.0.0.1"
port = $port
spool_dir = "$dir/spool"
max_pdu_length = $PDU
min_free_space_mb = 0

[inference]
model = "$ROOT/models/model.json"
EOF
    # A shell with RUST_BACKTRACE=1 makes every end-of-data-set EOF inside dicom-parser
    # capture a backtrace (a few % of the receive path); the service runs without it.
    RUST_LOG=warn LD_PRELOAD=$PRELOAD env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE "$BIN" serve --config "$dir/cspine.toml" 2>"$dir/log" &
    pid=$!; PIDS+=("$pid")
    wait_echo "$port" || { cat "$dir/log" >&2; exit 1; }
    secs=$(send "$port")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    local n; n=$(find "$dir/spool" -name '*.dcm' | wc -l)
    [ "$n" -eq "$SLICES" ] || { echo "ours stored $n of $SLICES" >&2; cat "$dir/log" >&2; exit 1; }
    rm -rf "$dir"
    echo "$secs"
}

run_storescp() { # run index, extra storescp options -> seconds
    local port dir pid secs
    port=$(free_port); dir="$WORK/storescp-$1"; mkdir -p "$dir"
    shift
    TCP_NODELAY=1 "$DCMTK_BIN/storescp" -aet CSPINE -pdu "$PDU" -od "$dir" "$@" "$port" 2>"$WORK/storescp.log" &
    pid=$!; PIDS+=("$pid")
    wait_echo "$port"
    secs=$(send "$port")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    local n; n=$(find "$dir" -type f | wc -l)
    [ "$n" -eq "$SLICES" ] || { echo "storescp stored $n of $SLICES" >&2; exit 1; }
    rm -rf "$dir"
    echo "$secs"
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

ours=(); dcmtk=(); dcmtk_bp=()
for i in $(seq 1 "$RUNS"); do
    # Alternate the receivers so drift (page cache, other load) hits all of them alike.
    ours+=("$(run_ours "$i")")
    dcmtk+=("$(run_storescp "$i")")
    dcmtk_bp+=("$(run_storescp "bp$i" +B)")
    echo "run $i: ours ${ours[-1]} s, storescp ${dcmtk[-1]} s, storescp +B ${dcmtk_bp[-1]} s" >&2
done

report() { # name, median seconds
    awk -v name="$1" -v s="$2" -v n="$SLICES" -v b="$BYTES" \
        'BEGIN { printf "%-34s %8.3f s %8.1f instances/s %8.1f MB/s\n", name, s, n/s, b/s/1e6 }'
}
m_ours=$(printf '%s\n' "${ours[@]}" | median)
m_dcmtk=$(printf '%s\n' "${dcmtk[@]}" | median)
m_bp=$(printf '%s\n' "${dcmtk_bp[@]}" | median)
echo
echo "ingest: $SLICES instances, $((BYTES / 1000000)) MB, max PDU $PDU, median of $RUNS runs, $(nproc) cores"
report "$OURS_LABEL" "$m_ours"
report "storescp (no fsync)" "$m_dcmtk"
report "storescp +B (no fsync)" "$m_bp"
awk -v a="$m_ours" -v b="$m_dcmtk" -v c="$m_bp" \
    'BEGIN { printf "ratio ours/storescp throughput: %.2fx (vs +B: %.2fx)\n", b/a, c/a }'

# What no receiver that answers after an fsync can beat on this disk: the spool's
# file-system steps alone (write, fdatasync, link, directory fsync), no network, no parsing.
floors=$(python3 "$ROOT/benches/durable_floor.py" "$WORK" "$SLICES" "$RUNS" | tail -n 1)
floor=$(echo "$floors" | awk '{ for (i = 1; i <= NF; i++) if ($i == "durable") print $(i + 1) }')
journal=$(echo "$floors" | awk '{ for (i = 1; i <= NF; i++) if ($i == "journal") print $(i + 1) }')
awk -v f="$floor" -v s="$m_dcmtk" -v n="$SLICES" \
    'BEGIN { printf "durable floor (write + fdatasync + link + dir fsync, no network): %.3f ms/instance; storescp: %.3f ms/instance; best possible ratio here: %.2fx\n", f, s / n * 1000, (s / n * 1000) / f }'
awk -v f="$journal" -v s="$m_dcmtk" -v n="$SLICES" \
    'BEGIN { printf "write-ahead journal floor (overwrite a synced segment + fdatasync, not built): %.3f ms/instance; best possible ratio with it: %.2fx\n", f, (s / n * 1000) / f }'
