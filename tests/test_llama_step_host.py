"""kernels/llama_step.cu's host side on the CPU: the lane records (formats.layouts.lane_records), the kernel's
task split modelled line by line, the stream plan, which decoders it takes, and the constants it shares with
runtime.model.llama_step. The kernel itself runs in tests/gpu/test_llama_step_gpu.py."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from balprune.formats import layouts
from balprune.runtime.kernels import kernel_source
from balprune.runtime.model import llama_step


def _balanced(rng, R: int, B: int, L: int, k: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values [R, k, B], ascending offsets [R, k, B], the dense [R, B * L] matrix they stand for)."""
    idx = np.sort(np.argsort(rng.random((R, B, L)), axis=2)[:, :, :k], axis=2).transpose(0, 2, 1)
    vals = rng.standard_normal((R, k, B)).astype(dtype)
    dense = np.zeros((R, B, L))
    np.put_along_axis(dense, idx.transpose(0, 2, 1), vals.transpose(0, 2, 1).astype(np.float64), axis=2)
    return vals, idx.astype(np.uint8 if L <= 256 else np.uint16), dense.reshape(R, B * L)


GEOMETRIES = [(5, 32, 64, 19), (3, 64, 4, 2), (2, 32, 448, 224), (2, 32, 7, 3), (3, 32, 40, 1), (2, 96, 8, 7),
              (4, 32, 2, 1)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("R, B, L, k", GEOMETRIES)
def test_lane_records_hold_the_matrix_exactly(R, B, L, k, dtype):
    rng = np.random.default_rng(R * 1000 + B + L + k)
    vals, idx, dense = _balanced(rng, R, B, L, k, dtype)
    recs, lg = layouts.lane_records(vals, idx, L)
    assert recs.shape == (R, lg.record_words) and lg.record_bytes % 128 == 0
    assert lg.kept == (B // 32) * k and lg.lane_cols == (B // 32) * L
    x = rng.standard_normal(B * L - 1)  # a row shorter than B * L: the rest is padding (x staged as 0)
    np.testing.assert_allclose(layouts.lane_records_reference(recs, lg, dtype, x), dense[:, :-1] @ x, rtol=1e-12,
                               atol=1e-12)
    # every lane's words hold exactly its kept values, nothing past its columns
    words = recs[:, : 32 * lg.words].reshape(R, lg.words, 32)
    bits = np.unpackbits(words.astype("<u4").view(np.uint8), axis=2, bitorder="little")
    assert (bits.reshape(R, lg.words, 32, 32).sum(axis=(1, 3)) == lg.kept).all()
    assert recs.tobytes() == layouts.lane_records(vals, idx, L)[0].tobytes()  # the same bytes every time


def test_bfloat16_values_are_copied_as_bits():
    rng = np.random.default_rng(1)
    vals, idx, _ = _balanced(rng, 3, 32, 16, 5, np.float32)
    bf = torch.from_numpy(vals).to(torch.bfloat16)
    recs, lg = layouts.lane_records(bf.view(torch.uint16).numpy(), idx, 16)
    dense = np.zeros((3, 32, 16))
    np.put_along_axis(dense, idx.transpose(0, 2, 1).astype(np.int64),
                      bf.float().numpy().transpose(0, 2, 1).astype(np.float64), axis=2)
    x = rng.standard_normal(512)
    np.testing.assert_allclose(layouts.lane_records_reference(recs, lg, "bfloat16", x), dense.reshape(3, 512) @ x,
                               rtol=1e-12)


def test_a_block_count_not_a_multiple_of_32_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        layouts.LaneGeometry(48, 8, 4, 2)


# -- the kernel's task split, modelled statement by statement (task_dot in kernels/llama_step.cu) ----------------

def _task_dot(words: np.ndarray, vals: np.ndarray, W: int, t0: int, t1: int, xs_lane: np.ndarray) -> float:
    """One lane of task_dot: words [W] of the lane, its values [n], x at its local columns."""
    w, before = 0, 0
    m = int(words[0])
    cnt = bin(m).count("1")
    while before + cnt <= t0 and w + 1 < W:
        before += cnt
        w += 1
        m = int(words[w])
        cnt = bin(m).count("1")
    for _ in range(before, t0):
        m &= m - 1
    a0 = a1 = 0.0
    for t in range(t0, t1, 2):
        while m == 0:
            w += 1
            m = int(words[w])
        b = (m & -m).bit_length() - 1
        m &= m - 1
        a0 += vals[t] * xs_lane[32 * w + b]
        if t + 1 < t1:
            while m == 0:
                w += 1
                m = int(words[w])
            b = (m & -m).bit_length() - 1
            m &= m - 1
            a1 += vals[t + 1] * xs_lane[32 * w + b]
    return a0 + a1


def _bounds(n: int, groups: int) -> list[tuple[int, int]]:
    """[t0, t1) of each task, as the kernel computes them."""
    out = []
    for g in range(groups):
        t0 = (g * n // groups) & ~1
        t1 = n if g + 1 == groups else ((g + 1) * n // groups) & ~1
        out.append((t0, t1))
    return out


@pytest.mark.parametrize("groups", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("R, B, L, k", [(2, 32, 448, 224), (2, 32, 64, 19), (2, 64, 40, 13), (3, 32, 300, 3)])
def test_the_task_split_takes_every_value_once(R, B, L, k, groups):
    """Summed over the tasks of a row in task order, the kernel's walk gives the row's product: the tasks'
    value ranges tile [0, n) (even starts, an odd n's last value in the last task), and finding a task's first
    word by counting bits lands where the sequential walk would be (empty words included: L = 300, k = 3)."""
    rng = np.random.default_rng(groups + L)
    vals, idx, dense = _balanced(rng, R, B, L, k, np.float32)
    recs, lg = layouts.lane_records(vals, idx, L)
    x = rng.standard_normal(B * L)
    W, U = lg.words, lg.units
    bounds = _bounds(lg.kept, groups)
    assert [b for b in bounds if b[0] < b[1]] and bounds[0][0] == 0 and bounds[-1][1] == lg.kept
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])) and all(t0 % 2 == 0 for t0, _ in bounds)
    for r in range(R):
        total = 0.0
        for t0, t1 in bounds:
            for j in range(32):
                words = recs[r, : 32 * W].reshape(W, 32)[:, j]
                units = recs[r, 32 * W:].reshape(U, 32)[:, j].copy()
                lane_vals = units.view(np.float32)
                xs_lane = np.zeros(32 * W)
                xs_lane[: lg.lane_cols] = x[j * lg.lane_cols:(j + 1) * lg.lane_cols]
                total += _task_dot(words, lane_vals, W, t0, t1, xs_lane)
        assert total == pytest.approx(dense[r] @ x, rel=1e-9, abs=1e-9)


# -- the stream plan -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, record, kept, pairs", [(3072, 1536, 19, False), (8192, 1536, 19, True),
                                                       (2048, 6016, 77, False), (4096, 16128, 224, False),
                                                       (64, 384, 2, True), (7, 384, 1, False)])
def test_a_phase_plan_fits_its_slot_and_keeps_the_warps_busy(rows, record, kept, pairs):
    plan = llama_step.plan_phase(rows, record, kept, pairs, grid=132, slot_bytes=32768)
    recs = 2 if pairs else 1
    assert plan.unit_bytes == record * recs and plan.chunk_rows * plan.unit_bytes <= 32768
    assert plan.chunk_rows * recs * plan.groups <= llama_step.MAX_TASKS
    assert 1 <= plan.groups <= 16 and (plan.groups == 1 or kept // plan.groups >= llama_step.MIN_TASK_VALUES)
    most = -(-rows // 132)
    chunks = -(-most // plan.chunk_rows)
    assert chunks * plan.chunk_rows - most < plan.chunk_rows  # as even as the slot allows
    if kept >= 16 * llama_step.MIN_TASK_VALUES:  # room for tasks: a chunk keeps every warp busy
        assert min(plan.chunk_rows, most) * recs * plan.groups >= min(llama_step.THREADS // 32, 16 * recs * most)
    with pytest.raises(ValueError, match="does not fit"):
        llama_step.plan_phase(rows, 40000, kept, pairs, grid=132, slot_bytes=32768)


def test_the_kernel_constants_match_the_source():
    src = kernel_source("llama_step.cu")
    assert re.search(r"constexpr int kStepThreads = (\d+);", src).group(1) == str(llama_step.THREADS)
    assert re.search(r"constexpr int kMaxTasks = (\d+);", src).group(1) == str(llama_step.MAX_TASKS)
    # (the flow build's empty mbarriers sit at full + kMaxSlots, both arrays in the 128 bytes the host reserves)
    assert re.search(r"constexpr int kMaxSlots = (\d+);", src).group(1) == str(llama_step.MAX_SLOTS)
    assert 2 * 8 * llama_step.MAX_SLOTS <= 128
    phase = re.search(r"enum PhaseField \{(.*?)\};", src, re.S).group(1)
    names = re.findall(r"\b(k[A-Z]\w*)\b(?:\s*=\s*\d+)?\s*,", re.sub(r"//[^\n]*", "", phase) + ",")
    assert names[-1] == "kPhaseFields" and len(names) - 1 == llama_step.PHASE_FIELDS
    layer = re.search(r"enum LayerField \{(.*?)\};", src, re.S).group(1)
    assert layer.count(",") == llama_step.LAYER_FIELDS and layer.strip().endswith("kLayerFields")
    # hres's size: the same rounding on both sides
    assert "int residual_floats(int hidden, int G) { return ((hidden + G - 1) / G + 31) & ~31; }" in src


@pytest.mark.parametrize("hidden", [128, 896, 2048, 3584, 4096, 5120])
@pytest.mark.parametrize("grid", [16, 78, 114, 132, 144])
def test_hres_holds_every_ctas_residual_rows(hidden, grid):
    """The o / down phases' rows of a CTA (part_begin's split of hidden rows) fit residual_floats."""
    most = max((hidden * (c + 1)) // grid - (hidden * c) // grid for c in range(grid))
    assert most <= llama_step.residual_floats(hidden, grid) < most + 32


# -- which decoders it takes -----------------------------------------------------------------------------------

def _decoder(tmp_path, blocks: int, *extra: str):
    from test_llama_decoder import BASE, _values

    from balprune.cli import main
    from balprune.llm.evaluate import open_model
    from balprune.llm.examples import write_hf_folder
    from balprune.runtime.model.llama import LlamaDecoder, checkpoint_weights, dense_projection

    cfg = replace(BASE, hidden_size=128, intermediate_size=256, head_dim=32)
    folder = write_hf_folder(cfg, tmp_path / "src", tensor_fn=_values)
    out = tmp_path / "p.safetensors"
    assert main(["prune", str(folder), "--sparsity", "0.5", "--blocks", str(blocks), *extra, "-o", str(out)]) == 0
    cfg, ckpt, _ = open_model(out)
    return LlamaDecoder(cfg, checkpoint_weights(ckpt), dtype=torch.float32, device=torch.device("cpu"), max_len=16,
                        make_projection=dense_projection("float32"), keep_stacked=True)


@pytest.mark.parametrize("index,dtype", [("bitmask", "float32"), ("offsets", "float32"), ("bitmask", "float16"),
                                         ("bitmask", "bfloat16")])
def test_stacked_records_are_the_decoders_matrices(tmp_path, index, dtype):
    """Every layer's four groups in the kernel's phase order, each one matrix (q/k/v and gate/up stacked);
    their records hold the decoder's masked matrices exactly, gate row i beside up row i, the values cast to
    the dtype the model runs in (a float32 file decoded in 16 bits: the first GPU run refused it instead)."""
    dec = _decoder(tmp_path, 32, "--index", index)
    tdt = getattr(torch, dtype)
    assert llama_step.unsupported(dec, dec.stacked) is None
    rng = np.random.default_rng(0)
    for layer, kept in zip(dec.layers, dec.stacked):
        assert list(kept) == list(llama_step.PHASE_KEYS)
        for key in llama_step.PHASE_KEYS:
            recs, lg = llama_step.stacked_records(kept[key][0], key == "gate_up", tdt)
            dense = layer.projections[key][0].dense.to(tdt).double().numpy()
            if key == "gate_up":
                dense = dense.reshape(2, -1, dense.shape[1]).transpose(1, 0, 2).reshape(dense.shape)
            x = rng.standard_normal(dense.shape[1])
            np.testing.assert_allclose(layouts.lane_records_reference(recs, lg, dtype, x), dense @ x, rtol=1e-12,
                                       atol=1e-12)


def test_four_blocks_per_row_are_not_taken(tmp_path):
    dec = _decoder(tmp_path, 4)
    assert "multiple of 32" in llama_step.unsupported(dec, dec.stacked)
    assert "kept no stacked" in llama_step.unsupported(dec, None)
