"""Plain helpers for tests (importable as `from helpers import ...`)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_subprocess(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run `python -m balprune ARGS` in a fresh interpreter (for exit codes and signals)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "balprune", *map(str, args)], capture_output=True, text=True,
                          env=env, **kw)


def small_state_dict(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A model-like state dict: linears (ragged K), a conv, 1-D tensors, an int buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(16, 3, 3, 3, generator=g).to(dtype),
        "conv2.weight": torch.randn(8, 16, 3, 3, generator=g).to(dtype),
        "fc1.weight": torch.randn(24, 100, generator=g).to(dtype),
        "fc1.bias": torch.randn(24, generator=g).to(dtype),
        "fc2.weight": torch.randn(10, 64, generator=g).to(dtype),
        "norm.running_mean": torch.randn(8, generator=g).to(dtype),
        "norm.num_batches_tracked": torch.tensor(7),
        "q.weight": torch.randint(-128, 127, (12, 40), generator=g, dtype=torch.int8),
    }


def small_lm_packed(folder: Path) -> Path:
    """A small packed lstm-lm (vocab 50, H 24, 2 layers; balanced 50%, 4 blocks), pruned by the CLI:
    a file ``bench --model`` recognises, for the paths that stop before (or at) the GPU."""
    from balprune.cli import main
    from balprune.examples import LstmLanguageModel
    from balprune.save import save_state_dict

    torch.manual_seed(0)
    m = LstmLanguageModel(vocab=50, hidden=24, layers=2)
    src, out = folder / "lm.safetensors", folder / "lm.balanced.safetensors"
    save_state_dict({k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}, src)
    # offsets indices: the hostile tests edit them (the bitmask encoding has its own cases)
    assert main(["prune", str(src), "--sparsity", "0.5", "--blocks", "4", "--index", "offsets", "-o", str(out),
                 "--json"]) == 0
    src.unlink()
    return out


def gpu_skip_reason() -> str | None:
    """Why GPU tests cannot run here (None when CuPy sees a CUDA device): the skip reason they show."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CuPy wheel that does not match the driver
        return f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no usable CUDA device ({type(e).__name__}: {e})"
    return None if n > 0 else "no CUDA device is visible"


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_within_rounding(y: torch.Tensor, ref: torch.Tensor, absdot: torch.Tensor, n, dtype: torch.dtype) -> None:
    """The sparse kernels' error bound against a float64 reference, from runtime.measure (the one
    statement of it): every element within ``elementwise_tolerance`` (u_out*|ref| + n*2^-24*sum|w*x|
    + tiny, n: products per output, a number or a column of them: the worst case of fp32
    accumulation), no non-finite output, and ||y - ref|| / ||ref|| <= ``product_tolerance(dtype,
    max n, accumulate="float32")`` (the gate bench holds balprune's kernels to); y exactly 0 where
    ref is all zeros."""
    from balprune.runtime.measure import elementwise_tolerance, product_tolerance

    y64 = y.to(torch.float64).reshape(ref.shape)
    assert bool(torch.isfinite(y64).all()), "non-finite output (unwritten element?)"
    tol = elementwise_tolerance(ref, absdot, n, dtype)
    err = (y64 - ref).abs()
    worst = int(torch.argmax(err / tol))
    assert bool((err <= tol).all()), (f"element {worst}: got {float(y64.flatten()[worst])}, "
                                      f"ref {float(ref.flatten()[worst])}, tol {float(tol.flatten()[worst])}")
    norm = float(torch.linalg.norm(ref))
    if norm > 0:
        k = max(1, int(torch.as_tensor(n).max()))
        rel = float(torch.linalg.norm(y64 - ref)) / norm
        assert rel <= product_tolerance(dtype, k, accumulate="float32"), (rel, product_tolerance(dtype, k, accumulate="float32"))
    else:
        assert bool((y64 == 0).all())


def sha256(path: Path) -> str:
    """sha256 of a file's bytes (inputs must be byte-identical after a refused command)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> dict[str, str]:
    """relative path -> sha256 / link target / kind of everything under ``folder`` (no reads of FIFOs):
    compared before and after a command to show inputs unchanged and nothing left behind."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = f"link -> {os.readlink(p)}"
        elif p.is_fifo():
            out[rel] = "fifo"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def one_error_line(err: str, out: str = "") -> str:
    """The single ``balprune: error: ...`` line of a refused command's stderr (asserts there is exactly one,
    and no traceback anywhere)."""
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("balprune: error:"), lines[0]
    return lines[0]


def assert_refused(rc: int, stdout: str, stderr: str, *, code: int, mentions, folder: Path, before: dict,
                   started: float, timeout: float) -> str:
    """The refusal contract of a command run in ``folder`` (``before`` = listing(folder) beforehand): within
    ``timeout`` seconds of ``started`` (time.monotonic), exit ``code``, one error line naming each of
    ``mentions`` (the folder's own path does not count), every file as it was, nothing left. Returns the line."""
    import time

    assert time.monotonic() - started < timeout
    assert rc == code, (rc, stderr)
    line = one_error_line(stderr, stdout)
    own = line.replace(str(folder), "TMP")  # the test's folder name must not satisfy a mention
    for m in mentions:
        assert m in own, f"{m!r} not in {line!r}"
    assert listing(folder) == before, "an input changed or an output / temp file was left"
    return line


def transformers_or_skip():
    """The transformers module (a dev dependency, never a runtime one), or skip the test without it.
    transformers imports torchvision; balprune.vision makes that work next to a CPU-only torch."""
    import pytest

    from balprune.vision import torchvision

    try:
        torchvision()
    except ImportError:
        pass
    return pytest.importorskip("transformers")


def balanced_conv_weight(cout: int, cin: int, kh: int, kw: int, sparsity: float, blocks: int, seed: int = 0):
    """(BalancedTensor, geometry) of a seeded random conv weight [cout, cin, kh, kw] pruned balanced over its
    [cout, cin*kh*kw] view, float32 values (the conv layout and kernel tests' weight)."""
    from balprune.formats.balanced import BalancedTensor
    from balprune.patterns.balanced import balanced_offsets, geometry_for
    from balprune.patterns.kinds import BalancedPattern

    w = torch.randn(cout, cin, kh, kw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    m = w.reshape(cout, -1).float()
    pattern = BalancedPattern(sparsity, blocks=blocks)
    g = geometry_for(*m.shape, pattern)
    return BalancedTensor.from_offsets(m, pattern, balanced_offsets(m, g, dtype=g.index_dtype)), g


#: kernels/balanced_conv.cu stage_input: rows loaded per thread before their stores, and the lines of it
#: that emulate_stage_input (used by both conv kernels' thread emulations) mirrors.
STAGE_SU = 4
STAGE_INPUT_LINES = (
    "constexpr int SU = 4;",
    "const int span = cols < 32 ? cols : 32;",
    "const int per = 32 / span;",
    "const int sub = lane / span;",
    "if (sub >= per) return;",
    "const int q0 = lane - sub * span;",
    "const int G = (nthreads >> 5) * per;",
    "const int total = chans * rows;",
    "const int step_c = G / rows, step_r = G - step_c * rows;",
    "int rr = (tid >> 5) * per + sub;",
    "int cl = rr / rows, r = rr - cl * rows;",
    "while (rr < total) {",
    "if (rr < total && iy >= 0 && iy < H) in_rows |= 1u << j;",
    "src[j] = ((c0 + cl) * H + iy) * W + ix0;",
    "dst[j] = rr < total ? rr * cols : -1;",
    "rr += G; r += step_r; cl += step_c; if (r >= rows) { r -= rows; ++cl; }",
    "for (int q = q0; q < cols; q += span) {",
    "const bool in_cols = ix0 + q >= 0 && ix0 + q < W;",
    "for (int j = 0; j < SU; ++j) v[j] = ((in_rows >> j & 1u) && in_cols) ? Val<T>::ldg(xb + src[j] + q) : 0.0f;",
    "if (dst[j] >= 0) xs[dst[j] + q] = v[j];",
)


def emulate_stage_input(tid, nthreads: int, chans: int, rows: int, cols: int, c0: int, H: int, W: int, iy0: int,
                        ix0: int, load, store) -> None:
    """kernels/balanced_conv.cu stage_input, all threads ``tid`` (int64 array) of a CTA in lockstep:
    ``load(offsets)`` returns the input values at offsets from the image's start (xb), ``store(words,
    values)`` writes shared words. Python ints stand for the kernel's int arithmetic (the sizes are small)."""
    import numpy as np

    lane = tid & 31
    span = cols if cols < 32 else 32
    per = 32 // span
    sub = lane // span
    act = sub < per  # if (sub >= per) return;
    q0 = (lane - sub * span)[act]
    G = (nthreads >> 5) * per
    total = chans * rows
    step_c = G // rows
    step_r = G - step_c * rows
    rr = ((tid >> 5) * per + sub)[act]
    cl = rr // rows
    r = rr - cl * rows
    while (rr < total).any():  # each thread: while (rr < total); finished ones change nothing below
        batch = []
        for _ in range(STAGE_SU):
            iy = iy0 + r
            in_rows = (rr < total) & (iy >= 0) & (iy < H)
            batch.append((((c0 + cl) * H + iy) * W + ix0, np.where(rr < total, rr * cols, -1), in_rows))
            rr = rr + G
            r = r + step_r
            cl = cl + step_c
            wrap = r >= rows
            r = np.where(wrap, r - rows, r)
            cl = np.where(wrap, cl + 1, cl)
        for qi in range(-(-cols // span)):
            q = q0 + qi * span
            inq = q < cols  # for (int q = q0; q < cols; q += span)
            in_cols = (ix0 + q >= 0) & (ix0 + q < W)
            vals = []
            for src, _dst, in_rows in batch:
                ok = in_rows & in_cols & inq
                v = np.zeros(q.size)
                if ok.any():
                    v[ok] = load(src[ok] + q[ok])
                vals.append(v)
            for (_src, dst, _in_rows), v in zip(batch, vals):
                st = (dst >= 0) & inq
                if st.any():
                    store(dst[st] + q[st], v[st])


def assert_source_has(filename: str, lines) -> None:
    """Each of ``lines`` (whitespace-normalised) still in kernels/``filename``: the lines a thread emulation
    mirrors, so that an edit to the kernel must revisit the emulation."""

    from balprune.runtime.kernels import kernel_source

    src = re.sub(r"\s+", " ", kernel_source(filename))
    for line in lines:
        assert line in src, f"{filename} no longer has: {line}"


def strip_comments(text: str) -> str:
    """CUDA/C++ source without its comments (block and line)."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def block_body(text: str, open_brace: int) -> str:
    """The text between the brace at ``open_brace`` and the brace that closes it."""
    depth, end = 1, open_brace + 1
    while depth:
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        end += 1
    return text[open_brace + 1:end - 1]


def global_kernels(text: str) -> list[tuple[str, str, str]]:
    """(name, parameter list, body after its opening brace) of every __global__ function of ``text``."""
    out = []
    for m in re.finditer(r"__global__", text):
        head_end = text.index("{", m.end())
        head = re.sub(r"__launch_bounds__\s*\([^)]*\)", " ", text[m.end():head_end])
        name = re.search(r"(\w+)\s*\(", head)
        out.append((name.group(1), head[name.end():], block_body(text, head_end)))
    return out
