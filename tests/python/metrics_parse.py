#!/usr/bin/env python3
"""Parses a Prometheus text exposition (stdin) for tests/metrics.rs with the reference
parser, prometheus_client.parser.text_string_to_metric_families, and prints it as JSON:
{"<family>": {"type": ..., "samples": [{"name": ..., "labels": {...}, "value": ...}]}}.
A format error exits non-zero."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main():
    families = {}
    for family in text_string_to_metric_families(sys.stdin.read()):
        families[family.name] = {
            "type": family.type,
            "samples": [
                {"name": s.name, "labels": s.labels, "value": s.value} for s in family.samples
            ],
        }
    json.dump(families, sys.stdout)


if __name__ == "__main__":
    main()
