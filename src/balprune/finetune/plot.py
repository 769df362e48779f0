"""PNG plots of sweeps (matplotlib, an optional dependency, imported only here and only when asked)."""

from __future__ import annotations

import io
from pathlib import Path

from ..container import AtomicOutput
from ..errors import UsageError


def require_matplotlib() -> None:
    """UsageError (exit 2) with the install hint when matplotlib is missing; call it before a long run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("the plot needs matplotlib, which is not installed",
                         hint="pip install 'balprune[plot]', or pass --no-plot") from None


def plot_sweep(result, path: Path) -> None:
    """Metric against target sparsity, one line per pattern variant, the dense model as a dashed line."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for label in result.variants:
            pts = sorted((p.sparsity, p.value) for p in result.points if p.label == label)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        ax.axhline(result.dense_value, color="black", linestyle="--", linewidth=1,
                   label=f"dense ({result.dense_value:.4g})")
        if result.dense_budget_value is not None:
            ax.axhline(result.dense_budget_value, color="grey", linestyle=":", linewidth=1,
                       label=f"dense, same budget ({result.dense_budget_value:.4g})")
        ax.set_xlabel("sparsity (target)")
        ax.set_ylabel(f"{result.metric} ({result.split})" + (" (lower is better)" if not result.higher_is_better else ""))
        ax.set_title(f"{result.task}: {result.metric} vs sparsity, same fine-tuning budget per run")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    data = buf.getvalue()
    with AtomicOutput(Path(path), force=True) as out:
        out.file.write(data)
        out.commit(lambda tmp: _check_png(tmp, len(data)))


def _check_png(path: Path, size: int) -> None:
    from ..errors import OutputError

    with open(path, "rb") as f:
        head = f.read(8)
    if head != b"\x89PNG\r\n\x1a\n" or Path(path).stat().st_size != size:
        raise OutputError(f"{path}: the PNG read back differs from the PNG written")
