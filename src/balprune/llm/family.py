"""The Llama family of Hugging Face causal LMs: config.json parsed hostile-proof, tensor layout checked.

Members (``model_type``): ``llama`` (Llama 2/3: GQA, RoPE with optional llama3 scaling, RMSNorm,
SwiGLU, tied or untied lm_head; ``attention_bias`` puts biases on q/k/v/o), ``mistral`` (no biases;
an optional sliding window), ``qwen2`` (Qwen2/2.5: q/k/v biases always, none on o), ``qwen3``
(per-head RMSNorm on q and k; ``attention_bias`` on q/k/v/o).

config.json is read through safeio (regular files only, size-capped, nesting-bounded, duplicate
keys refused) and every field the model needs is type-checked (integers are not booleans, floats
are finite) and bounded before anything is allocated from it: the bounds are generous for honest
models (Llama-3-405B, Qwen2.5-72B fit with room) and refuse absurd ones. Defaults for absent keys
are transformers' own where they derive from other fields (``num_key_value_heads`` = heads for
llama, ``head_dim`` = hidden / heads except qwen3) or are conventions (``rope_theta`` 10000,
``rms_norm_eps`` 1e-6, untied head); a size transformers would default to a fixed figure (its
7B-model defaults) must be stated. Both serialisations are read: transformers 4.x
(``rope_theta`` + ``rope_scaling``, ``torch_dtype``) and 5.x (``rope_parameters``, ``dtype``);
``rope_scaling`` wins over ``rope_parameters`` as in transformers 5.

Every refusal is an InvalidInputError (exit 4): one line naming the file and the field.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import safeio
from ..checkpoint import Checkpoint, open_checkpoint
from ..container import short_repr
from ..errors import InvalidInputError
from ..values import as_float

#: model_type -> the transformers class that loads it (written as ``architectures`` by the example writer).
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

#: Largest config.json read (honest ones are 1-5 KB; a v5 qwen2 config lists one layer type per layer).
MAX_CONFIG_BYTES = 1 << 20

# Bounds: generous for honest models, refusing absurd values before anything is allocated from them.
MAX_VOCAB = 1 << 22
MAX_HIDDEN = 65536
MAX_INTERMEDIATE = 1 << 20
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_POSITIONS = 1 << 24
MAX_ROPE_THETA = 1e12
MAX_ROPE_FACTOR = 1e6

#: Weight dtypes the reference model reads (safetensors codes).
FLOAT_CODES = frozenset({"F32", "F16", "BF16", "F64"})
TORCH_DTYPE_NAMES = frozenset({"float32", "float16", "bfloat16", "float64"})

#: Longest name read from config.json (an activation, a layer kind, a RoPE kind): honest ones are short.
_MAX_NAME = 64

_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings", "partial_rotary_factor"}


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE frequency scaling (transformers' ``_compute_llama3_parameters``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LlmConfig:
    """What the reference model needs from config.json, validated (see the module docstring).

    ``attention_bias`` says whether q/k/v carry biases; ``o_bias`` whether o_proj does too (llama and
    qwen3 put ``attention_bias`` on all four, qwen2 biases q/k/v only). ``sliding_window`` (mistral) is
    None for full causal attention. ``torch_dtype`` is the dtype the folder declares (None: not stated).
    ``mlp_bias``: gate/up/down carry biases -- only ever true in a config read with ``parse_config(runtime=
    False)`` (a record's layout); the reference model refuses it.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    torch_dtype: str | None
    sliding_window: int | None = None
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        _validate(self, "config")

    @property
    def o_bias(self) -> bool:
        """o_proj carries a bias (llama / qwen3 with attention_bias; never qwen2 or mistral)."""
        return self.attention_bias and self.model_type in ("llama", "qwen3")

    @property
    def qk_norm(self) -> bool:
        """q_norm / k_norm (RMSNorm over head_dim, per head) before RoPE: qwen3."""
        return self.model_type == "qwen3"

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


# --------------------------------------------------------------------------- field checks


def _err(where: str, field: str, msg: str) -> InvalidInputError:
    return InvalidInputError(f"{where}: field {field!r} {msg}")


def _int(where: str, field: str, v: object, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise _err(where, field, f"must be an integer, found {short_repr(v)}")
    if not lo <= v <= hi:
        raise _err(where, field, f"must be in [{lo}, {hi}], found {short_repr(v)}")
    return v


def _typed_int(where: str, field: str, v: object) -> int:
    """An integer of any size (bounds come later, in _validate, with the other fields known)."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise _err(where, field, f"must be an integer, found {short_repr(v)}")
    return v


def _float(where: str, field: str, v: object, *, lo_exclusive: float = 0.0, hi: float = math.inf) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise _err(where, field, f"must be a number, found {short_repr(v)}")
    f = as_float(v)  # (a JSON integer too large for a float: inf, refused below, not an OverflowError)
    if not math.isfinite(f) or not lo_exclusive < f <= hi:
        raise _err(where, field, f"must be a finite number in ({lo_exclusive:g}, {hi:g}], found {short_repr(v)}")
    return f


def _rope_factor(where: str, field: str, v: object) -> float:
    """Llama 3 RoPE scaling's factor: it divides the long wavelengths' frequencies, so it is at least 1
    (transformers' own rule); a tiny one makes every frequency overflow to inf, then NaN logits."""
    f = _float(where, field, v, hi=MAX_ROPE_FACTOR)
    if f < 1.0:
        raise _err(where, field, f"must be at least 1, found {short_repr(v)}")
    return f


def _bool(where: str, field: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise _err(where, field, f"must be true or false, found {short_repr(v)}")
    return v


def _validate(c: LlmConfig, where: str) -> None:
    """Bounds and cross-field rules (run on every LlmConfig, parsed or built in code)."""
    if c.model_type not in ARCHITECTURES:
        raise _err(where, "model_type", f"must be one of {', '.join(sorted(ARCHITECTURES))}, found {short_repr(c.model_type)}")
    _int(where, "vocab_size", c.vocab_size, 1, MAX_VOCAB)
    _int(where, "hidden_size", c.hidden_size, 1, MAX_HIDDEN)
    _int(where, "intermediate_size", c.intermediate_size, 1, MAX_INTERMEDIATE)
    _int(where, "num_hidden_layers", c.num_hidden_layers, 1, MAX_LAYERS)
    _int(where, "num_attention_heads", c.num_attention_heads, 1, MAX_HEADS)
    _int(where, "num_key_value_heads", c.num_key_value_heads, 1, MAX_HEADS)
    _int(where, "head_dim", c.head_dim, 2, MAX_HEAD_DIM)
    _int(where, "max_position_embeddings", c.max_position_embeddings, 1, MAX_POSITIONS)
    if c.num_attention_heads % c.num_key_value_heads:
        raise _err(where, "num_key_value_heads",
                   f"({c.num_key_value_heads}) must divide num_attention_heads ({c.num_attention_heads})")
    if c.head_dim % 2:
        raise _err(where, "head_dim", f"must be even (RoPE rotates pairs), found {c.head_dim}")
    if c.q_dim > 4 * MAX_HIDDEN:
        raise _err(where, "head_dim", f"num_attention_heads x head_dim = {c.q_dim} is over {4 * MAX_HIDDEN}")
    _float(where, "rms_norm_eps", c.rms_norm_eps, hi=1.0)
    _float(where, "rope_theta", c.rope_theta, lo_exclusive=1.0, hi=MAX_ROPE_THETA)
    _bool(where, "tie_word_embeddings", c.tie_word_embeddings)
    _bool(where, "attention_bias", c.attention_bias)
    _bool(where, "mlp_bias", c.mlp_bias)
    if c.model_type == "qwen2" and not c.attention_bias:
        raise _err(where, "attention_bias", "must be true for qwen2 (its q/k/v projections always carry biases)")
    if c.model_type == "mistral" and c.attention_bias:
        raise _err(where, "attention_bias", "must be false for mistral (no projection carries a bias)")
    if c.sliding_window is not None:
        _int(where, "sliding_window", c.sliding_window, 1, MAX_POSITIONS)
        if c.model_type != "mistral":
            raise _err(where, "sliding_window", "is supported for mistral only")
    if c.torch_dtype is not None and c.torch_dtype not in TORCH_DTYPE_NAMES:
        raise _err(where, "torch_dtype", f"must be one of {', '.join(sorted(TORCH_DTYPE_NAMES))}, found "
                   f"{short_repr(c.torch_dtype)}")
    r = c.rope_scaling
    if r is not None:
        if not isinstance(r, Llama3RopeScaling):
            raise _err(where, "rope_scaling", f"must be None or Llama3RopeScaling, found {short_repr(r)}")
        _rope_factor(where, "rope_scaling.factor", r.factor)
        _float(where, "rope_scaling.low_freq_factor", r.low_freq_factor, hi=MAX_ROPE_FACTOR)
        _float(where, "rope_scaling.high_freq_factor", r.high_freq_factor, hi=MAX_ROPE_FACTOR)
        _int(where, "rope_scaling.original_max_position_embeddings", r.original_max_position_embeddings, 1,
             MAX_POSITIONS)
        if not r.high_freq_factor > r.low_freq_factor:
            raise _err(where, "rope_scaling.high_freq_factor",
                       f"({r.high_freq_factor:g}) must be greater than low_freq_factor ({r.low_freq_factor:g})")


# --------------------------------------------------------------------------- parsing


#: transformers' defaults for an absent max_position_embeddings (it only bounds llama3's original length here).
_DEFAULT_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768}

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def parse_config(data: object, where: str = "config.json", *, runtime: bool = True) -> LlmConfig:
    """An :class:`LlmConfig` from a parsed config.json object; InvalidInputError naming ``where`` and the field.

    ``runtime`` (the LLM commands): refuse what the reference model and the decode runtime do not run
    (an activation other than SiLU, MLP biases, sliding-window or non-full-attention layers, RoPE kinds
    other than default and llama3, keys of other RoPE kinds). ``runtime=False`` (``verify``, ``prune`` and
    ``unpack --hf-folder``, which keep or rebuild the file rather than run the model): those fields are
    type-checked, not refused, so a well-formed YaRN or linear-RoPE model passes; the returned config then
    describes the sizes and the tensor layout only (its ``rope_scaling`` is None for every kind but llama3).
    """
    if not isinstance(data, dict):
        raise InvalidInputError(f"{where}: must hold a JSON object, found {type(data).__name__}")
    if "model_type" not in data:
        raise _err(where, "model_type", "is missing (expected one of " + ", ".join(sorted(ARCHITECTURES)) + ")")
    mt = data["model_type"]
    if not isinstance(mt, str) or mt not in ARCHITECTURES:
        raise _err(where, "model_type", f"{short_repr(mt)} is not supported: expected one of "
                   f"{', '.join(sorted(ARCHITECTURES))} (the Llama family)")
    required = list(_REQUIRED)
    if mt != "llama":  # transformers defaults these to a 7B model's figure (32), not to num_attention_heads
        required.append("num_key_value_heads")
    if mt == "qwen3":  # transformers defaults it to 128, not hidden / heads
        required.append("head_dim")
    for key in required:
        if data.get(key) is None:
            raise _err(where, key, "is missing")

    def get(key: str, default: object) -> object:
        v = data.get(key)
        return default if v is None else v

    # Types first (so a string never reaches an arithmetic check); bounds in _validate.
    ints = {k: _typed_int(where, k, data[k]) for k in _REQUIRED}
    heads = ints["num_attention_heads"]
    if not 1 <= heads <= MAX_HEADS:
        raise _err(where, "num_attention_heads", f"must be in [1, {MAX_HEADS}], found {heads}")
    kv = _typed_int(where, "num_key_value_heads", get("num_key_value_heads", heads))
    head_dim_default = ints["hidden_size"] // heads
    head_dim = _typed_int(where, "head_dim", get("head_dim", head_dim_default))
    if mt == "qwen2" and head_dim != head_dim_default:
        raise _err(where, "head_dim", f"must be hidden_size / num_attention_heads = {head_dim_default} for qwen2, "
                   f"found {head_dim}")
    max_pos = _int(where, "max_position_embeddings", get("max_position_embeddings", _DEFAULT_POSITIONS[mt]), 1,
                   MAX_POSITIONS)
    act = data.get("hidden_act", "silu")
    if runtime and act != "silu":
        raise _err(where, "hidden_act", f"must be 'silu' (SwiGLU), found {short_repr(act)}")
    if not isinstance(act, str) or not 0 < len(act) <= _MAX_NAME:
        raise _err(where, "hidden_act", f"must be an activation's name, found {short_repr(act)}")
    mlp_bias = _bool(where, "mlp_bias", get("mlp_bias", False))
    if mlp_bias and runtime:
        raise _err(where, "mlp_bias", "true is not supported (no Llama-family release biases its MLP)")
    if mt == "qwen2":
        bias = True
    elif mt == "mistral":
        bias = False
    else:
        bias = _bool(where, "attention_bias", get("attention_bias", False))
    _check_layer_types(data, where, ints["num_hidden_layers"], runtime)
    sliding = None
    if mt == "mistral":
        sliding = data.get("sliding_window")
        if sliding is not None:
            sliding = _int(where, "sliding_window", sliding, 1, MAX_POSITIONS)
    elif data.get("use_sliding_window") is not None and _bool(where, "use_sliding_window", data["use_sliding_window"]):
        if runtime:
            raise _err(where, "use_sliding_window", "true is not supported (sliding-window layers in qwen models)")
    dtype_key = "torch_dtype" if data.get("torch_dtype") is not None else "dtype"
    dtype = data.get(dtype_key)
    if dtype is not None and (not isinstance(dtype, str) or dtype not in TORCH_DTYPE_NAMES):
        raise _err(where, dtype_key, f"must be one of {', '.join(sorted(TORCH_DTYPE_NAMES))}, found {short_repr(dtype)}")
    if runtime and ints["hidden_size"] % heads:  # (a record may state a head_dim of its own: its layout needs none)
        raise _err(where, "num_attention_heads", f"({heads}) must divide hidden_size ({ints['hidden_size']})")
    theta, scaling = _parse_rope(data, where, max_pos, runtime)
    cfg_fields = dict(
        model_type=mt, **ints, num_key_value_heads=kv, head_dim=head_dim,
        rms_norm_eps=_float(where, "rms_norm_eps", get("rms_norm_eps", 1e-6), hi=1.0),
        rope_theta=theta, rope_scaling=scaling,
        tie_word_embeddings=_bool(where, "tie_word_embeddings", get("tie_word_embeddings", False)),
        attention_bias=bias, max_position_embeddings=max_pos, torch_dtype=dtype, sliding_window=sliding,
        mlp_bias=mlp_bias,
    )
    cfg = object.__new__(LlmConfig)  # validate with the file's name in the messages, then build for real
    for k, v in cfg_fields.items():
        object.__setattr__(cfg, k, v)
    _validate(cfg, where)
    return LlmConfig(**cfg_fields)


def _check_layer_types(data: dict, where: str, layers: int, runtime: bool) -> None:
    lt = data.get("layer_types")
    if lt is None:
        return
    if not isinstance(lt, list) or len(lt) != layers:
        raise _err(where, "layer_types", f"must list one entry per layer ({layers}), found {short_repr(lt)}")
    for t in lt:
        if not isinstance(t, str) or not 0 < len(t) <= _MAX_NAME:
            raise _err(where, "layer_types", f"must hold layer kinds' names, found {short_repr(t)}")
        if runtime and t != "full_attention":
            raise _err(where, "layer_types", f"only 'full_attention' layers are supported, found {short_repr(t)}")


def _parse_rope(data: dict, where: str, max_pos: int, runtime: bool) -> tuple[float, Llama3RopeScaling | None]:
    """(rope_theta, llama3 scaling or None) from either serialisation (module docstring); with ``runtime``
    False, another kind's own keys pass and its ``factor`` is type-checked (parse_config)."""
    key = "rope_scaling" if data.get("rope_scaling") else "rope_parameters"
    rope = data.get(key)
    if rope is None:
        rope = {}
    if not isinstance(rope, dict):
        raise _err(where, key, f"must be an object or null, found {short_repr(rope)}")
    unknown = sorted(set(rope) - _ROPE_KEYS)
    if unknown and runtime:
        raise _err(where, f"{key}.{unknown[0]}", "is not a key of the supported RoPE kinds (default, llama3)")
    theta_field = f"{key}.rope_theta" if rope.get("rope_theta") is not None else "rope_theta"
    theta = rope.get("rope_theta") if rope.get("rope_theta") is not None else data.get("rope_theta")
    theta = 10000.0 if theta is None else _float(where, theta_field, theta, lo_exclusive=1.0, hi=MAX_ROPE_THETA)
    prf = rope.get("partial_rotary_factor", data.get("partial_rotary_factor"))
    if prf is not None:
        _float(where, "partial_rotary_factor", prf, hi=1.0)
        if prf != 1.0 and runtime:
            raise _err(where, "partial_rotary_factor", f"must be 1 (RoPE on the whole head), found {short_repr(prf)}")
    kind_field = f"{key}.rope_type" if "rope_type" in rope else f"{key}.type"
    kind = rope.get("rope_type", rope.get("type", "default"))
    if not isinstance(kind, str) or not 0 < len(kind) <= _MAX_NAME:
        raise _err(where, kind_field, f"must be a RoPE kind's name, found {short_repr(kind)}")
    if kind == "default":
        extra = sorted(set(rope) & {"factor", "low_freq_factor", "high_freq_factor"})
        if extra and runtime:
            raise _err(where, f"{key}.{extra[0]}", "makes no sense with rope type 'default'")
        return theta, None
    if kind != "llama3":
        if runtime:
            raise _err(where, kind_field, f"{short_repr(kind)} is not supported: expected 'default' or 'llama3'")
        if rope.get("factor") is not None:  # linear, dynamic, yarn, longrope: a scale of the context
            _float(where, f"{key}.factor", rope["factor"], hi=MAX_ROPE_FACTOR)
        return theta, None
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        if rope.get(k) is None:
            raise _err(where, f"{key}.{k}", "is missing (llama3 RoPE scaling needs it)")
    scaling = Llama3RopeScaling(
        factor=_rope_factor(where, f"{key}.factor", rope["factor"]),
        low_freq_factor=_float(where, f"{key}.low_freq_factor", rope["low_freq_factor"], hi=MAX_ROPE_FACTOR),
        high_freq_factor=_float(where, f"{key}.high_freq_factor", rope["high_freq_factor"], hi=MAX_ROPE_FACTOR),
        original_max_position_embeddings=_int(where, f"{key}.original_max_position_embeddings",
                                              rope.get("original_max_position_embeddings", max_pos), 1, MAX_POSITIONS),
    )
    if not scaling.high_freq_factor > scaling.low_freq_factor:
        raise _err(where, f"{key}.high_freq_factor", f"({scaling.high_freq_factor:g}) must be greater than "
                   f"low_freq_factor ({scaling.low_freq_factor:g})")
    return theta, scaling


def check_recorded(config: dict, where: str) -> LlmConfig | None:
    """A config.json that a packed file records or ``prune`` is about to record: a Llama-family one is
    parsed as ``parse_config(runtime=False)`` does (its config when it is one, None for other model types),
    so no command writes or accepts a record whose fields the LLM commands would refuse as malformed."""
    if config.get("model_type") not in ARCHITECTURES:
        return None
    return parse_config(config, where, runtime=False)


def read_config(folder: str | os.PathLike[str]) -> LlmConfig:
    """Parse ``folder/config.json`` (safeio: regular file, at most MAX_CONFIG_BYTES, bounded nesting)."""
    path = Path(folder) / "config.json"
    text = safeio.read_text(path, "config", max_bytes=MAX_CONFIG_BYTES)
    data = safeio.loads_json(text, f"config {path}")
    return parse_config(data, f"config {path}")


# --------------------------------------------------------------------------- tensor layout


def expected_tensors(cfg: LlmConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a folder of this config, in model order (HF names; torch [out, in] weights)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (cfg.q_dim, h)
        out[p + "self_attn.k_proj.weight"] = (cfg.kv_dim, h)
        out[p + "self_attn.v_proj.weight"] = (cfg.kv_dim, h)
        out[p + "self_attn.o_proj.weight"] = (h, cfg.q_dim)
        if cfg.attention_bias:
            out[p + "self_attn.q_proj.bias"] = (cfg.q_dim,)
            out[p + "self_attn.k_proj.bias"] = (cfg.kv_dim,)
            out[p + "self_attn.v_proj.bias"] = (cfg.kv_dim,)
        if cfg.o_bias:
            out[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (cfg.head_dim,)
            out[p + "self_attn.k_norm.weight"] = (cfg.head_dim,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (i, h)
        out[p + "mlp.up_proj.weight"] = (i, h)
        out[p + "mlp.down_proj.weight"] = (h, i)
        if cfg.mlp_bias:
            out[p + "mlp.gate_proj.bias"] = (i,)
            out[p + "mlp.up_proj.bias"] = (i,)
            out[p + "mlp.down_proj.bias"] = (h,)
    out["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    return out


_LAYER_NUMBER = re.compile(r"0|[1-9][0-9]{0,8}")


def _ignorable(name: str, cfg: LlmConfig, shape: tuple[int, ...]) -> bool:
    """Buffers some older conversions stored and transformers ignores: rotary_emb.inv_freq."""
    parts = name.split(".")
    # the layer number as transformers writes it: ASCII digits, no leading zero (str.isdigit also takes
    # '²' and Arabic-Indic digits, which int() then refuses or reads as another layer)
    return (len(parts) == 6 and parts[:2] == ["model", "layers"] and _LAYER_NUMBER.fullmatch(parts[2]) is not None
            and int(parts[2]) < cfg.num_hidden_layers and parts[3:] == ["self_attn", "rotary_emb", "inv_freq"]
            and shape == (cfg.head_dim // 2,))


def check_layout(cfg: LlmConfig, ckpt: Checkpoint, where: str | None = None) -> None:
    """The checkpoint holds exactly the tensors ``cfg`` implies, with those shapes, in float dtypes.

    Missing, extra and misshaped tensors are refused naming the first (model order for missing and
    misshaped, sorted for extra). A tied model whose lm_head.weight is stored as its own tensor is
    refused (which of the two transformers would use depends on load order); one stored as an alias
    of the embedding (a torch file's shared storage) is fine.
    """
    where = where or ckpt.display
    expected = expected_tensors(cfg)
    held = {t.name: t for t in ckpt.tensors}
    aliases = dict(ckpt.aliases)
    if cfg.tie_word_embeddings and "lm_head.weight" in held:
        raise InvalidInputError(f"{where}: tensor 'lm_head.weight' is stored although config.json sets "
                                "tie_word_embeddings true", hint="set tie_word_embeddings false, or drop lm_head.weight")
    if aliases.get("lm_head.weight") == "model.embed_tokens.weight" and cfg.tie_word_embeddings:
        del aliases["lm_head.weight"]
    missing = next((n for n in expected if n not in held and n not in aliases), None)
    if missing is not None:
        raise InvalidInputError(f"{where}: tensor {missing!r} is missing (config.json's {cfg.model_type} layout needs it)")
    if aliases:
        name = sorted(aliases)[0]
        raise InvalidInputError(f"{where}: tensor {name!r} shares its storage with {aliases[name]!r}; the "
                                f"{cfg.model_type} layout ties no such pair")
    extra = sorted(n for n, t in held.items() if n not in expected and not _ignorable(n, cfg, t.shape))
    if extra:
        raise InvalidInputError(f"{where}: tensor {short_repr(extra[0])} is not part of config.json's {cfg.model_type} "
                                f"layout ({len(extra)} such tensor(s))")
    for name, shape in expected.items():
        t = held[name]
        if t.shape != shape:
            raise InvalidInputError(f"{where}: tensor {name!r} has shape {list(t.shape)}, config.json implies "
                                    f"{list(shape)}")
        if t.dtype not in FLOAT_CODES:
            raise InvalidInputError(f"{where}: tensor {name!r} is {t.dtype}; the reference model reads "
                                    f"{', '.join(sorted(FLOAT_CODES))} weights")


def open_llm(folder: str | os.PathLike[str]) -> tuple[LlmConfig, Checkpoint]:
    """Recognise an HF causal-LM folder of the family: its config and its (lazily read) checkpoint.

    config.json is parsed first (nothing else is read if it is refused), then the checkpoint is opened
    (open_checkpoint: headers only) and its layout checked against the config.
    """
    p = Path(folder)
    if not p.is_dir():
        raise InvalidInputError(f"{p}: not a folder (an HF causal-LM folder holds config.json and weights)")
    cfg = read_config(p)
    ckpt = open_checkpoint(p)
    check_layout(cfg, ckpt, str(p))
    return cfg, ckpt
