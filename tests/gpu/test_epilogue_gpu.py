"""The sparse kernels' fused epilogue on a GPU: y = act(W x + bias) in one launch.

Every kernel entry (balanced: pipelined batch 1, shared-x, raw-x and global-x batch 1 and SpMM;
BSR: batch 1 and SpMM) is launched through ``prepared_launch(..., bias=, relu=)`` on an output
poisoned with NaN and compared with float64 relu(W x + b). Bound: the product's rounding bound
(helpers.assert_within_rounding) with the bias as one more fp32 term (ReLU is 1-Lipschitz, so
it keeps the bound). The bias is large against W x so that a dropped bias, a bias of the wrong
row or a missing ReLU fails by far.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DTYPES, assert_within_rounding, gpu_skip_reason  # noqa: E402

SKIP = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

from balprune.errors import UsageError  # noqa: E402
from balprune.formats.balanced import BalancedTensor  # noqa: E402
from balprune.formats.bsr import BsrTensor  # noqa: E402
from balprune.patterns.block import block_mask  # noqa: E402
from balprune.patterns.kinds import BalancedPattern  # noqa: E402
from balprune.prune.masks import one_shot_mask  # noqa: E402
from balprune.runtime.balanced import _host_numpy  # noqa: E402


def _balanced(rows: int, cols: int, dtype: torch.dtype, blocks: int = 32) -> BalancedTensor:
    g = torch.Generator().manual_seed(rows + cols)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    pattern = BalancedPattern(0.9, blocks=blocks)
    return BalancedTensor.from_dense(torch.where(one_shot_mask(w, pattern), w, torch.zeros((), dtype=dtype)), pattern)


def _bsr(rows: int, cols: int, dtype: torch.dtype) -> BsrTensor:
    g = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w = torch.where(block_mask(w, (8, 8), 0.8), w, torch.zeros((), dtype=dtype))
    nnzb = int((w.reshape(-1, 8, w.shape[1] // 8, 8) != 0).any(3).any(1).sum())
    return BsrTensor.from_dense(w, (8, 8), nnzb, 0.8)


def _launch_and_check(op, dense: torch.Tensor, dtype: torch.dtype, batch: int, relu: bool, with_bias: bool) -> None:
    import cupy as cp

    rows, cols = dense.shape
    g = torch.Generator().manual_seed(batch * 7 + relu)
    x = torch.randn(*((cols,) if batch == 1 else (cols, batch)), generator=g).to(dtype)
    b = (torch.randn(rows, generator=g) * 30.0).float() if with_bias else None
    xd = cp.asarray(_host_numpy(x))
    poison = 0x7FC0 if xd.dtype == cp.uint16 else np.nan
    y = cp.full((rows,) if batch == 1 else (rows, batch), poison, dtype=xd.dtype)
    bd = None if b is None else cp.asarray(b.numpy())
    launch = op.prepared_launch(xd, y, batch, bias=bd, relu=relu)
    launch()
    launch()  # the epilogue applies to the product, not to what y held
    host = cp.asnumpy(y)
    got = torch.from_numpy(host.view(np.int16)).view(torch.bfloat16) if op.dtype == "bfloat16" else torch.from_numpy(host)
    w64, x64 = dense.to(torch.float64), x.to(torch.float64).reshape(cols, -1)
    ref, absdot = w64 @ x64, w64.abs() @ x64.abs()
    n = int((dense != 0).sum(1).max()) + 1
    if b is not None:
        ref = ref + b.double()[:, None]
        absdot = absdot + b.double().abs()[:, None]
    if relu:
        ref = ref.relu()
        assert bool((got.float() >= 0).all()), "ReLU not applied"
    assert_within_rounding(got, ref, absdot, n, dtype)


# (kwargs of BalancedLinear, batch, the launch configuration expected)
BALANCED_CASES = {
    "pipelined_b1": ({}, 1, {"pipelined": True, "staging": 1}),
    "pipelined_raw_b1": ({"staging": "raw"}, 1, {"pipelined": True, "staging": 3}),
    "spmm_shared_b1": ({"pipeline": False}, 1, {"pipelined": False, "staging": 1}),
    "raw_b1": ({"staging": "raw", "pipeline": False}, 1, {"pipelined": False, "staging": 3}),
    "global_b1": ({"staging": "global"}, 1, {"pipelined": False, "staging": 0}),
    "spmm_b5": ({}, 5, {"pipelined": False}),
    "direct_b3": ({"layout": "direct"}, 3, {"pipelined": False}),
}


@pytest.mark.parametrize("relu,with_bias", [(True, True), (False, True), (True, False)],
                         ids=["bias_relu", "bias", "relu"])
@pytest.mark.parametrize("case", list(BALANCED_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_balanced_epilogue(dtype, case, relu, with_bias):
    from balprune.runtime import BalancedLinear

    kw, batch, expect = BALANCED_CASES[case]
    if expect.get("pipelined") and dtype == torch.float32:
        kw = dict(kw, pipeline=True)  # fp32 runs balanced_spmm by default; force the pipeline
    bt = _balanced(333, 1500, dtype)
    op = BalancedLinear.from_tensor(bt, **kw)
    cfg = op.launch_config(batch)
    assert {k: cfg[k] for k in expect} == expect
    _launch_and_check(op, bt.to_dense().reshape(bt.geometry.rows, -1), dtype, batch, relu, with_bias)


@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_bsr_epilogue(dtype, batch):
    from balprune.runtime import BsrLinear

    bt = _bsr(200, 512, dtype)
    op = BsrLinear.from_tensor(bt)
    _launch_and_check(op, bt.to_dense().reshape(bt.rows, -1), dtype, batch, relu=True, with_bias=True)


def test_bias_checked_before_launch():
    import cupy as cp

    from balprune.runtime import BalancedLinear

    bt = _balanced(64, 512, torch.float16)
    op = BalancedLinear.from_tensor(bt)
    x = cp.zeros(512, dtype=cp.float16)
    y = cp.zeros(64, dtype=cp.float16)
    for bad in (cp.zeros(63, dtype=cp.float32), cp.zeros(64, dtype=cp.float16), np.zeros(64, dtype=np.float32),
                cp.zeros((64, 2), dtype=cp.float32)[:, 0]):
        with pytest.raises(UsageError, match="bias must be"):
            op.prepared_launch(x, y, 1, bias=bad)
