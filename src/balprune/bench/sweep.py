"""The paper's micro-benchmark: one matrix across sparsities, balanced against its peers (``balprune bench-sweep``).

Yao et al. time a 16384 x 8192 matrix at sparsities 0.5..0.97 against dense, CSR and block
sparsity. Here, for each sparsity: a random matrix (N(0,1), fixed seed, the chosen dtype) is
pruned with balprune's balanced pattern (``blocks`` per row) and packed in memory, then timed in
one process against every peer of bench.peers (dense cuBLAS; cuSPARSE CSR on the same matrix;
balprune's and torch's BSR on 8x8 tiles at the same sparsity; torch 2:4 at its fixed 50%) and
the ideal (balanced bytes / the read bandwidth measured in the same run). The result is an
ordinary bench report (layers named ``s=0.90``; ``meta`` holds the sweep) so ``compare`` works,
plus a PNG of latency against sparsity, one line per kernel and one panel per batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..formats.balanced import BalancedTensor
from ..patterns.balanced import balanced_offsets, geometry_for
from ..patterns.kinds import BalancedPattern
from .report import BenchReport
from .run import Session

PAPER_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def layer_name(sparsity: float) -> str:
    return f"s={sparsity:g}"


def sweep_matrix(rows: int, cols: int, sparsity: float, blocks: int, dtype: torch.dtype, seed: int = 0) -> BalancedTensor:
    """The sweep's layer: N(0,1) weights (seeded), balanced-pruned and packed by the library."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    pattern = BalancedPattern(sparsity, blocks=blocks)
    g = geometry_for(rows, cols, pattern)
    return BalancedTensor.from_offsets(w, pattern, balanced_offsets(w, g))


def paper_sweep(*, rows: int = 16384, cols: int = 8192, sparsities=PAPER_SPARSITIES, batches=(1, 8),
                dtype: str = "float16", blocks: int = 32, modes=("cold",), graph: bool = False, iters: int = 100,
                device: int = 0, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Run the sweep (see module doc); NoGpuError without a GPU, GpuRuntimeError on device faults."""
    tdt = _DTYPES[dtype]
    with Session(device) as s:
        report = s.new_report(f"sweep {rows}x{cols} {dtype}")
        report.meta = {"kind": "paper-sweep", "rows": rows, "cols": cols, "dtype": dtype, "blocks": blocks,
                       "sparsities": {layer_name(sp): sp for sp in sparsities}, "batches": list(batches),
                       "modes": list(modes), "seed": 0}
        for sp in sparsities:
            if progress:
                progress(f"sparsity {sp:g}")
            bt = sweep_matrix(rows, cols, sp, blocks, tdt)
            s.bench_layer(report, layer_name(sp), bt, batches=batches, modes=modes, graph=graph, iters=iters)
    return report


#: Line style per kernel in the plot.
_STYLE = {"balanced": ("balprune balanced", "C0", "o-"), "dense": ("dense cuBLAS", "k", "s--"),
          "csr": ("cuSPARSE CSR", "C3", "^-"), "bsr": ("balprune BSR 8x8", "C2", "v-"),
          "torch_bsr": ("torch BSR 8x8", "C4", "<-"), "torch_2:4": ("torch 2:4 (50%)", "C5", "x:"),
          "ideal": ("ideal (bytes / read bw)", "C7", ":")}


def plot_sweep(report: BenchReport, path: Path, *, mode: str = "cold") -> None:
    """Write the PNG: latency (us, log scale) against sparsity per kernel, one panel per batch size.

    Needs matplotlib (the ``plot`` extra); UsageError naming the install command without it.
    """
    from ..container import write_bytes_atomic
    from ..errors import UsageError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("the plot needs matplotlib", hint="pip install 'balprune[plot]'") from None
    import io

    from .report import rows as table_rows

    sp_of = report.meta.get("sparsities", {})
    batches = sorted({m.batch for m in report.measurements})
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in table_rows(report):
            if r["batch"] != batch or r["mode"] != mode or r["graph"] or r["layer"] not in sp_of:
                continue
            sp = sp_of[r["layer"]]
            for k, m in r["kernels"].items():
                if k in _STYLE and m.correct:
                    series.setdefault(k, []).append((sp, m.median_us))
            if r["ideal_us"] is not None:
                series.setdefault("ideal", []).append((sp, r["ideal_us"]))
        for k, pts in series.items():
            label, color, style = _STYLE[k]
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=label, markersize=4)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(f"latency per launch, us ({mode})")
        ax.set_title(f"{report.meta.get('rows')} x {report.meta.get('cols')} {report.meta.get('dtype')}, batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"balprune bench-sweep on {report.device.get('name', 'GPU')} "
                 f"(read bandwidth {report.read_bandwidth_gbps:.0f} GB/s)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(Path(path), buf.getvalue())
