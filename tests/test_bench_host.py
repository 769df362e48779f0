"""The bench report's derived rows (subject, chosen path, ideal), its JSON, table and sweep plot: CPU only."""

from __future__ import annotations

import json

import pytest
from helpers import gpu_skip_reason

from balprune.bench.report import BenchReport, Measurement, load_report, rows, selection
from balprune.cli import render


def _m(kernel, median, *, layer="s=0.9", batch=1, nbytes=40_000_000, correct=True):
    return Measurement(layer, (16384, 8192), "F16", batch, "cold", False, kernel, median, median * 0.95,
                       median * 1.05, nbytes, nbytes / median / 1e3, 50.0, 1e-4, correct, "")


def _report(ms, **kw):
    return BenchReport("sweep", {"name": "Test GPU"}, 4000.0, ms, **kw)


def test_path_is_the_faster_of_our_kernel_and_dense_and_says_why():
    rep = _report([_m("balanced", 20.0), _m("dense", 60.0), _m("csr", 45.0), _m("stream", 12.0),
                   _m("balanced", 80.0, batch=8), _m("dense", 40.0, batch=8)])
    by_batch = {r["batch"]: r for r in rows(rep)}
    one, eight = by_batch[1], by_batch[8]
    assert one["subject"] == "balanced" and one["path"] == "balanced" and one["path_reason"] == ""
    assert one["speedup"]["dense"] == pytest.approx(3.0) and one["speedup"]["csr"] == pytest.approx(2.25)
    assert "stream" not in one["speedup"]
    assert one["ideal_us"] == pytest.approx(40_000_000 / 4000e3)  # bytes / (GB/s * 1e3) in us
    assert eight["path"] == "dense" and eight["path_us"] == 40.0
    assert eight["path_reason"] == "balanced kernel 2.00x slower than dense here"
    assert eight["path_speedup_vs_dense"] == pytest.approx(1.0)
    assert eight["speedup"]["dense"] == pytest.approx(0.5)  # the kernel's own ratio stays visible


def test_a_near_tie_is_the_path_that_reads_fewer_bytes_as_in_the_runtime():
    """bench reports the path by the runtime's rule (runtime.measure.pick_path): within 3% of dense, the balanced
    kernel, which reads a third of the bytes, is the path, and the reason says so."""
    rep = _report([_m("balanced", 10.2, nbytes=4_500_000), _m("dense", 10.0, nbytes=12_600_000)])
    (row,) = rows(rep)
    assert row["path"] == "balanced" and row["path_us"] == 10.2
    assert row["path_reason"] == "within 3% of dense (10.0 us), 4.50 MB read against 12.60 MB"
    rep = _report([_m("balanced", 10.5, nbytes=4_500_000), _m("dense", 10.0, nbytes=12_600_000)])
    assert rows(rep)[0]["path"] == "dense"


def test_failed_kernel_is_never_the_path():
    rep = _report([_m("balanced", 1.0, correct=False), _m("dense", 60.0)])
    (row,) = rows(rep)
    assert row["path"] == "dense" and row["speedup"] == {"dense": None}


def test_block_layer_subject_is_bsr_and_peers_do_not_count_as_ours():
    rep = _report([_m("bsr", 30.0, layer="blk"), _m("torch_bsr", 20.0, layer="blk"), _m("dense", 50.0, layer="blk")])
    (row,) = rows(rep)
    assert row["subject"] == "bsr" and row["path"] == "bsr"  # torch's BSR is a peer, not a path of ours
    assert row["speedup"]["torch_bsr"] == pytest.approx(20 / 30)


def test_report_json_round_trip_with_selection_unavailable_and_meta(tmp_path):
    rep = _report([_m("balanced", 20.0), _m("dense", 60.0)],
                  unavailable=[{"layer": "s=0.9", "batch": 1, "kernel": "torch_2:4", "reason": "float32"}],
                  meta={"kind": "paper-sweep", "sparsities": {"s=0.9": 0.9}})
    path = tmp_path / "r.json"
    rep.write(path)
    data = json.loads(path.read_text())
    assert data["schema"] == "balprune.bench/2"
    assert data["selection"] == selection(rep) and data["selection"][0]["path"] == "balanced"
    back = load_report(path)
    assert back.measurements == rep.measurements and back.unavailable == rep.unavailable and back.meta == rep.meta
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # atomic: no temp left behind


def test_version_1_reports_are_still_read(tmp_path):
    rep = _report([_m("balanced", 20.0)])
    d = rep.to_dict()
    d = {"schema": "balprune.bench/1", "file": d["file"], "device": d["device"],
         "read_bandwidth_gbps": d["read_bandwidth_gbps"], "measurements": d["measurements"]}
    (tmp_path / "v1.json").write_text(json.dumps(d))
    assert load_report(tmp_path / "v1.json").measurements == rep.measurements


def test_table_has_totals_path_and_na_reasons():
    rep = _report([_m("balanced", 20.0, layer="a"), _m("dense", 60.0, layer="a"),
                   _m("balanced", 10.0, layer="b"), _m("dense", 5.0, layer="b")],
                  unavailable=[{"layer": "a", "batch": 1, "kernel": "torch_2:4", "reason": "needs 16-bit values"}])
    console = render.console()
    with console.capture() as cap:
        console.print(render.bench_table(rep, rows(rep)))
    text = cap.get()
    assert "total" in text and "30.0" in text and "65.0" in text  # kernel total 30, dense total 65
    assert "25.0 us = 2.60x dense" in text  # path total: 20 (balanced on a) + 5 (dense on b)
    assert "dense (2.00x)" in text and "so the runtime uses dense" in text
    assert "n/a torch_2:4 (a, batch 1): needs 16-bit values" in text


def test_sweep_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is in the dev extra; CI installs it")
    from balprune.bench.sweep import plot_sweep

    ms = []
    for sp, name in ((0.5, "s=0.5"), (0.9, "s=0.9")):
        for batch in (1, 8):
            ms += [_m("balanced", 40 * (1 - sp) * batch, layer=name, batch=batch),
                   _m("dense", 60.0 * batch, layer=name, batch=batch), _m("csr", 50.0, layer=name, batch=batch)]
    rep = _report(ms, meta={"kind": "paper-sweep", "rows": 16384, "cols": 8192, "dtype": "float16",
                            "sparsities": {"s=0.5": 0.5, "s=0.9": 0.9}})
    out = tmp_path / "sweep.png"
    plot_sweep(rep, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]


@pytest.mark.skipif(gpu_skip_reason() is None, reason="a GPU is present: the no-GPU path cannot be exercised here")
def test_bench_sweep_without_a_gpu_exits_6(cli, tmp_path):
    r = cli("bench-sweep", "--json", tmp_path / "s.json")
    assert r.code == 6 and r.err.startswith("balprune: error:") and r.err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,code", [
    (["--dtype", "float64"], 2),
    (["--sparsities", "0.5,1.5"], 2),
    (["--batch", "0"], 2),
    (["--rows", "-3"], 2),
])
def test_bench_sweep_bad_options(cli, tmp_path, args, code):
    r = cli("bench-sweep", "--json", tmp_path / "s.json", *args)
    assert r.code == code and r.err.count("\n") == 1, r
    assert list(tmp_path.iterdir()) == []


def test_bench_sweep_output_folder_checked_before_the_run(cli, tmp_path):
    r = cli("bench-sweep", "--json", tmp_path / "missing" / "s.json")
    assert r.code == 5 and "does not exist" in r.err and r.err.count("\n") == 1
    r = cli("bench-sweep", "--json", tmp_path / "s.json", "--plot", tmp_path / "nope" / "p.png")
    assert r.code == 5 and list(tmp_path.iterdir()) == []


def test_block_peer_keeps_whole_tiles_at_the_layer_sparsity():
    import torch

    from balprune.bench.peers import block_peer
    from balprune.patterns.kinds import keep_count

    w = torch.randn(100, 70, generator=torch.Generator().manual_seed(0))
    bt = block_peer(w, 0.9)
    tiles = 13 * 9  # ceil(100/8) x ceil(70/8)
    assert bt.block_shape == (8, 8) and bt.values.shape[0] == keep_count(0.9, tiles)
    dense = bt.to_dense()
    kept = dense != 0
    assert torch.equal(dense[kept], w[kept])  # kept weights are the layer's own
    def per_tile(m):  # [100, 70] -> [117 tiles, 64], zero padded to whole tiles
        return torch.nn.functional.pad(m, (0, 2, 0, 4)).reshape(13, 8, 9, 8).permute(0, 2, 1, 3).reshape(117, 64)

    kept_n = per_tile(kept.float()).sum(1)
    inside_n = per_tile(torch.ones(100, 70)).sum(1)
    assert bool(((kept_n == 0) | (kept_n == inside_n)).all())  # every tile kept or dropped whole
    norms = per_tile(w).norm(dim=1)
    chosen = kept_n > 0
    assert norms[chosen].min() >= norms[~chosen].max()  # the largest tiles by L2 norm


def test_24_peer_needs_16_bit_values_and_says_so():
    import torch

    from balprune.bench.peers import Unavailable, _torch_24

    c, w24 = _torch_24(torch.randn(64, 64), torch.randn(64), 0)
    assert isinstance(c, Unavailable) and "float16/bfloat16" in c.reason and w24 is None
