"""runtime.measure's correctness bound on the CPU: simulated kernels at K = 512 ... 65536.

The bound (runtime.measure module doc): a product's norm-wise relative error against float64 on
the same rounded operands is at most u_out + sqrt(K) u_acc. Simulated here with numpy / torch
rounding step by step: balprune's kernels (exact products, fp32 accumulation in order, one
rounding to the output dtype), and peers that accumulate in 16 bits (every partial sum rounded to
fp16 / bf16; or fp32 partials of 32 products rounded to 16 bits and summed in 16 bits). Correct
kernels must pass at every K; wrong ones (an index off by one, a dropped block of products, a
row of the wrong sign) must fail the gate of balprune's own kernels at every K, and the gross
ones the 16-bit gates too.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO

from balprune.runtime.measure import (
    MODEL_TOLERANCE,
    STAGE_TOLERANCE,
    elementwise_tolerance,
    product_tolerance,
    relative_error,
    unit_roundoff,
)

KS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
ROWS = 48
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _operands(k: int, dtype: torch.dtype, seed: int = 0):
    """W [ROWS, k], x [k] rounded to ``dtype``; their exact products and sums in float64."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + k)
    w = torch.randn(ROWS, k, generator=g).to(dtype)
    x = torch.randn(k, generator=g).to(dtype)
    p = w.double() * x.double()  # exact: a product of two 24-bit significands fits in 53 bits
    return w, x, p, p.sum(1), p.abs().sum(1)


def _round(a: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to ``dtype`` (round to nearest even, as the kernels' conversions), returned float64."""
    return torch.as_tensor(a).to(dtype).double()


def _fp32_kernel(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """balprune's kernels: products rounded to fp32 (exact for 16-bit values), summed one after
    another in fp32, the result rounded once to the output dtype."""
    s = np.add.accumulate(p.to(torch.float32).numpy(), axis=1, dtype=np.float32)[:, -1]
    return _round(torch.from_numpy(s.copy()), dtype)


def _sum16_recursive(terms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every partial sum rounded to the 16-bit ``dtype`` (the worst ordinary 16-bit accumulation)."""
    if dtype == torch.float16:  # numpy rounds each float16 addition: vectorised over the rows
        return torch.from_numpy(np.add.accumulate(terms.to(torch.float16).numpy(), axis=1, dtype=np.float16)[:, -1]
                                .astype(np.float64))
    t = terms.to(dtype)
    s = torch.zeros(t.shape[0], dtype=dtype)
    for j in range(t.shape[1]):  # torch rounds each bfloat16 addition
        s = s + t[:, j]
    return s.double()


def _blocked16(p: torch.Tensor, dtype: torch.dtype, block: int = 32) -> torch.Tensor:
    """fp32 partial sums of ``block`` products, each rounded to 16 bits, summed in 16 bits (split-K style)."""
    part = p.to(torch.float32).reshape(p.shape[0], -1, block).sum(2)
    return _sum16_recursive(part, dtype)


# --------------------------------------------------------------------------- the bound itself

def test_bound_is_u_out_plus_sqrt_k_u_acc():
    assert product_tolerance("float16", 1024, accumulate="float32") == 2.0**-11 + 32 * 2.0**-24
    assert product_tolerance("F16", 1024) == 2.0**-11 + 32 * 2.0**-11  # a library: 16-bit accumulation
    assert product_tolerance(torch.bfloat16, 4) == 2.0**-8 + 2 * 2.0**-8
    assert unit_roundoff("BF16") == unit_roundoff(torch.bfloat16) == 2.0**-8
    for k in KS:  # grows with K, like the accumulation error
        assert product_tolerance("float16", k) < product_tolerance("float16", 2 * k)
    with pytest.raises(ValueError):
        product_tolerance("float16", 0)
    with pytest.raises(ValueError):
        product_tolerance("int8", 16)


def test_the_issue_figure_torch_fp16_csr_at_k_14336():
    """torch's fp16 CSR showed 2.56e-3 at K = 14336 (Llama 4096 x 14336, batch 4): within what a
    library's 16-bit accumulation may show, and beyond what balprune's fp32 accumulation can."""
    assert product_tolerance("F16", 14336) > 2.56e-3
    assert product_tolerance("F16", 14336, accumulate="float32") < 2.56e-3


def test_own_gates_stay_tight_at_every_k():
    for k in KS:
        assert product_tolerance("float32", k, accumulate="float32") < 2e-5
        assert product_tolerance("float16", k, accumulate="float32") < 6e-4
        assert product_tolerance("bfloat16", k, accumulate="float32") < 4e-3


def test_stage_and_model_tables_are_ordered_by_precision():
    for table in (STAGE_TOLERANCE, MODEL_TOLERANCE):
        assert table["float32"] < table["float16"] < table["bfloat16"]
    assert MODEL_TOLERANCE == {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2}  # README "Tolerance contract"


# --------------------------------------------------------------------------- correct kernels pass

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
def test_fp32_accumulating_kernels_pass_their_gate_and_the_elementwise_bound(dtype):
    for k in KS:
        _, _, p, ref, absdot = _operands(k, dtype)
        y = _fp32_kernel(p, dtype)
        err = relative_error(y, ref)
        assert err <= product_tolerance(dtype, k, accumulate="float32"), (k, err)
        assert bool(((y - ref).abs() <= elementwise_tolerance(ref, absdot, k, dtype)).all()), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: NAME[d])
def test_16_bit_accumulating_peers_pass_the_library_gate(dtype):
    """Recursive 16-bit summation (the worst) and blocked fp32 partials summed in 16 bits."""
    worst = 0.0
    for k in KS:
        _, _, p, ref, _ = _operands(k, dtype, seed=1)
        bound = product_tolerance(dtype, k)
        for y in (_sum16_recursive(p, dtype), _blocked16(p, dtype)):
            err = relative_error(y, ref)
            assert err <= bound, (k, err, bound)
            worst = max(worst, err / (math.sqrt(k) * unit_roundoff(dtype)))
        # ... and such a peer would fail balprune's own (fp32) gate: the distinction is real.
        assert relative_error(_sum16_recursive(p, dtype), ref) > product_tolerance(dtype, k, accumulate="float32")
    assert 0.1 < worst < 1.0  # the model's ~0.41 sqrt(K) u: the bound is neither vacuous nor violated


# --------------------------------------------------------------------------- wrong results fail

def _wrong(kind: str, p: torch.Tensor, w: torch.Tensor, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """float64 outputs of a broken kernel: exact arithmetic, so only the bug separates them from ref."""
    if kind == "index off by one":  # every column index read one too far (wrapping at the end)
        return (w.double() * torch.roll(x.double(), -1)).sum(1)
    if kind == "dropped block":  # one of 32 blocks of products missing in every row
        k = p.shape[1]
        keep = torch.ones(k, dtype=torch.bool)
        keep[5 * k // 32:6 * k // 32] = False
        return p[:, keep].sum(1)
    # a row of the wrong sign: a typical row (median |y|). A row whose output happens to be near
    # zero is indistinguishable from rounding by any norm-wise test.
    y = ref.clone()
    r = int(torch.argsort(ref.abs())[ROWS // 2])
    y[r] = -y[r]
    return y


WRONG = ["index off by one", "dropped block", "row sign flip"]


@pytest.mark.parametrize("kind", WRONG)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
def test_wrong_results_fail_the_own_gate_at_every_k(dtype, kind):
    for k in KS:
        w, x, p, ref, _ = _operands(k, dtype, seed=2)
        y = _round(_wrong(kind, p, w, x, ref), dtype)  # rounded like a kernel's output
        assert relative_error(y, ref) > product_tolerance(dtype, k, accumulate="float32"), (k, kind)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: NAME[d])
def test_gross_errors_fail_even_the_16_bit_gates(dtype):
    for k in KS:
        w, x, p, ref, _ = _operands(k, dtype, seed=3)
        bound = product_tolerance(dtype, k)
        assert relative_error(_round(_wrong("index off by one", p, w, x, ref), dtype), ref) > bound, k
        if dtype == torch.float16:  # bf16 summation of 65536 terms can legitimately be off by 1/5
            assert relative_error(_round(_wrong("dropped block", p, w, x, ref), dtype), ref) > bound, k


# --------------------------------------------------------------------------- the relative error

def test_relative_error_reads_y_in_refs_shape_and_flags_non_finite():
    ref = torch.tensor([[3.0], [4.0]])
    assert relative_error(torch.tensor([3.0, 4.0]), ref) == 0.0  # [rows] against [rows, 1]
    assert relative_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert relative_error(torch.tensor([float("nan"), 4.0]), ref) == math.inf
    with pytest.raises(ValueError):
        relative_error(torch.zeros(3), ref)


# --------------------------------------------------------------------------- one owner, no GPU at import

def test_bench_imports_no_cupy_of_its_own():
    """Only runtime/ imports CuPy: no module of bench/ (or models/) names it in an import."""
    for folder in ("bench", "models"):
        for path in sorted((REPO / "src" / "balprune" / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n.split(".")[0] in ("cupy", "cupyx") for n in names), (path.name, names)


def test_importing_bench_and_measure_touches_no_gpu():
    """With CuPy made unimportable and CUDA hidden, every bench module and runtime.measure import,
    and neither CuPy nor a CUDA context is touched."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('cupy', 'cupyx'): raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import balprune.bench.run, balprune.bench.model, balprune.bench.sweep, balprune.bench.peers\n"
        "import balprune.bench.report, balprune.runtime.measure, balprune.runtime.model\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


def test_exact_float32_turns_tf32_off_inside_and_restores_after():
    """The float32 reference and runtime run cuDNN / cuBLAS in IEEE float32 (torch's default lets cuDNN
    use TF32 for float32 convs, 1e-4-1e-3 per layer): set inside, the caller's settings back after,
    also when the body raises."""
    from balprune.runtime.measure import exact_float32, float32_is_exact

    knobs = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul)
    before = [k.fp32_precision for k in knobs]
    assert before[0] == "tf32"  # torch's default: what the context exists to turn off
    assert not float32_is_exact()
    with exact_float32():
        assert [k.fp32_precision for k in knobs] == ["ieee"] * 3
        assert float32_is_exact()  # the one-read check hot paths use to skip entering it again
    assert [k.fp32_precision for k in knobs] == before and not float32_is_exact()
    with pytest.raises(KeyError):
        with exact_float32():
            raise KeyError("x")
    assert [k.fp32_precision for k in knobs] == before
