"""The packed Llama-family decode runtime (runtime.model.llama.PackedLlama) on a GPU.

Against the float32 dense masked reference model (llm.reference.ReferenceLM) of the same packed
file: the logits of every step of 64 from a 32-token prompt within MODEL_TOLERANCE for each dtype and
forced path, and in float32 the greedy tokens identical; CUDA-graph replay equal to eager; qwen3 /
qwen2 / mistral variants; a run past the cache refused before any launch.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import gpu_skip_reason

_why = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why is not None, reason=_why or "")]

from balprune.errors import UsageError  # noqa: E402
from balprune.llm.evaluate import open_model  # noqa: E402
from balprune.llm.reference import ReferenceLM  # noqa: E402
from balprune.runtime.measure import MODEL_TOLERANCE, relative_error  # noqa: E402

PROMPT = [(7 * i + 3) % 250 for i in range(32)]
STEPS = 64


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from test_llama_decoder import _packed

    out = {}
    for name, args in {"balanced": (), "nm24": ("--nm", "2:4")}.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = _packed(d, None, *args)
    return out


@functools.cache
def _reference_run(path, n=STEPS):
    """float32 reference logits [n, vocab] of the prompt's last position and n - 1 greedy steps, and the tokens."""
    cfg, ckpt, _ = open_model(path)
    ref = ReferenceLM.from_checkpoint(cfg, ckpt)
    cache = ref.new_cache(len(PROMPT) + n)
    logits = [ref.step(torch.tensor([PROMPT]), cache)[0, -1]]
    tokens = [int(torch.argmax(logits[-1]))]
    for _ in range(n - 1):
        logits.append(ref.step(torch.tensor([[tokens[-1]]]), cache)[0, -1])
        tokens.append(int(torch.argmax(logits[-1])))
    return torch.stack(logits), tokens


@pytest.mark.parametrize("fused", [True, False], ids=["fused-ops", "torch-ops"])
@pytest.mark.parametrize("paths", ["auto", "sparse", "dense"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["balanced", "nm24"])
def test_decode_steps_against_the_float32_reference(packed, kind, dtype, paths, fused):
    from balprune.runtime.model.llama import PackedLlama

    want, tokens = _reference_run(packed[kind])
    rt = PackedLlama.open(packed[kind], max_len=len(PROMPT) + STEPS, dtype=dtype, paths=paths, fused=fused)
    assert rt.decode_ops["path"] == ("fused" if fused else "torch ops"), rt.decode_ops
    if paths == "sparse":
        assert any(c.path != "dense" for c in rt.choices)
    got = [rt.prefill(PROMPT).cpu()]
    for t in tokens[:-1]:  # teacher-forced on the reference's tokens, so the steps compare like for like
        got.append(rt.step(t).cpu())
    err = max(relative_error(g, w) for g, w in zip(got, want))
    assert err <= MODEL_TOLERANCE[dtype], err
    if dtype == "float32":
        rt.reset()
        assert rt.generate(PROMPT, STEPS) == tokens


@pytest.mark.parametrize("kind", ["balanced", "nm24"])
def test_bitmask_stored_products_offer_the_bitmask_kernel_gated(packed, kind):
    """`prune --index auto` stores these files with bitmask indices: every pruned product is timed on the
    bitmask kernel (each of its walks) as well as the offsets kernel (a 2:4 one on the sparse tensor cores too), and each
    passes the correctness gate."""
    from balprune.patterns.registry import MODEL_BITMASK_PATH
    from balprune.runtime.measure import STAGE_TOLERANCE
    from balprune.runtime.model.llama import PackedLlama

    rt = PackedLlama.open(packed[kind], max_len=len(PROMPT) + 8, dtype="float16")
    pruned = [c for c in rt.choices if c.pattern != "dense"]
    assert pruned
    for c in pruned:
        assert {"balanced", MODEL_BITMASK_PATH} <= set(c.times_us), (c.layer, c.times_us, c.unavailable)
        assert not any(k.startswith(MODEL_BITMASK_PATH) for k in c.unavailable), c.unavailable  # every walk ran
        assert c.errors[MODEL_BITMASK_PATH] <= STAGE_TOLERANCE["float16"], c.errors
        assert c.bytes[MODEL_BITMASK_PATH] > 0
        if kind == "nm24":  # 2:4 in fp16 also runs on the sparse tensor cores
            assert c.errors["balanced_nm24"] <= STAGE_TOLERANCE["float16"], c.errors


def test_graph_replay_equals_eager(packed):
    from balprune.runtime.model.llama import PackedLlama

    rt = PackedLlama.open(packed["balanced"], max_len=64, dtype="float16")
    eager = rt.generate(PROMPT, 20)
    eager_logits = rt.decoder.logits.clone()
    rt.capture()
    assert rt.generate(PROMPT, 20) == eager
    assert torch.equal(rt.decoder.logits, eager_logits)


@pytest.mark.parametrize("paths", ["sparse", "auto"])
def test_overlapped_launches_decode_exactly_as_ordinary_ones(packed, paths):
    """Programmatic dependent launches (runtime._launch ``overlap``) of every fused op and sparse product,
    eager and from a CUDA graph: the same tokens and bit-identical logits as ordinary launches (a kernel
    that read its input before the previous grid finished would not be)."""
    from balprune.runtime.model.llama import PackedLlama

    rt = PackedLlama.open(packed["balanced"], max_len=64, dtype="float16", paths=paths, overlap=False)
    assert rt.decode_ops["path"] == "fused"
    if paths == "sparse":  # "auto" may time cuBLAS faster on this tiny model
        assert any(c.path != "dense" for c in rt.choices)
    plain = rt.generate(PROMPT, 20)
    plain_logits = rt.decoder.logits.clone()
    rt.set_overlap(True)
    assert rt.generate(PROMPT, 20) == plain
    assert torch.equal(rt.decoder.logits, plain_logits)
    rt.capture()
    assert rt.generate(PROMPT, 20) == plain
    assert torch.equal(rt.decoder.logits, plain_logits)
    # built overlapped (its dispatch may pick other kernels): held to the float32 reference, teacher-forced
    want, tokens = _reference_run(packed["balanced"])
    rt = PackedLlama.open(packed["balanced"], max_len=64, dtype="float16", paths=paths, overlap=True)
    rt.capture()
    got = [rt.prefill(PROMPT).cpu()] + [rt.step(t).cpu() for t in tokens[:8]]
    assert max(relative_error(g, w) for g, w in zip(got, want)) <= MODEL_TOLERANCE["float16"]


def test_runs_past_the_cache_are_refused(packed):
    from balprune.runtime.model.llama import PackedLlama

    rt = PackedLlama.open(packed["balanced"], max_len=40, dtype="float16", measure=False)
    with pytest.raises(UsageError, match="no prompt"):
        rt.step()
    with pytest.raises(UsageError, match="need 41 cache positions"):
        rt.generate(PROMPT, 10)
    rt.prefill(PROMPT)
    for _ in range(8):
        rt.step()
    pos = int(rt.decoder.pos)
    with pytest.raises(UsageError, match="do not fit"):
        rt.step()
    assert int(rt.decoder.pos) == pos == 40


@pytest.mark.parametrize("variant", ["qwen3-qk-norm", "qwen2-biases", "mistral-window-4"])
def test_family_variants(tmp_path, variant):
    from test_llama_decoder import _packed

    from balprune.runtime.model.llama import PackedLlama

    path = _packed(tmp_path, variant)
    want, tokens = _reference_run(path, 16)
    rt = PackedLlama.open(path, max_len=64, dtype="float32")
    assert rt.decode_ops["path"] == "fused", rt.decode_ops
    got = [rt.prefill(PROMPT).cpu()] + [rt.step(t).cpu() for t in tokens[:-1]]
    assert max(relative_error(g, w) for g, w in zip(got, want)) <= MODEL_TOLERANCE["float32"]


#: wide heads for attention_split's RoPE, per-head norms and cache append (the VARIANTS have head_dim 8 / 16):
#: several elements per thread in its loops (d 256), rep 1 and 8, a chunk that does not divide max_len
WIDE = {"d64-rep8": dict(head_dim=64, num_attention_heads=8, num_key_value_heads=1),
        "d128-rep1": dict(head_dim=128, num_attention_heads=2, num_key_value_heads=2),
        "d256-rep2-qk-norm": dict(model_type="qwen3", head_dim=256, num_attention_heads=4, num_key_value_heads=2,
                                  rms_norm_eps=1e-6, rope_theta=1e6)}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", list(WIDE))
def test_wide_heads_decode_against_the_float32_reference(tmp_path, shape, dtype):
    """The fused step (RoPE and the cache append inside attention_split) on wide heads, every dtype, over 64
    steps (positions 32 .. 95: several cache chunks) of a 100-position cache, against the float32 reference."""
    from dataclasses import replace

    from test_llama_decoder import BASE, _values

    from balprune.cli import main
    from balprune.llm.examples import write_hf_folder
    from balprune.runtime.model.llama import FusedOps, PackedLlama

    cfg = replace(BASE, **WIDE[shape])
    folder = write_hf_folder(cfg, tmp_path / "src", tensor_fn=_values)
    path = tmp_path / "p.safetensors"
    assert main(["prune", str(folder), "--sparsity", "0.5", "--blocks", "4", "-o", str(path)]) == 0
    want, tokens = _reference_run(path)
    rt = PackedLlama.open(path, max_len=100, dtype=dtype)
    assert rt.decode_ops["path"] == "fused", rt.decode_ops
    assert 100 % FusedOps.attention_chunk(rt.cfg) != 0
    got = [rt.prefill(PROMPT).cpu()] + [rt.step(t).cpu() for t in tokens[:-1]]
    assert max(relative_error(g, w) for g, w in zip(got, want)) <= MODEL_TOLERANCE[dtype]


def test_generate_command_runs_the_packed_runtime(packed, cli):
    """`balprune generate` on a GPU: the packed runtime, greedy tokens equal to the float32 reference's."""
    import json

    from balprune.llm.text import load_tokenizer

    r = cli("generate", str(packed["balanced"]), "--prompt", "def main():\n    return 1", "--max-new-tokens", "12",
            "--device", "cuda", "--dtype", "float32", "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["runtime"].startswith("packed decode runtime") and len(res["new_tokens"]) == 12
    cfg, ckpt, tok = open_model(packed["balanced"])
    ref = ReferenceLM.from_checkpoint(cfg, ckpt)
    ids = load_tokenizer(tok).encode("def main():\n    return 1", add_special_tokens=True).ids
    assert res["new_tokens"] == ref.generate(ids, 12)
    sampled = cli("generate", str(packed["balanced"]), "--prompt", "x = ", "--max-new-tokens", "8", "--device", "cuda",
                  "--temperature", "1.0", "--seed", "2", "--json")
    assert sampled.code == 0 and len(json.loads(sampled.out)["new_tokens"]) == 8, sampled.err


def test_bench_model_on_a_llama_file(packed, cli, tmp_path):
    """`bench --model`: both runners inside the tolerance, decode timed at both contexts and the prefill,
    every dispatched product in the report, the JSON readable by compare."""
    import json

    out = tmp_path / "r.json"
    r = cli("bench", str(packed["balanced"]), "--model", "--dtype", "float16", "--iters", "20", "--json", str(out))
    assert r.code == 0, r.err
    rep = json.loads(out.read_text())
    from balprune.bench.report import is_model_unit

    units = {(m["layer"], m["kernel"]) for m in rep["measurements"] if is_model_unit(m["layer"])}
    ours = {(u, k) for u in ("model", "model@ctx1024", "prefill@128") for k in ("balprune", "torch")}
    # transformers, where it imports, is timed beside them (bench.llm.PEER); nothing else is
    assert ours <= units and {k for _, k in units - ours} <= {"transformers"}, units
    assert all(m["correct"] for m in rep["measurements"])
    from test_bench_model_host import _render  # a wide console: the terminal's 80 columns fold the unit names

    from balprune.bench.report import load_report

    text = _render(load_report(out))
    assert "model@ctx1024" in text and "prefill@128" in text
    assert cli("compare", str(out), str(out)).code == 0
