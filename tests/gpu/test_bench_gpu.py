"""`balprune bench` end to end on the GPU: gate, timings, report schema, compare."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import gpu_skip_reason

from balprune.bench.report import load_report
from balprune.cli import main
from balprune.save import save_state_dict

_why = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why is not None, reason=_why or "")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bench_command_gates_times_and_reports(tmp_path, dtype, capsys):
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "m.safetensors"
    save_state_dict({"a.weight": torch.randn(512, 1500, generator=g).to(dtype),
                     "b.weight": torch.randn(300, 256, generator=g).to(dtype),
                     "b.bias": torch.randn(300, generator=g).to(dtype)}, src)
    packed = tmp_path / "m.balanced.safetensors"
    assert main(["prune", str(src), "-s", "0.9", "-o", str(packed)]) == 0
    out = tmp_path / "r.json"
    code = main(["bench", str(packed), "--batch", "1,4", "--graph", "--iters", "30", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    rep = load_report(out)
    kinds = {(m.layer, m.batch, m.mode, m.graph, m.kernel) for m in rep.measurements}
    for layer in ("a.weight", "b.weight"):
        for batch in (1, 4):
            for mode in ("cold", "hot"):
                for graph in (False, True):
                    assert (layer, batch, mode, graph, "balanced") in kinds
                    assert (layer, batch, mode, graph, "dense") in kinds
                    assert (layer, batch, mode, graph, "stream") in kinds
                    assert (layer, batch, mode, graph, "bsr") in kinds  # the 8x8 block peer, ours
    # every library peer is either measured eagerly or listed as unavailable with its reason
    na = {(u["layer"], u["batch"], u["kernel"]) for u in json.loads(out.read_text())["unavailable"]}
    for layer in ("a.weight", "b.weight"):
        for batch in (1, 4):
            for peer in ("csr", "torch_bsr", "torch_2:4"):
                assert ((layer, batch, "cold", False, peer) in kinds) != ((layer, batch, peer) in na), (layer, peer)
    if dtype == torch.float32:  # cupyx cuSPARSE always runs float32; 2:4 needs 16-bit values
        assert ("a.weight", 1, "cold", False, "csr") in kinds and ("a.weight", 1, "torch_2:4") in na
    for m in rep.measurements:
        assert m.correct and m.median_us > 0 and m.p10_us <= m.median_us <= m.p90_us
        if m.kernel != "stream":
            assert m.max_rel_error is not None and m.max_rel_error < 2e-2, m
    assert rep.read_bandwidth_gbps > 100
    by = {(m.layer, m.batch, m.mode, m.graph, m.kernel): m for m in rep.measurements}
    for layer in ("a.weight", "b.weight"):
        # a graph replay cannot be 5x faster than eager launches of the same kernel: it would mean
        # the work was not captured (torch launches on another stream)
        for kernel in ("balanced", "dense"):
            assert by[(layer, 1, "hot", True, kernel)].median_us > 0.2 * by[(layer, 1, "hot", False, kernel)].median_us
    data = json.loads(out.read_text())
    assert data["schema"] == "balprune.bench/2" and data["device"]["name"]
    capsys.readouterr()
    assert main(["compare", str(out), str(out)]) == 0


def test_bench_block_layers_are_timed_with_our_bsr_kernel(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    src = tmp_path / "m.safetensors"
    save_state_dict({"c.weight": torch.randn(520, 1000, generator=g).to(torch.float16)}, src)
    packed = tmp_path / "m.block.safetensors"
    assert main(["prune", str(src), "--pattern", "block", "-s", "0.9", "-o", str(packed)]) == 0
    out = tmp_path / "r.json"
    assert main(["bench", str(packed), "--iters", "20", "--hot", "--json", str(out)]) == 0, capsys.readouterr().err
    rep = load_report(out)
    kernels = {m.kernel for m in rep.measurements}
    assert {"bsr", "dense", "stream"} <= kernels and "balanced" not in kernels
    sel = json.loads(out.read_text())["selection"]
    assert sel and all(s["subject"] == "bsr" and s["path"] in ("bsr", "dense") for s in sel)


def test_bench_sweep_writes_report_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    code = main(["bench-sweep", "--rows", "1024", "--cols", "2048", "--sparsities", "0.5,0.9", "--batch", "1,8",
                 "--iters", "20", "--json", str(out), "--plot", str(png)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["meta"]["kind"] == "paper-sweep" and set(data["meta"]["sparsities"]) == {"s=0.5", "s=0.9"}
    layers = {(m["layer"], m["batch"]) for m in data["measurements"] if m["kernel"] == "balanced"}
    assert layers == {("s=0.5", 1), ("s=0.5", 8), ("s=0.9", 1), ("s=0.9", 8)}
    assert all(s["ideal_us"] > 0 for s in data["selection"])
    assert png.read_bytes()[:4] == b"\x89PNG"
