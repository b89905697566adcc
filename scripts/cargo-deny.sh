#!/usr/bin/env bash
# `cargo deny check` with the policy in deny.toml: licences, bans (one version per semver
# line, with named exceptions), sources (crates.io only) and, where the RustSec advisory
# database can be fetched, advisories.
#
# cargo-deny (like cargo-audit) clones the advisory database from GitHub. Our CI machines
# and developer boxes reach crates.io but not GitHub, so there the advisories check cannot
# run: this script tries `cargo deny fetch` first and, when it fails, runs the other three
# checks offline and says plainly that advisories were NOT checked. The known advisories
# and why each does not apply are recorded in deny.toml ([advisories] ignore), so a run
# where GitHub is reachable (a release machine) checks them.
#
#   scripts/cargo-deny.sh                  # what .ci/run runs
#   scripts/cargo-deny.sh licenses bans    # some of the checks
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deny >/dev/null || {
  echo "error: cargo-deny not installed: cargo install --locked cargo-deny" >&2
  exit 1
}
# cargo metadata needs every locked package's manifest, other platforms' included.
cargo fetch --locked --quiet

checks=("$@")
if [ ${#checks[@]} -eq 0 ]; then
  checks=(advisories licenses bans sources)
fi
want_advisories=0
offline_checks=()
for c in "${checks[@]}"; do
  if [ "$c" = advisories ]; then want_advisories=1; else offline_checks+=("$c"); fi
done

if [ "$want_advisories" = 1 ]; then
  if timeout 120 cargo deny --locked fetch db >/dev/null 2>&1; then
    offline_checks=()
    cargo deny --locked check "${checks[@]}"
    exit 0
  fi
  echo "advisories NOT CHECKED: the RustSec database (github.com/rustsec/advisory-db) cannot" \
    "be fetched from this machine; run scripts/cargo-deny.sh advisories where GitHub is reachable."
fi
if [ ${#offline_checks[@]} -gt 0 ]; then
  cargo deny --locked --offline check "${offline_checks[@]}"
fi
