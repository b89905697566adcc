#!/usr/bin/env bash
# Release check of the two Jetson builds that docs/DEPLOYMENT.md promises, each run under
# qemu against the host build (cross/qemu-smoke.sh):
#   jetpack5-cpu        cross/build-aarch64.sh                     (glibc 2.31; CI runs it too)
#   jetpack6-cuda12060  cross/build-aarch64.sh --glibc 2.35 -- --features cuda-12060
# The CUDA build has no GPU under qemu: its `infer` (runtime gpu-or-cpu) must fall back to
# the CPU and agree with the host. Not in CI: the second build compiles every crate again
# (another glibc means another zig C toolchain, so every build script and C library is
# rebuilt), which CI's 90 minutes on 2 cores do not leave room for (BENCHMARKS.md, "Jetson
# builds"). Run it before a release and record the summary it prints there.
#
# Usage: cross/release-check.sh        (needs what cross/build-aarch64.sh and
#                                       cross/qemu-smoke.sh need; honours CARGO_BUILD_JOBS)
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${HOST_BIN:-target/debug/cspine-triage}
[[ -x "$HOST" ]] || cargo build --locked --bin cspine-triage
OUT=target/release-check
mkdir -p "$OUT"

summary=()
check() {
    local name=$1
    shift
    local start secs bin
    start=$(date +%s)
    bin=$(cross/build-aarch64.sh "$@" | tail -n 1)
    secs=$(($(date +%s) - start))
    cp "$bin" "$OUT/cspine-triage-$name" # both builds write the same path
    cross/qemu-smoke.sh "$OUT/cspine-triage-$name" "$HOST"
    summary+=("$name: built in $secs s ($(nproc) cores, CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-default}), $(stat -c %s "$bin") bytes, qemu smoke ok")
}
check jetpack5-cpu
check jetpack6-cuda12060 --glibc 2.35 -- --features cuda-12060

echo "== release check, $(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD)"
printf '%s\n' "${summary[@]}"
