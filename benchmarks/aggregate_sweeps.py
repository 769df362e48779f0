"""Average several `balprune sweep` results (one per seed) into the markdown tables of REPRODUCTION.md.

    python benchmarks/aggregate_sweeps.py OUT.png SWEEP_DIR [SWEEP_DIR ...]

Prints, per variant and sparsity, the mean and the spread (min..max) of the headline metric over
the sweeps, its relative difference to unstructured (mean of the per-seed differences, oriented so
that negative is worse), and the achieved sparsity; writes a plot of the means with min..max bars.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    png, dirs = Path(argv[0]), [Path(a) for a in argv[1:]]
    sweeps = [json.loads((d / "sweep.json").read_text()) for d in dirs]
    first = sweeps[0]
    sign = 1 if first["higher_is_better"] else -1
    pct = first["metric"] == "accuracy"

    def fmt(v: float) -> str:
        return f"{100 * v:.2f}%" if pct else f"{v:.2f}"

    def value(s, label, sp):
        for p in s["points"]:
            if p["label"] == label and abs(p["sparsity"] - sp) < 1e-9:
                return p
        raise KeyError((label, sp))

    dense = [s["dense_value"] for s in sweeps]
    same = [s["dense_budget_value"] for s in sweeps if s.get("dense_budget_value") is not None]
    print(f"{first['task']}, {first['metric']} ({first['split']}), {len(sweeps)} seed(s); dense "
          f"{fmt(mean(dense))} ({fmt(min(dense))}..{fmt(max(dense))})"
          + (f"; dense trained on for the same budget {fmt(mean(same))} ({fmt(min(same))}..{fmt(max(same))})"
             if same else "") + "\n")
    sps = first["sparsities"]
    print("| pattern | " + " | ".join(f"s={s:g}" for s in sps) + " |")
    print("| --- | " + " | ".join("---" for _ in sps) + " |")
    series = {}
    for label in first["variants"]:
        cells, ys, lo, hi = [], [], [], []
        for sp in sps:
            pts = [value(s, label, sp) for s in sweeps]
            vals = [p["value"] for p in pts]
            cell = f"{fmt(mean(vals))} ({fmt(min(vals))}..{fmt(max(vals))})"
            if "unstructured" in first["variants"] and label != "unstructured":
                refs = [value(s, "unstructured", sp)["value"] for s in sweeps]
                rel = mean(sign * (v - r) / abs(r) for v, r in zip(vals, refs))
                cell += f" {100 * rel:+.1f}%"
            ach = pts[0]["achieved"]
            if abs(ach - sp) > 0.005:
                cell += f" @{100 * ach:.1f}%"
            cells.append(cell)
            ys.append(mean(vals))
            lo.append(mean(vals) - min(vals))
            hi.append(max(vals) - mean(vals))
        series[label] = (ys, lo, hi)
        print(f"| {label} | " + " | ".join(cells) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, (ys, lo, hi) in series.items():
        ax.errorbar(sps, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
    ax.axhline(mean(dense), color="black", linestyle="--", linewidth=1, label=f"dense ({fmt(mean(dense))})")
    if same:
        ax.axhline(mean(same), color="grey", linestyle=":", linewidth=1,
                   label=f"dense, same budget ({fmt(mean(same))})")
    ax.set_xlabel("sparsity (target)")
    ax.set_ylabel(f"{first['metric']} ({first['split']}), mean of {len(sweeps)} seed(s)")
    ax.set_title(f"{first['task']}: {first['metric']} vs sparsity, same budget per run")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    print(f"\nplot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
