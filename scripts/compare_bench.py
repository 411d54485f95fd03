#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Compares ep_bench --json runs of several builds, run by run alternated (scripts/perf-ab.sh).

    scripts/compare_bench.py DIR NAME...     # DIR/NAME-1.json, DIR/NAME-2.json, ... per NAME

One line per row (op, dtype, tokens, SMs): the median over a build's runs of the row's median us,
then each other build's as a change against the first build's. Rows a build did not run show
"-". A row is the same row in every run of ep_bench with the same options, so only runs with the
same options compare (docs/benchmarks.md defines every number).
"""

import json
import pathlib
import re
import statistics
import sys


def runs_of(directory, name):
    """The JSON documents DIR/NAME-<n>.json, in run order."""
    pattern = re.compile(re.escape(name) + r"-(\d+)\.json")
    found = []
    for path in pathlib.Path(directory).iterdir():
        match = pattern.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    docs = []
    for _, path in sorted(found):
        with open(path, encoding="utf-8") as f:
            docs.append(json.load(f))
    return docs


def main(argv):
    if len(argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    directory, names = argv[1], argv[2:]
    medians = {}  # row key -> name -> [med_us of each run]
    order = []
    for name in names:
        docs = runs_of(directory, name)
        if not docs:
            print(f"compare_bench.py: no {directory}/{name}-<n>.json", file=sys.stderr)
            return 1
        for doc in docs:
            for row in doc["rows"]:
                key = (row["op"], row["dtype"], row["tokens"], row["sms"])
                if key not in medians:
                    order.append(key)
                medians.setdefault(key, {}).setdefault(name, []).append(row["med_us"])
    width = max(12, *(len(n) for n in names))
    print(f"{'op':28} {'dtype':5} {'tokens':>6} {'SMs':>4}  " +
          "  ".join(f"{n:>{width}}" for n in names))
    for key in order:
        by_name = medians[key]
        base = statistics.median(by_name[names[0]]) if names[0] in by_name else None
        cells = []
        for name in names:
            if name not in by_name:
                cells.append(f"{'-':>{width}}")
                continue
            med = statistics.median(by_name[name])
            change = f" {100 * (med / base - 1):+5.1f}%" if base and name != names[0] else ""
            cells.append(f"{f'{med:.1f}{change}':>{width}}")
        sms = "n/a" if key[3] is None else str(key[3])
        print(f"{key[0][:28]:28} {key[1][:5]:5} {key[2]:>6} {sms:>4}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
