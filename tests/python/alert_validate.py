#!/usr/bin/env python3
"""Validates JSON documents against docs/alert.schema.json (JSON Schema 2020-12).

usage: alert_validate.py SCHEMA FILE...   (exit 0: all valid; 1: errors printed)
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
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    failed = False
    for path in sys.argv[2:]:
        with open(path) as f:
            doc = json.load(f)
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
            failed = True
            where = "/".join(str(p) for p in err.path) or "(root)"
            print(f"{path}: {where}: {err.message}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
