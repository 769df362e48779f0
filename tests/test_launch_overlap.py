"""Programmatic dependent launch (runtime._launch ``overlap``): what can be checked without a GPU.

An overlapped grid may start before the previous grid in the stream has finished, so every kernel
such a launch may run must wait (bp::overlap_prologue) before it touches global memory other than the
step's constants (weights; for the kernels in EARLY_READS, the ones named there): the sources are held
to that here, and the ctypes mirror of cuLaunchKernelEx's structures to cuda.h's layout.
The launches themselves run in tests/gpu/test_llama_gpu.py.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import block_body, global_kernels, strip_comments

from balprune.runtime import _launch
from balprune.runtime.kernels import kernels_dir

SRC = Path(__file__).resolve().parents[1] / "src" / "balprune" / "runtime"


#: the kernels' weight arrays: no grid writes them, so a kernel may prefetch them before its prologue (the delta
#: walk's step words and row-group starts are weights too)
WEIGHTS = {"vals", "idx", "masks", "records", "deltas", "starts"}
#: what may be called before the prologue: the L2 / L1 prefetch of weights and the arithmetic around it (__ffs,
#: min and max included), and __ldg (a read-only load: of a weight array, as the pointer check above holds it)
PRE_PROLOGUE_CALLS = {"prefetch_l2", "prefetch_rows_l2", "prefetch_cta_rows_l2", "prefetch_share", "reinterpret_cast",
                      "prefetch_l1", "prefetch_first_group_l1", "__ldg", "__ffs", "min", "max"}
#: kernels that read other constants of the step before their prologue (bp_common.cuh states the rule), with
#: the pointers they may read there: no grid of the step writes them. add_rms_norm: its norm weights;
#: attention_item (attention_split's body): the KV cache below the position (earlier steps wrote it), staged into
#: shared memory; attention_split reads the position for it (torch writes it between steps, before the step's
#: first overlapped launch can start).
EARLY_READS = {"add_rms_norm": {"w"}, "attention_item": {"keys", "values"}}
EARLY_CALLS = {"sload", "stage_kv", "max", "min"}


#: device functions that hold an overlappable kernel's body (the kernel passes kOverlap = true and calls nothing
#: else): the file that defines each. llama_step.cu runs attention_item with kOverlap = false (one launch, no
#: grid before it in the step).
DELEGATES = {"attention_item": "llama_common.cuh"}


#: pointer parameters into shared memory (a delegate's dynamic shared memory), not global memory
SHARED_PARAMS = {"sm"}


def _device_function(name: str) -> tuple[str, str]:
    """(parameter list, body) of the __device__ function ``name`` (DELEGATES says where it is)."""
    text = strip_comments((kernels_dir() / DELEGATES[name]).read_text())
    m = re.search(r"__device__[^;{]*?\b" + name + r"\s*\(", text)
    assert m, f"{name} not found in {DELEGATES[name]}"
    head_end = text.index("{", m.end())
    return text[m.end():head_end], block_body(text, head_end)


def _check_prologue(filename: str, name: str, params: str, body: str, prologue: str) -> None:
    assert prologue in body, f"{filename}: {name} has no overlap_prologue"
    pre = body[:body.index(prologue)]
    # at the top level of the body, so every thread runs it (a prefetch block before it is closed)
    assert pre.count("{") == pre.count("}"), f"{filename}: {name} calls its prologue inside a block"
    assert not re.search(r"\b(if|for|while)\s*\([^;{}]*\)\s*$", pre), f"{filename}: {name}: conditional prologue"
    pointers = set(re.findall(r"\*\s*(?:__restrict__\s*)?(\w+)", params)) - SHARED_PARAMS
    early = EARLY_READS.get(name, set())
    touched = (pointers - WEIGHTS - early) & set(re.findall(r"\w+", re.sub(r"\.\w+", "", pre)))  # not blockIdx.y
    assert not touched, f"{filename}: {name} uses {sorted(touched)} before its prologue"
    calls = set(re.findall(r"(\w+)\s*\(", pre)) - {"if", "for", "while", "sizeof"}
    allowed = PRE_PROLOGUE_CALLS | (EARLY_CALLS if early else set())
    assert calls <= allowed, f"{filename}: {name} calls {sorted(calls - allowed)} first"
    assert "store" not in pre and "atomic" not in pre, f"{filename}: {name} writes global memory before its prologue"
    if not early:  # (the early readers stage into registers and shared memory: reviewed, EARLY_READS)
        assert "[" not in pre and "__shared__" not in pre and "extern" not in pre, f"{filename}: {name}: {pre[:200]!r}"


@pytest.mark.parametrize("filename", _launch.OVERLAP_KERNEL_FILES)
def test_every_overlappable_kernel_waits_before_it_touches_anything_but_weights(filename):
    text = strip_comments((kernels_dir() / filename).read_text())
    kernels = global_kernels(text)
    assert kernels, f"no kernels in {filename}"
    for name, params, body in kernels:
        delegate = re.search(r"\b(" + "|".join(DELEGATES) + r")\s*<[^>]*\btrue\s*>\s*\(", body)
        if delegate is None:
            _check_prologue(filename, name, params, body, "overlap_prologue();")
            continue
        # a kernel that only hands its launch to a checked device function: nothing before the call but the
        # shared-memory declaration, and the function itself checked (kOverlap's prologue)
        before = body[:delegate.start()].strip()
        assert before in ("", "extern __shared__ float sm[];"), f"{filename}: {name}: {before[:200]!r}"
        assert body[delegate.end():].count(";") == 1, f"{filename}: {name} does more than call {delegate.group(1)}"
        d_params, d_body = _device_function(delegate.group(1))
        _check_prologue(DELEGATES[delegate.group(1)], delegate.group(1), d_params, d_body,
                        "if (kOverlap) overlap_prologue();")


def test_the_prologue_waits_before_it_lets_the_next_grid_in():
    text = strip_comments((kernels_dir() / "bp_common.cuh").read_text())
    body = text[text.index("void overlap_prologue()"):]
    body = body[:body.index("\n}")]
    assert body.index("griddepcontrol.wait") < body.index("griddepcontrol.launch_dependents")


def test_the_product_operators_compile_only_overlappable_sources():
    """Every sparse product operator (a Projection's sparse path may be overlapped) and the decode ops
    build their kernels from OVERLAP_KERNEL_FILES."""
    used = set()
    for py in SRC.glob("*.py"):
        used |= set(re.findall(r'_compiled\(.*?"([\w.]+\.cu)"', py.read_text()))
    used |= set(re.findall(r'load_module\("([\w.]+\.cu)"', (SRC / "model" / "llama.py").read_text()))
    assert {"balanced_spmv.cu", "balanced_bitmask.cu", "nm24_sparse_mma.cu", "bsr_spmv.cu", "llama_ops.cu"} <= used
    assert used <= set(_launch.OVERLAP_KERNEL_FILES), used - set(_launch.OVERLAP_KERNEL_FILES)


def test_the_launch_config_holds_one_serialization_attribute():
    cfg, attr = _launch.overlap_config((3, 2, 1), (128, 1, 1), 4096)
    assert (cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ, cfg.blockDimX, cfg.sharedMemBytes) == (3, 2, 1, 128, 4096)
    assert cfg.numAttrs == 1 and cfg.attrs.contents.id == 6 == _launch.PROGRAMMATIC_STREAM_SERIALIZATION
    assert ctypes.cast(ctypes.addressof(cfg.attrs.contents.value), ctypes.POINTER(ctypes.c_int32))[0] == 1
    assert ctypes.addressof(cfg.attrs.contents) == ctypes.addressof(attr)


def test_a_launch_is_not_both_cooperative_and_overlapped():
    with pytest.raises(ValueError, match="not both"):
        _launch.PreparedLaunch(None, (1,), (1,), (), cooperative=True, overlap=True)


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: cuda.h's layout cannot be read here")
def test_ctypes_structures_match_cuda_h(tmp_path):
    src = tmp_path / "layout.cu"
    src.write_text("""#include <cuda.h>
#include <cstdio>
#include <cstddef>
int main() {
  printf("%zu %zu %zu %zu %zu %zu %zu %d\\n", sizeof(CUlaunchConfig), offsetof(CUlaunchConfig, sharedMemBytes),
         offsetof(CUlaunchConfig, hStream), offsetof(CUlaunchConfig, attrs), offsetof(CUlaunchConfig, numAttrs),
         sizeof(CUlaunchAttribute), offsetof(CUlaunchAttribute, value),
         (int)CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION);
  return 0;
}
""")
    exe = tmp_path / "layout"
    r = subprocess.run([NVCC, str(src), "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    C, A = _launch.LaunchConfig, _launch.LaunchAttribute
    assert got == [ctypes.sizeof(C), C.sharedMemBytes.offset, C.hStream.offset, C.attrs.offset, C.numAttrs.offset,
                   ctypes.sizeof(A), A.value.offset, _launch.PROGRAMMATIC_STREAM_SERIALIZATION]
