"""benchmarks/llm_prune_time.py on the CPU with llama-tiny: it runs the user's prune command, the packed
file it times is a valid wanda-pruned file, and the figures it reports are the child's own."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO

from balprune.formats.packed_file import verify_packed

SCRIPT = REPO / "benchmarks" / "llm_prune_time.py"


def test_times_a_calibrated_prune_and_reports_its_peaks(tmp_path):
    out = tmp_path / "t"
    p = subprocess.run([sys.executable, str(SCRIPT), "--model", "llama-tiny", "--samples", "4", "--seq-len", "32",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "llama-tiny-wanda-cpu:" in p.stdout and "peak resident memory" in p.stdout
    r = json.loads((out / "llama-tiny-wanda-cpu.json").read_text())
    assert r["rc"] == 0 and r["wall_s"] > 0 and r["max_rss_bytes"] > 50 * 2**20  # python + torch at least
    # 2 layers of llama-tiny in float32 (hidden 64, q 64, kv 32, intermediate 176) + 4 x 32 x 64 x 4 bytes
    layer = 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64)
    assert (r["layer_bytes"], r["budget_bytes"]) == (layer, 2 * layer + 4 * 4 * 32 * 64)
    pf = verify_packed(out / "llama-tiny-wanda-cpu.safetensors")
    assert pf.manifest["options"]["criterion"] == "wanda"
