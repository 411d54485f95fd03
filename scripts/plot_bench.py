#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Plots ep_bench --json output: link % and median time against tokens and against SM budget.

    scripts/plot_bench.py bench.json                    # writes bench.png
    scripts/plot_bench.py a.json b.json -o sweep.png    # rows of several runs in one figure

Four panels: link % and median time (us) of the HT ops against tokens per rank (at the run's
--hidden and first --sms value; run with --sweep-tokens) and against the SM budget (at --tokens
and --hidden; run with --sms 16,24,32,...). One line per op and dtype. With several files, each
file's rows are selected with that file's own options and the points are merged (a later file
wins on the same point). docs/benchmarks.md defines every number; needs matplotlib.
"""

import argparse
import json
import pathlib
import sys

HT_OPS = ["dispatch", "dispatch (cached)", "combine", "combine (copy-in)", "graph d+c"]
LL_OPS = ["ll dispatch", "ll combine", "ll graph d+c"]


def load(paths):
    """[(options, setup, link, rows)] of every file, checked for the keys the plot reads."""
    runs = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"plot_bench: cannot read {path}: {e}")
        for key in ("options", "rows"):
            if key not in doc:
                sys.exit(f"plot_bench: {path} has no '{key}': not ep_bench --json output")
        runs.append(doc)
    return runs


def series(runs, ops, axis):
    """{(op, dtype): {x: row}} for axis 'tokens' or 'sms'."""
    out = {}
    for doc in runs:
        o = doc["options"]
        first_sms = o["sms"][0]
        for r in doc["rows"]:
            if r["op"] not in ops or r["hidden"] != o["hidden"]:
                continue
            if axis == "tokens":
                # LL rows use the buffer's LL SM budget, not --sms.
                if r["op"] not in LL_OPS and r["sms"] != first_sms:
                    continue
                x = r["tokens"]
            else:
                if r["tokens"] != o["tokens"] or r["sms"] is None:
                    continue
                x = r["sms"]
            out.setdefault((r["op"], r["dtype"]), {})[x] = r
    return out


def draw(ax, data, field, ylabel, xlabel, log_x, hint):
    from matplotlib.ticker import ScalarFormatter

    drawn = False
    most_points = 0
    for (op, dtype), points in sorted(data.items()):
        xs = sorted(x for x, r in points.items() if r.get(field) is not None)
        if not xs:
            continue
        ax.plot(xs, [points[x][field] for x in xs], marker="o", label=f"{op} {dtype}")
        drawn = True
        most_points = max(most_points, len(xs))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if log_x:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
    if field == "link_pct":
        ax.axhline(100.0, color="gray", linestyle="--", linewidth=0.8)
    if drawn:
        ax.legend(fontsize=7)
    if most_points <= 1:
        ax.text(0.5, 0.5, hint, ha="center", va="center", transform=ax.transAxes, fontsize=9)
    return drawn


def title_of(doc):
    setup = doc.get("setup", {})
    o = doc["options"]
    gpus = setup.get("GPUs")
    gpu = gpus[0] if isinstance(gpus, list) and gpus else "?"
    ranks = setup.get("ranks", "?")
    commit = (setup.get("epcomm") or {}).get("commit") or "?"
    limit = (doc.get("link") or {}).get("limit_gbps")
    limit_text = f"{limit:.1f} GB/s" if isinstance(limit, (int, float)) else "n/a"
    return (f"ep_bench: {ranks} x {gpu}, hidden {o['hidden']}, top-{o['topk']} of "
            f"{o['experts']}, commit {commit}; link limit {limit_text}"
            + ("  (--quick)" if o.get("quick") else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="ep_bench --json files")
    parser.add_argument("-o", "--output", help="PNG to write (default: the first JSON with .png)")
    parser.add_argument("--ll", action="store_true",
                        help="also plot the LL rows against tokens (they run at --ll-tokens and 1)")
    args = parser.parse_args()

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_bench: needs matplotlib (pip install matplotlib, or apt install "
                 "python3-matplotlib)")

    runs = load(args.json)
    output = pathlib.Path(args.output or pathlib.Path(args.json[0]).with_suffix(".png"))
    token_ops = HT_OPS + (LL_OPS if args.ll else [])
    by_tokens = series(runs, token_ops, "tokens")
    by_sms = series(runs, HT_OPS, "sms")
    first_sms = runs[0]["options"]["sms"][0]
    tokens = runs[0]["options"]["tokens"]

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    tokens_hint = "one token count only: run with --sweep-tokens"
    sms_hint = "one SM budget only: run with --sms 16,24,32,..."
    draw(axes[0][0], by_tokens, "link_pct", "link % (of the link limit)",
         f"tokens per rank (SMs={first_sms})", True, tokens_hint)
    if draw(axes[1][0], by_tokens, "med_us", "median time (us)",
            f"tokens per rank (SMs={first_sms})", True, tokens_hint):
        axes[1][0].set_yscale("log")
    draw(axes[0][1], by_sms, "link_pct", "link % (of the link limit)",
         f"SM budget (tokens={tokens})", False, sms_hint)
    draw(axes[1][1], by_sms, "med_us", "median time (us)", f"SM budget (tokens={tokens})",
         False, sms_hint)
    fig.suptitle(title_of(runs[0]), fontsize=10)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    print(f"plot_bench: wrote {output}")


if __name__ == "__main__":
    main()
