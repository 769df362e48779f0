"""Rich rendering of library results; the only place that formats for people."""

from __future__ import annotations

import codecs
import os
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # annotations only: the error printer imports this module without them
    from ..formats.packed_file import LayerSummary, PackedFile
    from ..prune.engine import PruneReport


def _escape(ch: str) -> str:
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def _encodable(ch: str, encodings: tuple[str, ...]) -> bool:
    try:
        for enc in encodings:
            ch.encode(enc)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _output_encodings() -> tuple[str, ...]:
    """The encodings of stdout and stderr that are not UTF-8 (which encodes everything but surrogates)."""
    out = []
    for stream in (sys.stdout, sys.stderr):
        enc = getattr(stream, "encoding", None) or "utf-8"
        try:
            name = codecs.lookup(enc).name
        except LookupError:
            name = "ascii"
        if name != "utf-8" and name not in out:
            out.append(name)
    return tuple(out)


def visible(text: str, encodings: tuple[str, ...] | None = None) -> str:
    """``text`` with every character a terminal would act on, or cannot show, replaced by its escape.

    THE escape for anything that came from a file or the command line (tensor names, manifest strings,
    report fields, config values, paths, error messages quoting them). Escaped, as Python's repr
    writes them (``\\x1b``, ``\\u2028``, ``\\udc80``, ``\\U000e0041``): every character
    ``str.isprintable()`` rejects except the plain space (C0/C1 controls such as ESC, CR, BEL and DEL,
    format characters such as bidi overrides, line/paragraph separators, lone surrogates, unassigned
    code points), and every character one of ``encodings`` cannot encode (default: those of stdout
    and stderr, so an ascii or latin-1 terminal gets escapes, not a UnicodeEncodeError). Printable
    text, backslashes and rich markup characters are left as they are: markup is never parsed where
    this is used (``literal`` makes a Text; the error printer uses print).
    """
    if text.isascii() and text.isprintable():
        return text
    encs = _output_encodings() if encodings is None else encodings
    return "".join(ch if (ch == " " or ch.isprintable()) and _encodable(ch, encs) else _escape(ch) for ch in text)


def literal_lines(lines) -> Text:
    """Several lines (a caption) as one Text, each line through ``literal`` (a newline inside one is escaped)."""
    return Text("\n").join(literal(line) for line in lines)


def literal(value: object, style: str = "") -> Text:
    """Any string for a table cell, title, caption or printed line, as rich Text shown exactly as written:
    no markup parsed (``w[/]`` and ``[bold red]x`` stay text), no emoji codes replaced, characters a
    terminal would act on escaped (``visible``). Every table and line of the CLI that holds text from a
    file or the command line goes through here."""
    return Text(visible(str(value)), style=style)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def prune_table(report: PruneReport) -> Table:
    """The per-tensor table; a target short of its request is marked (``!``, the request beside it) and
    the total row gives achieved against requested sparsity; the caption holds the report's notes."""
    by = "" if report.criterion == "magnitude" else f" (criterion {report.criterion})"
    t = Table(title=literal(f"balprune prune -> {report.output}{by}"), title_justify="left")
    for col, just in (("tensor", "left"), ("shape", "left"), ("dtype", "left"), ("action", "left"),
                      ("sparsity", "right"), ("dense", "right"), ("packed", "right")):
        t.add_column(col, justify=just, no_wrap=col not in ("action", "tensor"))
    for r in report.tensors:
        # File-derived text (tensor names, rule globs in the reason) goes in through literal(): never markup.
        action = literal(r.reason, "green") if r.action == "pruned" else literal(f"passed: {r.reason}", "dim")
        sparsity = Text(_pct(r.sparsity_achieved if r.action == "pruned" else (0.0 if r.shortfall else None)))
        if r.shortfall:
            sparsity = Text(f"{sparsity.plain} ! {_pct(r.sparsity_requested)} req", style="yellow")
        t.add_row(literal(r.name), "x".join(map(str, r.shape)) or "scalar", literal(r.dtype), action, sparsity,
                  human_bytes(r.dense_bytes), human_bytes(r.packed_bytes))
    pruned = [r for r in report.tensors if r.action == "pruned"]
    ratio = report.packed_bytes / report.dense_bytes if report.dense_bytes else 1.0
    total = ("" if report.sparsity_requested is None else
             f"{_pct(report.sparsity_achieved)} of {_pct(report.sparsity_requested)} req")
    t.add_section()
    t.add_row(f"total ({len(pruned)} pruned, {len(report.tensors) - len(pruned)} passed)", "", "", "",
              total, human_bytes(report.dense_bytes), f"{human_bytes(report.packed_bytes)} ({100 * ratio:.1f}%)")
    lines = [f"sparsity of the whole checkpoint: {_pct(report.sparsity_achieved_all)} of all weights removed; "
             "of the targets: achieved vs requested (weighted by size)"] if report.sparsity_requested is not None else []
    # report.notes (warnings) go to stderr, one line each (cli prune): not repeated here; a layer short of
    # its request is marked in its row.
    t.caption = literal_lines(lines)
    t.caption_justify = "left"
    return t


def layers_table(title: str, rows: list[LayerSummary]) -> Table:
    t = Table(title=literal(title), title_justify="left")
    for col, just in (("tensor", "left"), ("pattern", "left"), ("shape", "left"), ("dtype", "left"),
                      ("detail", "left"), ("sparsity", "right"), ("dense", "right"), ("packed", "right")):
        t.add_column(col, justify=just)
    for r in rows:
        t.add_row(*map(literal, (r.name, r.pattern, "x".join(map(str, r.shape)) or "scalar", r.dtype, r.detail,
                                 _pct(r.sparsity_achieved), human_bytes(r.dense_bytes), human_bytes(r.packed_bytes))))
    dense = sum(r.dense_bytes for r in rows)
    packed = sum(r.packed_bytes for r in rows)
    t.add_section()
    t.add_row("total", "", "", "", "", "", human_bytes(dense), human_bytes(packed))
    return t


def header_lines(pf: PackedFile) -> list[Text]:
    """The lines ``inspect`` prints above its table; manifest strings are file text (``literal``)."""
    src = pf.manifest["source"]
    opts = pf.manifest["options"]
    return [literal(line) for line in (
        f"file            {pf.path} ({human_bytes(pf.parsed.file_size)}, header {len(pf.parsed.header_bytes)} bytes)",
        f"format          balprune.packed v{pf.format_version}, written by balprune {pf.tool_version}",
        f"source          {src.get('name')} sha256 {src.get('sha256')}",
        f"options         pattern={opts.get('pattern')} sparsity={opts.get('sparsity')}"
        + (f" blocks={opts['blocks']}" if "blocks" in opts else "")
        + (f" block_size={opts['block_size']}" if "block_size" in opts else ""),
        f"aliases         {pf.manifest['aliases'] or 'none'}",
    )]


def console(stderr: bool = False) -> Console:
    """A console for tables; logs (not a terminal) get $COLUMNS columns, or 140 rather than rich's 80."""
    c = Console(stderr=stderr, highlight=False)
    if not c.is_terminal:
        cols = os.environ.get("COLUMNS", "")
        c = Console(stderr=stderr, highlight=False, width=int(cols) if cols.isdigit() and int(cols) >= 40 else 140)
    return c


#: Most rows ``compare``'s table prints: a CI log gains nothing from 10^5 rows (rich took minutes on them).
COMPARE_TABLE_ROWS = 500


def compare_table(changes, max_slowdown: float, notes: tuple[str, ...] = (), *,
                  max_rows: int = COMPARE_TABLE_ROWS) -> Table:
    """One row per Change (bench.compare), the regressions (slower, missing, incorrect) first, at most
    ``max_rows`` of them (the caption says how many more; ``compare --json`` has every one); ``notes``
    (e.g. that the reports come from different devices) go in the caption. Layer, dtype, mode and kernel
    names are report text (``literal``)."""
    bad = ("slower", "missing", "incorrect")
    ordered = [c for c in changes if c.status in bad] + [c for c in changes if c.status not in bad]
    if len(ordered) > max_rows:
        notes = (*notes, f"{len(ordered) - max_rows} more measurement(s) not shown (compare --json lists all)")
        ordered = ordered[:max_rows]
    t = Table(title=f"balprune compare (max slowdown {100 * max_slowdown:.0f}%)", title_justify="left")
    for col, just in (("layer", "left"), ("dtype", "left"), ("batch", "right"), ("mode", "left"), ("graph", "left"),
                      ("kernel", "left"), ("base us", "right"), ("new us", "right"), ("new/base", "right"),
                      ("status", "left")):
        t.add_column(col, justify=just)
    style = {"slower": "red", "missing": "red", "incorrect": "red", "faster": "green"}
    for c in ordered:
        st = style.get(c.status)
        t.add_row(literal(c.layer), literal(c.dtype), str(c.batch), literal(c.mode), "yes" if c.graph else "no",
                  literal(c.kernel), "-" if c.base_us is None else f"{c.base_us:.2f}",
                  "-" if c.new_us is None else f"{c.new_us:.2f}", "-" if c.ratio is None else f"{c.ratio:.3f}",
                  literal(c.status, st or ""))
    if notes:
        t.caption = literal_lines(notes)
        t.caption_justify = "left"
    return t


def compare_summary(changes, max_slowdown: float, notes: tuple[str, ...] = ()) -> Text:
    """The one line ``compare`` prints when nothing regressed: how much was compared, against what bound."""
    kernels = sorted({c.kernel for c in changes})
    counts = {s: sum(c.status == s for c in changes) for s in ("faster", "new")}
    extra = "".join(f"; {n} {s}" for s, n in counts.items() if n)
    return literal(f"ok: {len(changes)} measurement(s) of {len(kernels)} kernel(s) ({', '.join(kernels)}) compared, "
                   f"none slower than {100 * max_slowdown:.0f}%{extra}" + "".join(f"; {n}" for n in notes))


def bench_table(report, rows: list[dict]) -> Table:
    """The paper's per-layer table: balprune's kernel vs dense, CSR, block-sparse and 2:4 peers,
    speedups, % of the measured read bandwidth and of a plain read of the same bytes, the path
    the runtime takes (the faster of its kernel and dense), and a totals row per configuration."""
    from rich import box

    dev = report.device.get("name", "GPU")
    t = Table(title=literal(f"balprune bench on {dev}: read bandwidth {report.read_bandwidth_gbps:.0f} GB/s "
                            "(measured); median us per launch"), title_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False)
    peers = [("dense", "dense"), ("csr", "CSR"), ("bsr", "BSR"), ("torch_bsr", "tBSR"), ("torch_2:4", "2:4")]
    cols = ["layer", "run", "kernel", "us"] + [h for _, h in peers] + ["x dense", "x CSR", "% bw", "% read", "path"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("layer", "run", "kernel", "path") else "right",
                     no_wrap=col != "layer", overflow="fold",
                     min_width=min(28, max((len(r["layer"]) for r in rows), default=5)) if col == "layer" else None)

    def us(m):
        return "" if m is None else ("failed" if not m.correct else f"{m.median_us:.1f}")

    def x(v):
        return "" if v is None else f"{v:.2f}"

    def run(r):
        return f"{r['dtype']} b{r['batch']} {r['mode']}{' graph' if r['graph'] else ''}"  # e.g. F16 b1 cold graph

    totals: dict[tuple, dict[str, float]] = {}
    fallback = False
    for r in rows:
        ks, subj = r["kernels"], r["subject"]
        s = ks.get(subj)
        ok = s is not None and s.correct
        stream = ks.get("stream")
        path = r["path"] or ""
        if r["path"] and r["path"] != subj:
            fallback = True
            d = ks.get("dense")
            path += f" ({s.median_us / d.median_us:.2f}x)" if ok and d is not None else ""
        t.add_row(*map(literal, (
                  r["layer"], run(r), subj or "", us(s),
                  *[us(ks.get(k)) if k != subj else "" for k, _ in peers],
                  x(r["speedup"].get("dense")), x(r["speedup"].get("csr")),
                  f"{s.bandwidth_pct:.0f}%" if ok else "",
                  f"{100 * stream.median_us / s.median_us:.0f}%" if ok and stream is not None and stream.correct else "",
                  path)))
        tot = totals.setdefault((r["dtype"], r["batch"], r["mode"], r["graph"]), {})
        for key, m in (("subject", s), ("dense", ks.get("dense"))):
            if m is not None and m.correct:
                tot[key] = tot.get(key, 0.0) + m.median_us
        if r["path_us"] is not None:
            tot["path"] = tot.get("path", 0.0) + r["path_us"]
    t.add_section()
    for (dtype, batch, mode, graph), tot in totals.items():
        sub, d, p = tot.get("subject"), tot.get("dense"), tot.get("path")
        cells = {"layer": "total", "run": run({"dtype": dtype, "batch": batch, "mode": mode, "graph": graph}),
                 "us": "" if sub is None else f"{sub:.1f}", "dense": "" if d is None else f"{d:.1f}",
                 "x dense": f"{d / sub:.2f}" if sub and d else "",
                 "path": f"{p:.1f} us = {d / p:.2f}x dense" if p and d else ""}
        t.add_row(*[literal(cells.get(c, "")) for c in cols])
    notes = ["x: the peer's time over balprune's kernel; % bw: of the measured read bandwidth; "
             "% read: a plain read of the same bytes (launch included) over the kernel's time. "
             "Ideal times and every figure: --json"]
    if fallback:
        notes.append("path dense (Nx): balprune's kernel is Nx the dense time there, so the runtime uses dense")
    for u in getattr(report, "unavailable", []):
        notes.append(f"n/a {u['kernel']} ({u['layer']}, batch {u['batch']}): {u['reason']}")
    from ..bench.report import own_failures

    own = {id(m) for m in own_failures(report)}
    for m in report.measurements:
        if not m.correct:
            who = "balprune's own path" if id(m) in own else "a peer: reported, not fatal"
            notes.append(f"failed {m.kernel} ({m.layer}, {m.dtype} batch {m.batch}; {who}): {m.note}")
    t.caption = literal_lines(notes)
    t.caption_justify = "left"
    return t


def model_tables(report) -> list[Table]:
    """``bench --model``: the per-layer dispatch table (as the paper's VGG-16 table: dense vs
    balprune's kernel per layer, the path taken and why) per dtype, then the end-to-end table
    (balprune vs dense torch, eager and graph, hot and cold) beside the paper's figures."""
    from rich import box

    from ..bench.model import is_model_unit, model_rows

    meta = report.meta.get("model", {})
    dev = report.device.get("name", "GPU")
    tables = []
    for dtype, dm in meta.get("dtypes", {}).items():
        t = Table(title=literal(f"{meta.get('architecture')} {dtype} on {dev}: per stage (a layer, or an LSTM's "
                                f"whole recurrence / token step), CUDA graph, hot (us)"),
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("layer", "shape", "N", "pattern", "dense", "sparse", "x dense", "path", "why"):
            t.add_column(col, justify="left" if col in ("layer", "pattern", "path", "why", "shape") else "right",
                         overflow="fold")
        tot = {"dense": 0.0, "sparse": 0.0, "path": 0.0}
        for c in dm.get("dispatch", []):
            times = c["times_us"]
            sparse = [v for k, v in times.items() if k != "dense"]  # the fastest of the layer's sparse paths
            sp = min(sparse) if sparse else None
            d = times.get("dense")
            path_us = times.get(c["path"])
            for k, v in (("dense", d), ("sparse", sp if sp is not None else d), ("path", path_us)):
                if v is not None:
                    tot[k] += v
            t.add_row(*map(literal, (c["layer"], "x".join(map(str, c["shape"])), str(c["batch"]), c["pattern"],
                                     "" if d is None else f"{d:.1f}", "" if sp is None else f"{sp:.1f}",
                                     f"{d / sp:.2f}" if d and sp else "", c["path"], c["reason"])))
        t.add_section()
        t.add_row("total", "", "", "", f"{tot['dense']:.1f}", f"{tot['sparse']:.1f}",
                  f"{tot['dense'] / tot['sparse']:.2f}" if tot["sparse"] else "", f"{tot['path']:.1f}",
                  f"layers on their chosen paths: {tot['dense'] / tot['path']:.2f}x dense" if tot["path"] else "")
        tables.append(t)
    t = Table(title=literal(f"{meta.get('architecture')} end to end, batch 1, median us per {_unit(meta)}"),
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    rows = model_rows(report)
    units = len({r["unit"] for r in rows}) > 1  # an LLM: decode at each context and the prefill
    hf = any("transformers" in r for r in rows)  # an LLM's transformers peer
    for col in (("unit",) if units else ()) + ("dtype", "graph", "mode", "balprune", "p10-p90", "torch dense",
                                               "p10-p90", "x torch") + (("transformers", "x tf") if hf else ()) + ("error",):
        t.add_column(col, justify="left" if col in ("unit", "dtype", "graph", "mode") else "right")
    def us(m):
        return "" if m is None else ("failed" if not m.correct else f"{m.median_us:.1f}")

    def spread(m):
        return "" if m is None or not m.correct else f"{m.p10_us:.1f}-{m.p90_us:.1f}"

    def ratio(peer, b):
        ok = peer is not None and b is not None and peer.correct and b.correct
        return f"{peer.median_us / b.median_us:.2f}" if ok else ""

    for r in rows:
        b, d, tf = r.get("balprune"), r.get("torch"), r.get("transformers")
        t.add_row(*map(literal, ((r["unit"],) if units else ()) + (r["dtype"], "yes" if r["graph"] else "no", r["mode"], us(b), spread(b), us(d),
                                 spread(d), "" if r["speedup"] is None else f"{r['speedup']:.2f}")
                       + (((us(tf) + ("" if tf is None or tf.graph == r["graph"] else " eager")), ratio(tf, b))
                          if hf else ())
                       + ("" if b is None or b.max_rel_error is None else f"{b.max_rel_error:.1e}",)))
    notes = []
    paper = meta.get("paper")
    if paper:
        notes.append(f"paper ({paper['workload']}, its GPU): dense {paper['dense_us']:.1f} us, balanced "
                     f"{paper['balanced_us']:.1f} us = {paper['dense_us'] / paper['balanced_us']:.2f}x")
    if meta.get("frames"):
        notes.append(f"one utterance = {meta['frames']} frames; per frame: divide by {meta['frames']}")
    if meta.get("kind") == "resnet":
        notes.append("batch norm: folded into the convs by prune (the file holds the folded weights and biases); "
                     "the torch dense model is the same folded network")
    for dtype, dm in meta.get("dtypes", {}).items():
        layout = dm.get("torch_layout")
        if layout:  # a vision model's torch peer: cuDNN benchmark mode, the faster memory layout
            eager = ", ".join(f"{k} {v:.1f} us" for k, v in layout.get("eager_hot_us", {}).items())
            notes.append(f"{dtype} torch dense: cuDNN benchmark mode, {layout['layout']} (eager, hot: {eager})")
        if dm.get("activations"):  # the runtime's layout between its conv stages (runtime.model.base)
            notes.append(f"{dtype} balprune: activations {dm['activations']} between the conv layers")
    if "float32" in meta.get("dtypes", {}) and meta.get("kind") in ("vgg", "resnet"):
        notes.append("float32: every runner in IEEE float32 (torch's default TF32 for convolutions off)")
    if meta.get("kind") == "llama":
        notes.append("model: one decode token at context " + str(meta["contexts"][0]) + "; model@ctxN: at context N; "
                     "prefill@N: a prompt of N tokens; torch dense: the same decoder with every product through cuBLAS"
                     + ("; transformers: its own model of the same weights, StaticCache (x tf: its time over balprune's)"
                        if hf else ""))
        for dtype, dm in meta.get("dtypes", {}).items():
            floors = dm.get("floor_us", {})
            if floors:
                notes.append(f"{dtype} bandwidth floors (weight bytes / {meta['read_gbps']:.0f} GB/s): dense "
                             f"{floors.get('torch', 0):.1f} us, packed {floors.get('balprune', 0):.1f} us")
    notes.append("x torch: torch's time over balprune's, same dtype, graph and mode; error: relative to the float32 "
                 "reference outputs")
    for u in getattr(report, "unavailable", []):
        if is_model_unit(u["layer"]):
            notes.append(f"n/a {u['kernel']}: {u['reason']}")
    t.caption = literal_lines(notes)
    t.caption_justify = "left"
    tables.append(t)
    return tables


def _unit(meta: dict) -> str:
    for dm in meta.get("dtypes", {}).values():
        return dm.get("unit", "forward")
    return "forward"
