"""Giving a pruned LLM back: `format: pt` on every plain safetensors file, the HF folder record in the packed
file, and `unpack --hf-folder` (a folder transformers' from_pretrained loads, atomic, hostile-proof).

The transformers checks are skipped where transformers is not installed (a dev dependency only).
transformers 5 no longer checks a file's ``format`` metadata; transformers 4 refused anything but
pt/tf/flax/mlx ("File metadata is not ['pt', 'tf', 'flax', 'mlx']"): ``_transformers4_accepts`` is
that rule, asserted on every plain file balprune writes and shown to refuse a packed file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import one_error_line, run_subprocess, small_state_dict, transformers_or_skip
from safetensors import safe_open

from balprune.checkpoint import TorchCheckpoint
from balprune.errors import InvalidInputError, OutputError
from balprune.formats import hf_record
from balprune.formats.packed_file import read_packed
from balprune.llm.family import read_config
from balprune.llm.reference import ReferenceLM
from balprune.save import save_state_dict

# --------------------------------------------------------------------------- helpers




def metadata_of(path: Path) -> dict:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]).get("__metadata__") or {}


def _transformers4_accepts(path: Path) -> bool:
    """transformers 4.x's check before loading a safetensors file (modeling_utils.load_state_dict)."""
    meta = metadata_of(path)
    return meta is None or meta.get("format") in ["pt", "tf", "flax", "mlx"]


def rewrite_metadata(path: Path, edit) -> None:
    """Rewrite a safetensors file's ``__metadata__`` in place (``edit(meta)`` mutates it); tensor offsets
    are relative to the data buffer, so the data is kept as it is."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header["__metadata__"])
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


TOKENIZER_FILES = {  # small but real files of each recorded kind (JSON objects)
    "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False},
    "tokenizer_config.json": {"model_max_length": 2048, "bos_token": "<s>", "eos_token": "</s>",
                              "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
    "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
}


def llama_source(tmp_path: Path) -> Path:
    """``balprune example llama-tiny`` plus the four other files prune records, in ``tmp_path/SRC``."""
    from balprune.cli import main

    src = tmp_path / "SRC"
    assert main(["example", "llama-tiny", "-o", str(src)]) == 0
    for name, obj in TOKENIZER_FILES.items():
        (src / name).write_text(json.dumps(obj, indent=1) + "\n")
    (src / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}},
                                                    "note": "caf\u00e9 \u2028 \"quoted\""}))
    return src


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """SRC (llama-tiny + the four other recorded files) -> prune --blocks 4 --sparsity 0.5 -> P."""
    from balprune.cli import main

    tmp = tmp_path_factory.mktemp("llama")
    src = llama_source(tmp)
    packed = tmp / "P.safetensors"
    assert main(["prune", str(src), "--blocks", "4", "--sparsity", "0.5", "-o", str(packed), "--json"]) == 0
    return src, packed


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- 1. format: pt


def test_every_plain_safetensors_file_says_format_pt(cli, tmp_path, pruned):
    """example (.safetensors), the llama example's shards, unpack -o and unpack --hf-folder all say
    format pt, which transformers 4 requires; transformers' own loader reads each one; a packed file
    (parts, not plain tensors) says balprune.packed and transformers 4 would refuse it."""
    tf = transformers_or_skip()
    from transformers.modeling_utils import load_state_dict

    src, packed = pruned
    assert cli("example", "tiny-cnn", "-o", tmp_path / "cnn.safetensors").code == 0
    assert cli("unpack", packed, "-o", tmp_path / "dense.safetensors").code == 0
    assert cli("unpack", packed, "--hf-folder", tmp_path / "hf").code == 0
    files = [tmp_path / "cnn.safetensors", tmp_path / "dense.safetensors", *sorted(src.glob("*.safetensors")),
             *sorted((tmp_path / "hf").glob("*.safetensors"))]
    for f in files:
        assert metadata_of(f).get("format") == "pt", f
        assert _transformers4_accepts(f)
        loaded = load_state_dict(str(f))
        with safe_open(str(f), "pt") as g:
            assert sorted(loaded) == sorted(g.keys())
            assert all(torch.equal(loaded[k], g.get_tensor(k)) for k in loaded)
    assert metadata_of(packed)["format"] == "balprune.packed" and not _transformers4_accepts(packed)
    assert tf.__version__


# --------------------------------------------------------------------------- 2. the record


def test_prune_records_the_folders_files_verbatim(pruned):
    src, packed = pruned
    meta = metadata_of(packed)
    recorded = {k[len("hf:"):]: v for k, v in meta.items() if k.startswith("hf:")}
    assert sorted(recorded) == sorted(hf_record.HF_FILES)
    for name, text in recorded.items():
        assert text == (src / name).read_text(encoding="utf-8"), name
    assert read_packed(packed).hf_files().model_type == "llama"


def test_non_hf_inputs_keep_their_bytes(cli, tmp_path, small_st):
    """No config.json beside the weights: no hf: key, no transposed key; the golden files reproduce byte for
    byte (a format change would need a new version)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_golden", Path(__file__).parent / "golden" / "make_golden.py")
    make_golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_golden)
    out = tmp_path / "o.safetensors"
    assert cli("prune", small_st, "-s", "0.5", "-o", out, "--json").code == 0
    assert set(metadata_of(out)) == {"format", "format_version", "tool_version", "manifest"}
    assert "transposed" not in json.loads(metadata_of(out)["manifest"])
    gold = tmp_path / "gold"
    gold.mkdir()
    make_golden.write_all(gold)
    for name in make_golden.GOLDEN:
        want = Path(make_golden.__file__).parent / f"{name}.safetensors"
        assert (gold / f"{name}.safetensors").read_bytes() == want.read_bytes(), name


def test_big_tokenizer_left_out_with_a_warning(cli, tmp_path, monkeypatch):
    src = llama_source(tmp_path)
    monkeypatch.setitem(hf_record.HF_FILES, "tokenizer.json", 64)  # the real file is larger than this
    r = cli("prune", src, "--blocks", "4", "--sparsity", "0.5", "-o", tmp_path / "p.safetensors", "--json")
    assert r.code == 0, r.err
    assert "tokenizer.json" in r.err and "not recorded" in r.err
    meta = metadata_of(tmp_path / "p.safetensors")
    assert "hf:tokenizer.json" not in meta and "hf:config.json" in meta


@pytest.mark.parametrize("name, content, words", [
    ("config.json", "{not json", "not valid JSON"),
    ("config.json", "[1, 2]", "JSON object"),
    ("config.json", '{"model_type": 7}', "model_type"),
    ("tokenizer.json", '{"a": 1, "a": 2}', "duplicate key"),
    ("tokenizer_config.json", "[" * 100 + "]" * 100, "nested"),
    ("special_tokens_map.json", b"\xff\xfe{}", "not UTF-8"),
])
def test_hostile_source_files_refused_at_prune(cli, tmp_path, name, content, words):
    src = llama_source(tmp_path)
    path = src / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = cli("prune", src, "--blocks", "4", "--sparsity", "0.5", "-o", tmp_path / "p.safetensors")
    assert r.code == 4 and words in one_error_line(r.err)
    assert not (tmp_path / "p.safetensors").exists()


def test_fifo_tokenizer_refused_without_hanging(cli, tmp_path):
    src = llama_source(tmp_path)
    (src / "tokenizer.json").unlink()
    os.mkfifo(src / "tokenizer.json")
    r = run_subprocess("prune", src, "-s", "0.5", "-o", tmp_path / "p.safetensors", timeout=120)  # never blocks
    assert r.returncode == 4 and "FIFO" in one_error_line(r.stderr)
    assert not (tmp_path / "p.safetensors").exists()


# --------------------------------------------------------------------------- 3. unpack --hf-folder


def _masked_source(src: Path, packed: Path) -> dict[str, torch.Tensor]:
    """The source weights with every pruned weight zeroed where the packed file's mask says, the mask
    taken from the packed positions (ones put in every kept slot), not from the values."""
    from balprune.checkpoint import open_checkpoint

    pf = read_packed(packed)
    ckpt = open_checkpoint(src)
    out = {}
    for t in ckpt.tensors:
        w = ckpt.load(t.name)
        obj = pf.load(t.name)
        if not isinstance(obj, torch.Tensor):
            mask = replace(obj, values=torch.ones_like(obj.values)).to_dense(t.name) != 0
            g = obj.geometry  # exactly k per block of every row (padding columns hold none here)
            per_block = torch.nn.functional.pad(mask.reshape(g.rows, -1), (0, g.padded_width - g.cols))
            assert bool((per_block.reshape(g.rows, g.blocks, g.block_length).sum(-1) == g.keep).all())
            w = torch.where(mask, w, torch.zeros((), dtype=w.dtype))
        out[t.name] = w
    return out


def test_hf_folder_loads_and_gives_the_masked_models_logits(cli, tmp_path, pruned):
    """example llama-tiny -> prune -> unpack --hf-folder OUT (several shards) -> from_pretrained(OUT): logits
    equal the project's reference model on the masked source weights; every weight in OUT is zero exactly
    where the packed file's mask says; the recorded files come back byte for byte."""
    tf = transformers_or_skip()
    src, packed = pruned
    out = tmp_path / "OUT"
    r = cli("unpack", packed, "--hf-folder", out, "--shard-size", "200KB")
    assert r.code == 0, r.err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    assert listing(out) == sorted([*shards, "model.safetensors.index.json", *hf_record.HF_FILES])
    for name in hf_record.HF_FILES:
        assert (out / name).read_bytes() == (src / name).read_bytes()
    masked = _masked_source(src, packed)
    got = {}
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata()["format"] == "pt"
            got.update({k: f.get_tensor(k) for k in f.keys()})
            assert sum(f.get_slice(k).get_shape()[0] for k in f.keys()) > 0
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    assert sorted(got) == sorted(masked)
    for name, w in masked.items():
        assert got[name].dtype == w.dtype and torch.equal(got[name], w), name
    model = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert model.dtype == torch.float32  # the source's dtype
    ref = ReferenceLM.from_checkpoint(read_config(src), TorchCheckpoint("masked", [], [masked]))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a = model(ids).logits.float()
    b = ref(ids)
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def test_like_folder_when_the_record_is_absent(cli, tmp_path):
    """A packed file pruned from the weights file alone records nothing: --hf-folder without --like is exit 2
    (one line, nothing written); with --like SRC the folder takes SRC's files."""
    transformers_or_skip()
    src = llama_source(tmp_path)
    single = tmp_path / "weights"
    single.mkdir()
    (src / "model-00001-of-00001.safetensors").rename(single / "model.safetensors")
    packed = tmp_path / "p.safetensors"
    assert cli("prune", single / "model.safetensors", "--blocks", "4", "--sparsity", "0.5", "-o", packed, "--json").code == 0
    assert not any(k.startswith("hf:") for k in metadata_of(packed))
    r = cli("unpack", packed, "--hf-folder", tmp_path / "out")
    assert r.code == 2 and "--like" in one_error_line(r.err)
    assert not (tmp_path / "out").exists()
    (src / "model.safetensors.index.json").unlink()
    r = cli("unpack", packed, "--hf-folder", tmp_path / "out", "--like", src)
    assert r.code == 0, r.err
    assert (tmp_path / "out" / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    r = cli("unpack", packed, "--hf-folder", tmp_path / "out2", "--like", single)  # no config.json there
    assert r.code == 4 and "config.json" in one_error_line(r.err)
    assert not (tmp_path / "out2").exists()
    transformers_or_skip().AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def _hostile_config(text: str):
    def edit(meta):
        meta["hf:config.json"] = text
    return edit


def _config_with(**changes):
    """The recorded (valid) config.json with some fields changed."""
    def edit(meta):
        meta["hf:config.json"] = json.dumps({**json.loads(meta["hf:config.json"]), **changes})
    return edit


HUGE = json.dumps({"model_type": "llama", "pad": "x" * (1 << 20)})


# (edit, words in the error, whether verify refuses it too: the format's own rules on the record are
# JSON objects within their caps, and a Llama-family config.json's fields well-formed (bad-inputs rule 31:
# llm.family.check_recorded); that it fits the weights is unpack --hf-folder's check, as bench --model's
# is that a file is a built-in model)
@pytest.mark.parametrize("edit, words, verify_refuses", [
    (_hostile_config("{garbage"), "not valid JSON", True),
    (_hostile_config(HUGE), "limit", True),
    (_hostile_config('["model_type", "llama"]'), "JSON object", True),
    (_hostile_config('{"model_type": ["llama"]}'), "model_type", True),
    (lambda m: m.pop("hf:config.json"), "without config.json", True),
    (lambda m: m.update({"hf:model.py": "import os"}), "unknown __metadata__ key", True),
    (lambda m: m.update({"hf:tokenizer.json": "[" * 200 + "]" * 200}), "nested", True),
    (_config_with(hidden_size="64"), "hidden_size", True),
    (_config_with(num_hidden_layers=10**9), "num_hidden_layers", True),
    (_config_with(rms_norm_eps=10**400), "rms_norm_eps", True),  # (float() of it overflowed: exit 70)
    (_config_with(model_type="encoder-decoder", encoder={"model_type": ["gpt2"]}), "encoder.model_type", True),
    (_config_with(hidden_size=128), "shape", False),
    (_config_with(model_type="qwen2"), "q_proj.bias' is missing", False),
])
def test_hostile_record_refused_and_nothing_written(cli, tmp_path, pruned, edit, words, verify_refuses):
    """A packed file whose recorded files are garbage, huge, of the wrong type or not what the weights need:
    unpack --hf-folder exits 4 with one line, and OUT (or a temp folder) does not exist afterwards."""
    _, packed = pruned
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(packed.read_bytes())
    rewrite_metadata(bad, edit)
    before = listing(tmp_path)
    r = cli("unpack", bad, "--hf-folder", tmp_path / "OUT")
    assert r.code == 4, r.err
    assert words in one_error_line(r.err)
    assert listing(tmp_path) == before  # no OUT, no temp folder
    assert cli("verify", bad).code == (4 if verify_refuses else 0)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1},
    {"type": "linear", "factor": 2.0},
])
def test_record_of_a_rope_kind_the_runtime_does_not_run(cli, tmp_path, pruned, rope):
    """A well-formed config of a RoPE kind the LLM runtime does not run (YaRN, linear) is a valid record:
    verify accepts it and unpack --hf-folder rebuilds the folder (the layout does not depend on RoPE); the
    commands that run the model refuse it naming the field; a malformed factor of such a kind is refused
    by verify too."""
    from balprune.llm.family import parse_config

    _, packed = pruned
    good = tmp_path / "rope.safetensors"
    good.write_bytes(packed.read_bytes())
    rewrite_metadata(good, _config_with(rope_scaling=rope))
    assert cli("verify", good).code == 0
    assert cli("unpack", good, "--hf-folder", tmp_path / "OUT").code == 0
    config = json.loads((tmp_path / "OUT" / "config.json").read_text())
    assert config["rope_scaling"] == rope
    with pytest.raises(InvalidInputError, match="is not"):
        parse_config(config)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(packed.read_bytes())
    rewrite_metadata(bad, _config_with(rope_scaling={**rope, "factor": "4"}))
    r = cli("verify", bad)
    assert r.code == 4 and "factor" in one_error_line(r.err)


@pytest.mark.parametrize("changes, field", [
    ({"hidden_size": "64"}, "hidden_size"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": [4]}}, "rope_scaling.factor"),
])
def test_prune_refuses_a_malformed_llama_config_before_writing(cli, tmp_path, changes, field):
    """prune records a folder's config.json: a Llama-family one with malformed fields is refused (exit 4,
    naming the file and the field) before any output exists, the source untouched; a well-formed one of
    a RoPE kind the runtime does not run is pruned and recorded."""
    src = llama_source(tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    r = cli("prune", src, "--blocks", "4", "--sparsity", "0.5", "-o", tmp_path / "P.safetensors")
    assert r.code == 4 and field in one_error_line(r.err) and "config.json" in one_error_line(r.err), r.err
    assert not (tmp_path / "P.safetensors").exists()
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    (src / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    assert cli("prune", src, "--blocks", "4", "--sparsity", "0.5", "-o", tmp_path / "P.safetensors").code == 0
    assert read_packed(tmp_path / "P.safetensors").hf_files().config["rope_scaling"]["rope_type"] == "yarn"


def test_record_with_mlp_biases_round_trips(cli, tmp_path):
    """A Llama folder whose MLP carries biases (mlp_bias true: transformers builds it, the runtime does not run
    it) is pruned, verified and rebuilt with its biases; eval's parse refuses it naming the field."""
    from safetensors.torch import load_file, save_file

    from balprune.llm.family import parse_config

    src = llama_source(tmp_path)
    config = json.loads((src / "config.json").read_text())
    shard = src / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    h, i = config["hidden_size"], config["intermediate_size"]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}.mlp."
        tensors[p + "gate_proj.bias"] = torch.full((i,), 0.5)
        tensors[p + "up_proj.bias"] = torch.full((i,), 0.25)
        tensors[p + "down_proj.bias"] = torch.full((h,), 0.125)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n: shard.name for n in tensors}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))
    packed = tmp_path / "P.safetensors"
    assert cli("prune", src, "--blocks", "4", "--sparsity", "0.5", "-o", packed).code == 0
    assert cli("verify", packed).code == 0
    assert cli("unpack", packed, "--hf-folder", tmp_path / "OUT").code == 0
    out = {}
    for f in (tmp_path / "OUT").glob("*.safetensors"):
        out |= load_file(f)
    assert torch.equal(out["model.layers.0.mlp.down_proj.bias"], torch.full((h,), 0.125))
    with pytest.raises(InvalidInputError, match="mlp_bias"):
        parse_config(json.loads((tmp_path / "OUT" / "config.json").read_text()))


def test_failure_midway_leaves_nothing(cli, tmp_path, pruned, monkeypatch):
    """An error while the shards are written (here: after the first tensor) leaves no OUT and no temp
    folder; over an existing folder with --force, the old folder stays as it was."""
    from balprune.llm import hfexport

    _, packed = pruned
    real = hfexport.iter_unpacked

    def failing(pf):
        it = real(pf)
        yield next(it)
        raise OutputError("disk full (simulated)")

    monkeypatch.setattr(hfexport, "iter_unpacked", failing)
    before = listing(tmp_path)
    r = cli("unpack", packed, "--hf-folder", tmp_path / "OUT")
    assert r.code == 5 and "simulated" in one_error_line(r.err)
    assert listing(tmp_path) == before
    old = tmp_path / "OLD"
    old.mkdir()
    (old / "config.json").write_text('{"model_type": "llama"}')
    (old / "model.safetensors").write_bytes(b"old")
    before = listing(tmp_path)
    r = cli("unpack", packed, "--hf-folder", old, "--force")
    assert r.code == 5
    assert listing(tmp_path) == before and listing(old) == ["config.json", "model.safetensors"]
    assert (old / "model.safetensors").read_bytes() == b"old"


def test_existing_output_rules(cli, tmp_path, pruned):
    _, packed = pruned
    out = tmp_path / "OUT"
    assert cli("unpack", packed, "--hf-folder", out).code == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    r = cli("unpack", packed, "--hf-folder", out)  # exists, not empty: exit 5, untouched
    assert r.code == 5 and "--force" in one_error_line(r.err)
    (out / "stale.safetensors").write_bytes(b"stale")
    assert cli("unpack", packed, "--hf-folder", out, "--force").code == 0  # replaced whole
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # and byte-identical for the same input
    assert not [p for p in tmp_path.iterdir() if "balprune-" in p.name]
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "config.json").write_text("{}")
    r = cli("unpack", packed, "--hf-folder", tree, "--force")  # never deletes a tree
    assert r.code == 5 and "not a model folder" in one_error_line(r.err) and (tree / "sub").is_dir()
    (tmp_path / "empty").mkdir()
    assert cli("unpack", packed, "--hf-folder", tmp_path / "empty").code == 0  # an empty folder is fine
    (tmp_path / "file").write_text("x")
    assert cli("unpack", packed, "--hf-folder", tmp_path / "file", "--force").code == 5
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "config.json").write_text("{}")
    (inside / "p.safetensors").write_bytes(packed.read_bytes())
    r = cli("unpack", inside / "p.safetensors", "--hf-folder", inside, "--force")  # would delete its input
    assert r.code == 3 and (inside / "p.safetensors").exists()


@pytest.mark.parametrize("args, words", [
    (("-o", "x.safetensors", "--hf-folder", "out"), "exactly one"),
    ((), "exactly one"),
    (("-o", "x.safetensors", "--like", "src"), "--hf-folder only"),
    (("-o", "x.safetensors", "--shard-size", "5GB"), "--hf-folder only"),
    (("--hf-folder", "out", "--shard-size", "0"), "at least 1"),
    (("--hf-folder", "out", "--shard-size", "1.5GB"), "byte count"),
    (("--hf-folder", "out", "--shard-size", "5XB"), "byte count"),
    (("--hf-folder", "out", "--shard-size", "-1"), "byte count"),
    (("--hf-folder", "out", "--shard-size", "99999999999TB"), "2^63"),
])
def test_usage_errors_before_any_file_is_opened(cli, tmp_path, args, words):
    r = cli("unpack", tmp_path / "missing.safetensors", *args)
    assert r.code == 2 and words in one_error_line(r.err)


def test_shard_size_parser():
    from balprune.cli.app import parse_shard_size

    assert parse_shard_size("5GB") == 5 * 10**9
    assert parse_shard_size("500MiB") == 500 << 20
    assert parse_shard_size("1000000") == 10**6
    assert parse_shard_size("2kb") == 2000


def test_plain_state_dict_round_trip_unchanged(cli, tmp_path):
    """unpack -o of a file without transposed tensors still writes every tensor at its name, shape and dtype."""
    src = tmp_path / "m.safetensors"
    save_state_dict(small_state_dict(), src)
    assert cli("prune", src, "-s", "0.5", "-o", tmp_path / "p.safetensors", "--json").code == 0
    assert cli("unpack", tmp_path / "p.safetensors", "-o", tmp_path / "d.safetensors").code == 0
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == {k: tuple(v.shape) for k, v in small_state_dict().items()}


def test_prune_output_over_a_recorded_file_refused(cli, tmp_path):
    """The recorded files are inputs of prune: -o naming one is refused (exit 3) and the file is unchanged."""
    src = llama_source(tmp_path)
    before = (src / "tokenizer_config.json").read_bytes()
    r = cli("prune", src, "-s", "0.5", "-o", src / "tokenizer_config.json", "--force")
    assert r.code == 3 and "input" in one_error_line(r.err)
    assert (src / "tokenizer_config.json").read_bytes() == before
