"""CI verdicts of ``bench`` on the CPU: the input is checked before the GPU, only balprune's own
paths make it fail, and the libraries' notices never reach stderr.

- a missing or corrupted packed file is exit 4 with one line, before any GPU is looked for (this
  machine has none: a valid file gets exit 6 there), for ``bench`` and ``bench --model``;
- exit 7 means one of balprune's own paths (bench.report.own_failures) failed its gate; a peer
  that fails is shown as failed in the table and the JSON, untimed, and the run exits 0;
- the peers' library calls are made under bench.peers.quiet_libraries.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, gpu_skip_reason, small_lm_packed

from balprune.bench.report import BenchReport, Measurement, own_failures

GOLDEN = REPO / "tests" / "golden" / "balanced.safetensors"
NO_GPU = gpu_skip_reason() is not None


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _corrupt_index(tmp_path):
    """The golden balanced file with one index of fc.weight out of its block (byte 0xFF)."""
    from balprune.formats.packed_file import read_packed

    bad = tmp_path / "bad_index.safetensors"
    shutil.copyfile(GOLDEN, bad)
    e = read_packed(bad).parsed.entry("fc.weight::indices")
    data = bytearray(bad.read_bytes())
    data[e.begin] = 0xFF
    bad.write_bytes(bytes(data))
    return bad


def _truncated(tmp_path):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(GOLDEN.read_bytes()[:-40])
    return bad


@pytest.fixture
def no_gpu_probe(monkeypatch):
    """Make looking for a GPU a test failure: the file must be refused before that."""
    from balprune.runtime import _gpu

    def probe(*a, **k):
        raise AssertionError("the GPU was looked for before the file was checked")

    monkeypatch.setattr(_gpu, "require_device", probe)
    monkeypatch.setattr(_gpu, "cupy", probe)


# --------------------------------------------------------------------------- the file before the GPU

@pytest.mark.parametrize("model", [False, True], ids=["layers", "model"])
@pytest.mark.parametrize("make", ["missing", "index out of range", "truncated"])
def test_bad_file_is_exit_4_before_the_gpu(cli, tmp_path, no_gpu_probe, make, model):
    path = {"missing": lambda: tmp_path / "nope.safetensors", "index out of range": lambda: _corrupt_index(tmp_path),
            "truncated": lambda: _truncated(tmp_path)}[make]()
    before = _sha(path) if path.exists() else None
    out = tmp_path / "out"
    out.mkdir()
    r = cli("bench", path, *(["--model"] if model else []), "--json", out / "r.json")
    assert r.code == 4, r
    assert r.err.startswith("balprune: error:") and r.err.count("\n") == 1, r.err
    assert r.out == "" and list(out.iterdir()) == []
    assert (_sha(path) if path.exists() else None) == before


def test_the_corrupted_index_is_what_verify_refuses(cli, tmp_path):
    """Control for the test above: the file is refused for its index, not for something else."""
    r = cli("verify", _corrupt_index(tmp_path))
    assert r.code == 4 and "fc.weight" in r.err, r


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present: the no-GPU path cannot be exercised here")
def test_valid_file_reaches_the_gpu_check_and_exits_6(tmp_path):
    """In a fresh process (the real CuPy probe): a valid packed file gets exit 6 here, one line."""
    from helpers import run_subprocess

    for args in (["bench", GOLDEN], ["bench", small_lm_packed(tmp_path), "--model", "--dtype", "float16"]):
        r = run_subprocess(*args, "--json", tmp_path / "r.json", timeout=300)
        assert r.returncode == 6, (args, r.stderr)
        assert r.stderr.startswith("balprune: error:") and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------- exit 7 only for our own paths

def _m(kernel, *, layer="mlp.up_proj.weight", correct=True, batch=4, err=1e-4):
    t = 50.0 if correct else math.nan
    note = "" if correct else f"failed the correctness gate (relative error {err:.2e} > bound 5.0e-04); not timed"
    return Measurement(layer, (4096, 14336), "F16", batch, "cold", False, kernel, t, t, t, 10_000_000,
                       0.0 if not correct else 200.0, 0.0 if not correct else 5.0, err, correct, note)


def _fake_bench(monkeypatch, measurements, meta=None):
    """Replace the GPU part of ``bench`` (bench_file / bench_model) by a report of ``measurements``."""
    import balprune.bench.model as bm
    import balprune.bench.run as br

    def fake(*a, **k):
        return BenchReport("llama.safetensors", {"name": "Test GPU"}, 4000.0, list(measurements),
                           meta=dict(meta or {}))

    monkeypatch.setattr(br, "bench_file", fake)
    monkeypatch.setattr(bm, "bench_model", fake)


def test_a_peer_failing_its_gate_is_reported_and_the_run_exits_0(cli, tmp_path, monkeypatch):
    _fake_bench(monkeypatch, [_m("balanced"), _m("dense"), _m("csr", correct=False, err=2.56e-3), _m("stream")])
    r = cli("bench", GOLDEN, "--batch", "4", "--json", tmp_path / "r.json")
    assert r.code == 0, r
    assert "failed" in r.out and "a peer: reported, not fatal" in r.out and "2.56e-03" in r.out
    data = json.loads((tmp_path / "r.json").read_text())
    (csr,) = [m for m in data["measurements"] if m["kernel"] == "csr"]
    untimed = csr["median_us"] is None or math.isnan(csr["median_us"])  # JSON null (or NaN in older writers)
    assert csr["correct"] is False and untimed and csr["max_rel_error"] == 2.56e-3
    assert data["selection"][0]["path"] == "balanced"


@pytest.mark.parametrize("kernel", ["balanced", "dense"])
def test_our_own_path_failing_is_exit_7_with_one_line(cli, tmp_path, monkeypatch, kernel):
    ms = [_m("balanced"), _m("dense"), _m("csr")]
    ms = [_m(kernel, correct=False, err=0.3) if m.kernel == kernel else m for m in ms]
    _fake_bench(monkeypatch, ms)
    r = cli("bench", GOLDEN, "--json", tmp_path / "r.json")
    assert r.code == 7, r
    assert r.err.startswith("balprune: error:") and r.err.count("\n") == 1 and kernel in r.err, r.err
    assert json.loads((tmp_path / "r.json").read_text())["measurements"]  # the report is still written


def test_balprunes_bsr_kernel_on_a_balanced_layers_block_peer_is_a_peer():
    """On a balanced layer, bsr times the block-sparse peer matrix: not the layer's path."""
    rep = BenchReport("f", {}, 1.0, [_m("balanced"), _m("dense"), _m("bsr", correct=False)])
    assert own_failures(rep) == []
    blk = BenchReport("f", {}, 1.0, [_m("bsr", correct=False), _m("dense"), _m("torch_bsr")])
    assert [m.kernel for m in own_failures(blk)] == ["bsr"]  # a block layer: bsr is its own kernel


def test_unstructured_layers_subject_csr_is_a_library_not_ours():
    rep = BenchReport("f", {}, 1.0, [_m("csr", correct=False), _m("dense")])
    assert own_failures(rep) == []
    rep = BenchReport("f", {}, 1.0, [_m("csr"), _m("dense", correct=False)])
    assert [m.kernel for m in own_failures(rep)] == ["dense"]


@pytest.mark.parametrize("runner,code", [("torch", 0), ("balprune", 7)])
def test_model_report_only_balprunes_runner_is_fatal(cli, tmp_path, monkeypatch, runner, code):
    ms = [_m("balprune", layer="model"), _m("torch", layer="model")]
    ms = [_m(runner, layer="model", correct=False, err=0.5) if m.kernel == runner else m for m in ms]
    _fake_bench(monkeypatch, ms, meta={"model": {"architecture": "lstm-lm", "dtypes": {}}})
    r = cli("bench", GOLDEN, "--model")
    assert r.code == code, r
    assert (r.err.count("\n") == 1 and "balprune" in r.err) if code == 7 else r.err == ""


# --------------------------------------------------------------------------- library notices

_LIBRARY_CALLS = (
    "import torch\n"
    "w = torch.randn(16, 16)\n"
    "x = torch.randn(16)\n"
)


def _python(code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_peer_construction_keeps_torch_notices_off_stderr():
    """torch's CSR ("in beta") and BSR ("invariant checks") notices, raised where the peers build
    and run their tensors (here on the CPU, where they are raised the same way), stay silent."""
    peers = _python(_LIBRARY_CALLS + (
        "from balprune.bench.peers import _csr, _torch_bsr, block_peer, quiet_libraries\n"
        "c = _csr(w.half(), x.half(), 0)\n"
        "b = _torch_bsr(block_peer(w, 0.5), x, 0, torch.device('cpu'))\n"
        "fns = b.make(2)\n"
        "with quiet_libraries():\n"
        "    b.run()\n"
        "print(type(c).__name__, type(b).__name__)\n"))
    assert peers.returncode == 0, peers.stderr
    assert peers.stderr == "", peers.stderr
    # Control: the same library calls made directly print both notices (so the test can fail).
    raw = _python(_LIBRARY_CALLS + (
        "s = w.half().to_sparse_csr()\n"
        "b = torch.sparse_bsr_tensor(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.randn(2, 8, 8), size=(16, 16))\n"))
    assert "Sparse CSR tensor support is in beta" in raw.stderr and "invariant" in raw.stderr, raw.stderr
