#!/usr/bin/env bash
# Fails if an ELF binary needs a glibc symbol version newer than the target's
# (default 2.31 = JetPack 5), or an unexpected shared library.
# Usage: cross/check-glibc.sh BINARY [MAX_GLIBC]
set -euo pipefail
BIN="${1:?usage: cross/check-glibc.sh BINARY [MAX_GLIBC]}"
MAX="${2:-2.31}"

OBJDUMP=aarch64-linux-gnu-objdump
command -v "$OBJDUMP" >/dev/null || OBJDUMP=objdump
command -v "$OBJDUMP" >/dev/null \
    || { echo "error: objdump missing: apt-get install binutils-aarch64-linux-gnu" >&2; exit 1; }

# Dynamic symbol table: every versioned reference, e.g. "GLIBC_2.28".
versions=$("$OBJDUMP" -T "$BIN" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -u -V || true)
[[ -n "$versions" ]] || { echo "error: no GLIBC symbol versions in $BIN (not a glibc binary?)" >&2; exit 1; }
newest=$(printf '%s\n' "$versions" | sed 's/GLIBC_//' | sort -V | tail -1)
echo "$BIN: newest GLIBC symbol version $newest (limit $MAX)"
if [[ "$(printf '%s\n%s\n' "$newest" "$MAX" | sort -V | tail -1)" != "$MAX" ]]; then
    echo "error: $BIN needs glibc $newest > $MAX; symbols:" >&2
    "$OBJDUMP" -T "$BIN" | grep -E "GLIBC_($(printf '%s\n' "$versions" | sed 's/GLIBC_//' \
        | awk -v m="$MAX" 'BEGIN{split(m,a,".")} {split($0,b,"."); if (b[1]>a[1] || (b[1]==a[1] && b[2]>a[2])) print}' \
        | sed 's/\./\\./g' | paste -sd'|'))\b" >&2 || true
    exit 1
fi

# libstdc++ (CharLS is C++): Ubuntu 20.04 / JetPack 5 ships GLIBCXX up to 3.4.28 (gcc 10).
# zig normally links libc++ statically, so this only matters for gcc-based builds.
MAX_GLIBCXX="${MAX_GLIBCXX:-3.4.28}"
cxx=$("$OBJDUMP" -T "$BIN" | grep -o 'GLIBCXX_[0-9][0-9.]*' | sed 's/GLIBCXX_//' | sort -u -V | tail -1 || true)
if [[ -n "$cxx" ]]; then
    echo "newest GLIBCXX symbol version $cxx (limit $MAX_GLIBCXX)"
    if [[ "$(printf '%s\n%s\n' "$cxx" "$MAX_GLIBCXX" | sort -V | tail -1)" != "$MAX_GLIBCXX" ]]; then
        echo "error: $BIN needs libstdc++ GLIBCXX_$cxx > $MAX_GLIBCXX" >&2
        exit 1
    fi
fi

# Shared libraries: only glibc's own, libgcc_s and libstdc++; a libsystemd/libcharls here
# would have to exist, in a compatible version, on the Jetson.
needed=$("$OBJDUMP" -p "$BIN" | awk '/NEEDED/ {print $2}')
echo "NEEDED: $(echo $needed)"
for lib in $needed; do
    case "$lib" in
        libc.so.6|libm.so.6|libdl.so.2|libpthread.so.0|librt.so.1|libgcc_s.so.1|libstdc++.so.6|ld-linux-aarch64.so.1|ld-linux-x86-64.so.2) ;;
        *) echo "error: $BIN needs $lib, which a stock JetPack rootfs may not provide" >&2; exit 1 ;;
    esac
done
echo "ok"
