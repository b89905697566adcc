#!/usr/bin/env bash
# Cross-builds cspine-triage for aarch64-unknown-linux-gnu (NVIDIA Jetson) without Docker,
# linked against an old enough glibc for the JetPack release on the box:
#   JetPack 5 (L4T r35, Ubuntu 20.04): glibc 2.31   <- the default
#   JetPack 6 (L4T r36, Ubuntu 22.04): glibc 2.35
#
# How: cargo-zigbuild uses zig as the C/C++ compiler and linker; zig ships glibc stubs for
# any version, so `--target aarch64-unknown-linux-gnu.2.31` links against glibc 2.31 symbol
# versions, whatever the host has (Debian 12's gcc-aarch64-linux-gnu sysroot is glibc 2.36,
# too new for JetPack 5). The C/C++ dependencies (CharLS for JPEG-LS via cmake, OpenJPEG
# via the openjp2 crate, aws-lc for MQTT TLS) are compiled by the same zig toolchain.
#
# Usage: cross/build-aarch64.sh [--glibc 2.31|2.35] [--profile release|dev] [-- cargo args...]
#   e.g. cross/build-aarch64.sh --glibc 2.35 -- --features cuda-12060
# Prints the path of the built binary on the last line. Then runs cross/check-glibc.sh.
# Honours CARGO_TARGET_DIR (a separate one lets host builds run meanwhile without waiting
# for cargo's build-directory lock).
#
# Needs (once): rustup target add aarch64-unknown-linux-gnu
#               cargo install --locked cargo-zigbuild
#               pip install ziglang        (or any zig 0.13+ on PATH)
#               cmake                      (apt-get install cmake; builds CharLS)
set -euo pipefail

GLIBC=2.31
PROFILE=release
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --glibc) GLIBC="$2"; shift 2 ;;
        --profile) PROFILE="$2"; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

TARGET=aarch64-unknown-linux-gnu
cd "$(dirname "$0")/.."

die() { echo "error: $*" >&2; exit 1; }
rustup target list --installed 2>/dev/null | grep -qx "$TARGET" \
    || die "Rust target $TARGET missing: run 'rustup target add $TARGET'"
command -v cargo-zigbuild >/dev/null \
    || die "cargo-zigbuild missing: run 'cargo install --locked cargo-zigbuild'"
if ! command -v zig >/dev/null && ! python3 -m ziglang version >/dev/null 2>&1; then
    die "zig missing: run 'pip install ziglang' (or put zig on PATH)"
fi
command -v cmake >/dev/null || die "cmake missing (builds CharLS): run 'apt-get install cmake'"

case "$PROFILE" in
    release) PROFILE_ARGS=(--release); OUT_DIR=release ;;
    dev) PROFILE_ARGS=(); OUT_DIR=debug ;;
    *) die "--profile must be release or dev, got $PROFILE" ;;
esac

echo "building $TARGET against glibc $GLIBC ($PROFILE profile)" >&2
start=$(date +%s)
cargo zigbuild --locked --target "$TARGET.$GLIBC" "${PROFILE_ARGS[@]}" \
    --bin cspine-triage "${EXTRA[@]}" >&2
echo "aarch64 build took $(( $(date +%s) - start )) s" >&2

BIN="${CARGO_TARGET_DIR:-target}/$TARGET/$OUT_DIR/cspine-triage"
[[ -x "$BIN" ]] || die "build finished but $BIN is missing"
cross/check-glibc.sh "$BIN" "$GLIBC" >&2
echo "$BIN"
