#!/usr/bin/env bash
# `cargo deny check` (advisories, licenses, bans, sources; the policy is deny.toml) with
# the RustSec advisory database taken from a snapshot committed in this repository
# (supply-chain/advisory-db.tar.gz, its commit and date in supply-chain/advisory-db.snapshot).
#
# Why a snapshot: cargo-deny (like cargo-audit) clones the database from GitHub on every
# run, and our CI machines and developer boxes reach crates.io but not GitHub, so
# `cargo deny fetch` fails there. The snapshot is unpacked into a temporary database root
# laid out as cargo-deny keeps a fetched clone (`<db-path>/advisory-db-<hash of the URL>`
# with `.git/FETCH_HEAD` dated at the snapshot's commit), and cargo-deny runs with
# --offline (which is what stops it fetching the database; crates come from `cargo fetch`
# first, which needs crates.io only), so its staleness limit (`maximum-db-staleness` in
# deny.toml) measures the snapshot's real age. Where GitHub is reachable, plain `cargo deny check` uses a
# fresh clone instead.
#
#   scripts/cargo-deny.sh                      # all four checks (what .ci/run runs)
#   scripts/cargo-deny.sh licenses bans        # some of them
#   scripts/cargo-deny.sh --refresh DIR        # new snapshot from a checkout of
#                                              # https://github.com/rustsec/advisory-db
set -euo pipefail
cd "$(dirname "$0")/.."
SNAPSHOT=supply-chain/advisory-db.tar.gz
INFO=supply-chain/advisory-db.snapshot
# cargo-deny's directory name for its default database URL
# (https://github.com/rustsec/advisory-db): the last path segment and the XxHash64 of the URL.
DB_DIR=advisory-db-3157b0e258782691
# Warn when the snapshot is older than this (deny.toml's maximum-db-staleness fails).
WARN_DAYS=90

if [ "${1:-}" = --refresh ]; then
  src=${2:?usage: scripts/cargo-deny.sh --refresh PATH-TO-ADVISORY-DB-CHECKOUT}
  mkdir -p supply-chain
  # Only what cargo-deny reads (crates/) and the database's licence (CC0-1.0).
  git -C "$src" archive --format=tar --prefix=advisory-db/ HEAD crates LICENSE.txt |
    gzip -n -9 >"$SNAPSHOT"
  {
    echo "# RustSec advisory database snapshot used by scripts/cargo-deny.sh"
    echo "source https://github.com/rustsec/advisory-db"
    echo "commit $(git -C "$src" rev-parse HEAD)"
    echo "date $(git -C "$src" show -s --format=%cI HEAD)"
  } >"$INFO"
  echo "wrote $SNAPSHOT ($(wc -c <"$SNAPSHOT") bytes) and $INFO"
  exit 0
fi

command -v cargo-deny >/dev/null || {
  echo "error: cargo-deny not installed: cargo install --locked cargo-deny" >&2
  exit 1
}
date=$(sed -n 's/^date //p' "$INFO")
commit=$(sed -n 's/^commit //p' "$INFO")
age_days=$((($(date +%s) - $(date -d "$date" +%s)) / 86400))
echo "advisory database: snapshot of $date (commit ${commit:0:12}, $age_days days old)"
if [ "$age_days" -gt "$WARN_DAYS" ]; then
  echo "warning: the advisory snapshot is older than $WARN_DAYS days; where GitHub is reachable," \
    "refresh it: git clone https://github.com/rustsec/advisory-db && scripts/cargo-deny.sh --refresh advisory-db"
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/$DB_DIR/.git"
tar -xzf "$SNAPSHOT" -C "$root/$DB_DIR" --strip-components=1
echo "$commit" >"$root/$DB_DIR/.git/FETCH_HEAD"
touch -d "$date" "$root/$DB_DIR/.git/FETCH_HEAD"
# deny.toml with the database root pointed at the unpacked snapshot.
sed "/^\[advisories\]/a db-path = \"$root\"" deny.toml >"$root/deny.toml"
grep -q "^db-path = \"$root\"" "$root/deny.toml" || {
  echo "error: deny.toml has no [advisories] table" >&2
  exit 1
}
# cargo metadata needs every locked package's manifest, other platforms' included.
cargo fetch --locked --quiet
cargo deny --locked --offline --config "$root/deny.toml" check "$@"
