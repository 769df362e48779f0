#!/usr/bin/env python3
"""The SASS lines where a profiled kernel's warps stall most, from ``ncu --page source --csv --print-source sass``.

    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > src.csv
    python3 benchmarks/ncu_top.py src.csv [--top 60]

Prints the total of warp stall samples, then the top lines: share of the samples, address, the instruction and
its largest stall reasons (ncu's column names, "Warp Stall Sampling" columns only).
"""
from __future__ import annotations

import argparse
import csv
import sys


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=60)
    a = ap.parse_args()
    with open(a.csv, newline="") as f:
        lines = [row for row in csv.reader(f)]
    start = next(i for i, row in enumerate(lines) if any("Source" == c or "# Address" == c or "Address" == c for c in row))
    head, rows = lines[start], lines[start + 1:]
    total_col = next(i for i, c in enumerate(head) if c.startswith("Warp Stall Sampling (All"))
    # ncu names one column per stall reason twice: all samples ("stall_x") and not-issued ones ("stall_x (Not Issued)")
    reasons = [i for i, c in enumerate(head) if c.startswith("stall_") and "Not Issued" not in c]
    src_col = next(i for i, c in enumerate(head) if c == "Source")
    addr_col = next((i for i, c in enumerate(head) if "Address" in c), 0)
    total = sum(number(r[total_col]) for r in rows if len(r) > total_col)
    print(f"warp stall samples: {total:.0f}")
    by_reason = sorted(((sum(number(r[i]) for r in rows if len(r) > i), head[i]) for i in reasons), reverse=True)
    print("by reason: " + ", ".join(f"{name} {100 * v / total:.1f}%" for v, name in by_reason[:10] if total))
    ranked = sorted((r for r in rows if len(r) > total_col), key=lambda r: -number(r[total_col]))
    for r in ranked[: a.top]:
        share = number(r[total_col]) / total if total else 0.0
        why = sorted(((number(r[i]), head[i]) for i in reasons), reverse=True)[:3]
        why_s = ", ".join(f"{n} {v:.0f}" for v, n in why if v)
        print(f"{100 * share:5.1f}%  {r[addr_col]:>8}  {r[src_col][:70]:70}  {why_s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
