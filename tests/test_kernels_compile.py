"""The CUDA sources compile for Hopper (sm_90) with nvcc, every instantiation the runtime launches.

Runs on the CPU wherever nvcc is on PATH (no GPU needed); skipped with the reason otherwise. The
sources are compiled as the runtime sees them: headers inlined by kernel_source.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from balprune.runtime import kernel_variants
from balprune.runtime.bsr import kernel_variants as bsr_kernel_variants
from balprune.runtime.kernels import kernel_source

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: CUDA sources cannot be compiled here")

ARCH = ["-arch=sm_90", "-std=c++17"]


def _instantiating_source(names: list[str], filename: str = "balanced_spmv.cu") -> str:
    """The inlined kernel source plus a host function taking each kernel's address (instantiates it)."""
    refs = "\n".join(f"  (void)&{n};" for n in names)
    return kernel_source(filename) + f"\nvoid balprune_instantiate_all() {{\n{refs}\n}}\n"


def _nvcc(tmp_path, source: str, *flags: str) -> subprocess.CompletedProcess:
    src = tmp_path / "k.cu"
    src.write_text(source)
    out = tmp_path / ("k.ptx" if "--ptx" in flags else "k.o")
    return subprocess.run([NVCC, *ARCH, *flags, str(src), "-o", str(out)], capture_output=True, text=True,
                          timeout=600)


def test_every_runtime_variant_compiles(tmp_path):
    names = kernel_variants()
    r = _nvcc(tmp_path, _instantiating_source(names), "--ptx")
    assert r.returncode == 0, r.stderr[-4000:]
    ptx = (tmp_path / "k.ptx").read_text()
    assert ptx.count(".entry ") == len(names)


def _assert_fit_64_registers_no_spills(tmp_path, names: list[str], filename: str, *flags: str) -> None:
    """Build ``names`` of ``filename`` with ptxas -v (and ``flags``, e.g. -D options): every one at <= 64
    registers, no spill stores or loads, and no stack frame (a local array indexed by a value that is not a
    constant lives in local memory without counting as a spill: the bitmask kernel's x staging did, and each
    of its loads then waited at its local store)."""
    r = _nvcc(tmp_path, _instantiating_source(names, filename), "-c", "-Xptxas", "-v", *flags)
    assert r.returncode == 0, r.stderr[-4000:]
    frames = [int(n) for n in re.findall(r"(\d+) bytes stack frame", r.stderr)]
    assert len(frames) == len(names) and not any(frames), r.stderr[-4000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", r.stderr)]
    assert len(spills) == len(regs) == len(names), r.stderr[-4000:]
    assert all(s == ("0", "0") for s in spills), r.stderr[-4000:]
    assert max(regs) <= 64


def test_batch1_shared_x_variants_do_not_spill(tmp_path):
    """The batch-1 paths (x in shared memory, interleaved; pipelined or not) fit 64 registers, no local memory."""
    names = [n for n in kernel_variants() if ", 1, 1, true>" in n or ", 1, 3, true>" in n or "balanced_spmv_tma" in n]
    assert len(names) == 24  # 3 dtypes x 2 index widths x (XS 1, XS 3, pipelined fp32 x, pipelined raw x)
    _assert_fit_64_registers_no_spills(tmp_path, names, "balanced_spmv.cu")


def test_every_bitmask_variant_compiles_without_spills(tmp_path):
    """kernels/balanced_bitmask.cu: every (dtype, batch tile, x staging) the runtime launches, at
    <= 64 registers (its __launch_bounds__(256, 4)) and no local memory."""
    from balprune.runtime.bitmask import WALKS
    from balprune.runtime.bitmask import kernel_variants as bitmask_variants

    for walk in WALKS:  # every walk (kernels/NOTES.md v26, v37: walk 7 is the delta kernel's instantiations)
        _assert_fit_64_registers_no_spills(tmp_path, bitmask_variants(walk), "balanced_bitmask.cu",
                                           f"-DBP_BM_WALK={walk}")


def test_delta_walk_l2_prefetch_build_compiles_without_spills(tmp_path):
    """The delta walk's v42 build (BP_DELTA_PF_L2, kernels/NOTES.md: waiting for its device A/B) fits as the
    default build does: every variant at <= 64 registers, no local memory."""
    from balprune.runtime.bitmask import DELTA_WALK, kernel_variants

    _assert_fit_64_registers_no_spills(tmp_path, kernel_variants(DELTA_WALK), "balanced_bitmask.cu",
                                       f"-DBP_BM_WALK={DELTA_WALK}", "-DBP_DELTA_PF_L2=8")


def test_every_nm24_variant_compiles_without_spills(tmp_path):
    """kernels/nm24_sparse_mma.cu (mma.sp on the sparse tensor cores): every (dtype, batch tile) the
    runtime launches, at <= 64 registers (16 warps per CTA, two CTAs per SM) and no local memory."""
    from balprune.runtime.nm24 import kernel_variants as nm24_variants

    _assert_fit_64_registers_no_spills(tmp_path, nm24_variants(), "nm24_sparse_mma.cu")


def test_every_balanced_conv_variant_compiles_without_spills(tmp_path):
    """kernels/balanced_conv.cu (direct conv): every (dtype, rows per lane) at <= 64 registers, no local memory."""
    from balprune.runtime.conv import kernel_variants as conv_variants

    _assert_fit_64_registers_no_spills(tmp_path, conv_variants(), "balanced_conv.cu")


def test_every_bsr_variant_compiles(tmp_path):
    names = bsr_kernel_variants()
    r = _nvcc(tmp_path, _instantiating_source(names, "bsr_spmv.cu"), "--ptx")
    assert r.returncode == 0, r.stderr[-4000:]
    ptx = (tmp_path / "k.ptx").read_text()
    assert ptx.count(".entry ") == len(names)


def test_bsr_variants_do_not_spill(tmp_path):
    """Every BSR instantiation (all batch tiles: they share one kernel body) fits 64 registers, no local memory."""
    names = bsr_kernel_variants()
    assert len(names) == 44
    _assert_fit_64_registers_no_spills(tmp_path, names, "bsr_spmv.cu")


def test_bench_util_compiles(tmp_path):
    r = _nvcc(tmp_path, kernel_source("bench_util.cu"), "-c")
    assert r.returncode == 0, r.stderr[-4000:]


def test_every_model_op_compiles_without_spills(tmp_path):
    """kernels/model_ops.cu: the element-wise kernels of the model runtimes, every value type."""
    from balprune.runtime.model.stages import model_kernel_variants

    names = model_kernel_variants()
    assert len(names) == 5 * 3  # lstm_cell, embedding_row, bias_relu_pool2, im2col, add_relu x 3 value types
    _assert_fit_64_registers_no_spills(tmp_path, names, "model_ops.cu")


def test_every_llama_op_compiles_without_spills(tmp_path):
    """kernels/llama_ops.cu: the decode step's fused norm, attention (RoPE + cache append included) and
    SiLU-multiply."""
    from balprune.runtime.model.llama import llama_kernel_variants

    names = llama_kernel_variants()
    assert len(names) == 3 * 3
    _assert_fit_64_registers_no_spills(tmp_path, names, "llama_ops.cu")


def test_the_persistent_decode_step_compiles_without_spills(tmp_path):
    """kernels/llama_step.cu: every decoder layer in one launch, every value type, within the register budget of
    its 512 threads per CTA (128), no spills, no stack frame."""
    from balprune.runtime.model.llama_step import THREADS, step_kernel_variants

    names = step_kernel_variants()
    r = _nvcc(tmp_path, _instantiating_source(names, "llama_step.cu"), "-c", "-Xptxas", "-v")
    assert r.returncode == 0, r.stderr[-4000:]
    frames = [int(n) for n in re.findall(r"(\d+) bytes stack frame", r.stderr)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", r.stderr)]
    assert len(frames) == len(spills) == len(regs) == 3 and not any(frames), r.stderr[-4000:]
    assert all(s == ("0", "0") for s in spills) and max(regs) <= 65536 // THREADS, r.stderr[-4000:]


@pytest.mark.parametrize("probe", [1, 2, 4, 8, 16, 31, 32, 64, 96])
def test_the_step_kernels_probe_builds_compile(tmp_path, probe):
    """benchmarks/step_probe.py's builds of kernels/llama_step.cu (BP_STEP_PROBE: parts left out) compile."""
    r = _nvcc(tmp_path, _instantiating_source(["bp::llama_step<bp::f16>"], "llama_step.cu"), "--ptx",
              f"-DBP_STEP_PROBE={probe}")
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "k.ptx").read_text().count(".entry ") == 1


def test_lstm_recurrence_compiles_without_spills(tmp_path):
    """kernels/lstm_recurrence.cu: the persistent Bi-LSTM recurrence, every value type."""
    from balprune.runtime.model.recurrence import recurrence_kernel_variants

    names = recurrence_kernel_variants()
    assert len(names) == 3
    _assert_fit_64_registers_no_spills(tmp_path, names, "lstm_recurrence.cu")


def test_lstm_lm_step_compiles_without_spills(tmp_path):
    """kernels/lstm_lm_step.cu: the persistent LM token step, every value and index type."""
    from balprune.runtime.model.lm_step import lm_step_kernel_variants

    names = lm_step_kernel_variants()
    assert len(names) == 6
    _assert_fit_64_registers_no_spills(tmp_path, names, "lstm_lm_step.cu")
