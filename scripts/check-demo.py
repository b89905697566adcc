#!/usr/bin/env python3
"""Checks what scripts/demo.sh produced, from its structured output only.

Reads OUT/results.jsonl (the `cspine-triage/result/v1` documents that `watch` received)
and the phantoms' ground truth (OUT/studies*/ground_truth/<StudyInstanceUID>.json), pairs
them by SeriesInstanceUID and requires exactly one result per phantom series: `positive`
for every fractured phantom and `negative` for every intact one. Exit 1 otherwise.

    python3 scripts/check-demo.py demo-out
"""

import json
import pathlib
import sys


def main() -> int:
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out")
    truths = {}
    for path in sorted(out.glob("studies*/ground_truth/*.json")):
        t = json.loads(path.read_text())
        truths[t["series_instance_uid"]] = t
    results_path = out / "results.jsonl"
    results = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
    errors = []
    if len(truths) != 2:
        errors.append(f"expected 2 phantom series (fractured and clean), found {len(truths)}")
    by_series = {}
    for r in results:
        if r.get("schema") != "cspine-triage/result/v1":
            errors.append(f"unexpected schema {r.get('schema')!r} in {results_path}")
        by_series.setdefault(r["series_instance_uid"], []).append(r)
    for uid, t in truths.items():
        want = "positive" if t["patient_overall"] else "negative"
        got = [r["status"] for r in by_series.pop(uid, [])]
        kind = "fractured" if t["patient_overall"] else "clean"
        if got != [want]:
            errors.append(f"{kind} phantom series {uid}: expected one {want} result, got {got}")
        else:
            print(f"ok: {kind} phantom -> {want}")
    for uid in by_series:
        errors.append(f"result for a series that is not a demo phantom: {uid}")
    fractured = sum(1 for t in truths.values() if t["patient_overall"])
    if fractured != 1:
        errors.append(f"expected one fractured and one clean phantom, found {fractured} fractured")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
