#!/usr/bin/env python3
"""Validates JSON documents against docs/alert.schema.json (JSON Schema 2020-12).

usage: alert_validate.py SCHEMA FILE...   (exit 0: all valid; 1: errors printed)

A FILE ending in .jsonl holds one document per line (the daemon's event file).
"""
import json
import sys

import jsonschema


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    if "date-time" not in jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers:
        sys.exit("jsonschema cannot check date-time here: pip install rfc3339-validator")
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    failed = False
    for path in sys.argv[2:]:
        with open(path) as f:
            if path.endswith(".jsonl"):
                docs = [(f"{path}:{n}", json.loads(line))
                        for n, line in enumerate(f, 1) if line.strip()]
            else:
                docs = [(path, json.load(f))]
        for name, doc in docs:
            for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
                failed = True
                where = "/".join(str(p) for p in err.path) or "(root)"
                print(f"{name}: {where}: {err.message}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
