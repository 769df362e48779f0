"""`balprune bench` end to end on the GPU: gate, timings, report schema, compare."""

from __future__ import annotations

import json

import pytest
import torch

from balprune.bench.report import load_report
from balprune.cli import main
from balprune.save import save_state_dict

cupy = pytest.importorskip("cupy", reason="CuPy is not installed: GPU tests need cupy-cuda13x")
if cupy.cuda.runtime.getDeviceCount() < 1:  # pragma: no cover
    pytest.skip("no CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu


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
                    if dtype == torch.float32 and not graph:  # cuSPARSE cannot be graph-captured
                        assert (layer, batch, mode, graph, "csr") in kinds
    for m in rep.measurements:
        assert m.correct and m.median_us > 0 and m.p10_us <= m.median_us <= m.p90_us
        if m.kernel == "balanced":
            assert m.max_rel_error is not None and m.max_rel_error < 2e-2
    assert rep.read_bandwidth_gbps > 100
    by = {(m.layer, m.batch, m.mode, m.graph, m.kernel): m for m in rep.measurements}
    for layer in ("a.weight", "b.weight"):
        # a graph replay cannot be 5x faster than eager launches of the same kernel: it would mean
        # the work was not captured (torch launches on another stream)
        for kernel in ("balanced", "dense"):
            assert by[(layer, 1, "hot", True, kernel)].median_us > 0.2 * by[(layer, 1, "hot", False, kernel)].median_us
    data = json.loads(out.read_text())
    assert data["schema"] == "balprune.bench/1" and data["device"]["name"]
    capsys.readouterr()
    assert main(["compare", str(out), str(out)]) == 0
