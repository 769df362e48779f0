"""Rich rendering of library results; the only place that formats for people."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..formats.packed_file import LayerSummary, PackedFile
from ..prune.engine import PruneReport


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def prune_table(report: PruneReport) -> Table:
    t = Table(title=f"balprune prune -> {report.output}", title_justify="left")
    for col, just in (("tensor", "left"), ("shape", "left"), ("dtype", "left"), ("action", "left"),
                      ("sparsity", "right"), ("dense", "right"), ("packed", "right")):
        t.add_column(col, justify=just, no_wrap=col not in ("action", "tensor"))
    for r in report.tensors:
        action = f"[green]{r.reason}[/]" if r.action == "pruned" else f"[dim]passed: {r.reason}[/]"
        t.add_row(r.name, "x".join(map(str, r.shape)) or "scalar", r.dtype, action, _pct(r.sparsity_achieved),
                  human_bytes(r.dense_bytes), human_bytes(r.packed_bytes))
    pruned = [r for r in report.tensors if r.action == "pruned"]
    ratio = report.packed_bytes / report.dense_bytes if report.dense_bytes else 1.0
    t.add_section()
    t.add_row(f"total ({len(pruned)} pruned, {len(report.tensors) - len(pruned)} passed)", "", "", "",
              "", human_bytes(report.dense_bytes), f"{human_bytes(report.packed_bytes)} ({100 * ratio:.1f}%)")
    return t


def layers_table(title: str, rows: list[LayerSummary]) -> Table:
    t = Table(title=title, title_justify="left")
    for col, just in (("tensor", "left"), ("pattern", "left"), ("shape", "left"), ("dtype", "left"),
                      ("detail", "left"), ("sparsity", "right"), ("dense", "right"), ("packed", "right")):
        t.add_column(col, justify=just)
    for r in rows:
        t.add_row(r.name, r.pattern, "x".join(map(str, r.shape)) or "scalar", r.dtype, r.detail,
                  _pct(r.sparsity_achieved), human_bytes(r.dense_bytes), human_bytes(r.packed_bytes))
    dense = sum(r.dense_bytes for r in rows)
    packed = sum(r.packed_bytes for r in rows)
    t.add_section()
    t.add_row("total", "", "", "", "", "", human_bytes(dense), human_bytes(packed))
    return t


def header_lines(pf: PackedFile) -> list[str]:
    src = pf.manifest["source"]
    opts = pf.manifest["options"]
    return [
        f"file            {pf.path} ({human_bytes(pf.parsed.file_size)}, header {len(pf.parsed.header_bytes)} bytes)",
        f"format          balprune.packed v1, written by balprune {pf.tool_version}",
        f"source          {src.get('name')} sha256 {src.get('sha256')}",
        f"options         pattern={opts.get('pattern')} sparsity={opts.get('sparsity')}"
        + (f" blocks={opts['blocks']}" if "blocks" in opts else "")
        + (f" block_size={opts['block_size']}" if "block_size" in opts else ""),
        f"aliases         {pf.manifest['aliases'] or 'none'}",
    ]


def console(stderr: bool = False) -> Console:
    """A console for tables; logs (not a terminal) get 140 columns rather than rich's 80."""
    c = Console(stderr=stderr, highlight=False)
    if not c.is_terminal:
        c = Console(stderr=stderr, highlight=False, width=140)
    return c


def compare_table(changes, max_slowdown: float) -> Table:
    t = Table(title=f"balprune compare (max slowdown {100 * max_slowdown:.0f}%)", title_justify="left")
    for col, just in (("layer", "left"), ("batch", "right"), ("mode", "left"), ("graph", "left"), ("kernel", "left"),
                      ("base us", "right"), ("new us", "right"), ("new/base", "right"), ("status", "left")):
        t.add_column(col, justify=just)
    style = {"slower": "red", "missing": "red", "incorrect": "red", "faster": "green"}
    for c in changes:
        st = style.get(c.status)
        t.add_row(c.layer, str(c.batch), c.mode, "yes" if c.graph else "no", c.kernel,
                  "-" if c.base_us is None else f"{c.base_us:.2f}", "-" if c.new_us is None else f"{c.new_us:.2f}",
                  "-" if c.ratio is None else f"{c.ratio:.3f}", f"[{st}]{c.status}[/]" if st else c.status)
    return t


def bench_table(report, rows: list[dict]) -> Table:
    """The paper's per-layer table: balanced vs dense vs CSR, speedups, GB/s and % of read bandwidth."""
    dev = report.device.get("name", "GPU")
    t = Table(title=f"balprune bench on {dev}: read bandwidth {report.read_bandwidth_gbps:.0f} GB/s (measured)",
              title_justify="left")
    for col in ("layer", "shape", "dtype", "batch", "mode", "graph", "balanced us", "dense us", "CSR us",
                "x dense", "x CSR", "GB/s", "% read bw"):
        t.add_column(col, justify="left" if col in ("layer", "shape", "dtype", "mode", "graph") else "right")

    def us(m):
        return "-" if m is None else ("not timed" if m.median_us != m.median_us else f"{m.median_us:.2f}")

    totals: dict[tuple, dict[str, float]] = {}
    for r in rows:
        b = r.get("balanced")
        t.add_row(r["layer"], "x".join(map(str, r["shape"])), r["dtype"], str(r["batch"]), r["mode"],
                  "yes" if r["graph"] else "no", us(b), us(r.get("dense")), us(r.get("csr")) if "csr" in r else "n/a",
                  "-" if r["speedup_vs_dense"] is None else f"{r['speedup_vs_dense']:.2f}",
                  "-" if r["speedup_vs_csr"] is None else f"{r['speedup_vs_csr']:.2f}",
                  "-" if b is None or not b.correct else f"{b.gbps:.0f}",
                  "-" if b is None or not b.correct else f"{b.bandwidth_pct:.0f}%")
        tot = totals.setdefault((r["batch"], r["mode"], r["graph"]), {})
        for k in ("balanced", "dense", "csr"):
            m = r.get(k)
            if m is not None and m.median_us == m.median_us:
                tot[k] = tot.get(k, 0.0) + m.median_us
    t.add_section()
    for (batch, mode, graph), tot in totals.items():
        b, d = tot.get("balanced"), tot.get("dense")
        t.add_row("total", "", "", str(batch), mode, "yes" if graph else "no",
                  "-" if b is None else f"{b:.1f}", "-" if d is None else f"{d:.1f}",
                  f"{tot['csr']:.1f}" if "csr" in tot else "n/a",
                  f"{d / b:.2f}" if b and d else "-", "", "", "")
    return t
