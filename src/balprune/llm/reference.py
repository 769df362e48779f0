"""A torch reference model of the Llama family (no transformers at run time).

Computes what transformers' LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM /
Qwen3ForCausalLM compute with ``attn_implementation="eager"``, operation for operation: RMSNorm in
float32 then scaled by its weight, RoPE (default or llama3-scaled inverse frequencies, rope_theta)
with rotate-half pairing, grouped-query attention with a causal (optionally sliding-window) mask and
a float32 softmax, SwiGLU MLP, qwen2 q/k/v biases, qwen3 per-head q/k RMSNorm before RoPE, tied or
untied head. Module and parameter names are the HF tensor names (``model.layers.3.self_attn.q_proj``
...), so forward hooks on the ``nn.Linear`` modules see each linear's inputs (calibration) and a
weight can be swapped by name.

Weights are read from the checkpoint tensor by tensor (each converted to ``dtype`` as it arrives;
the module is built on the meta device, so nothing is allocated twice).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .. import safeio
from ..checkpoint import Checkpoint
from ..errors import InvalidInputError, UsageError
from .family import LlmConfig, expected_tensors, open_llm


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2, -1) + eps)); the normalisation in float32, as transformers does.

    x: [..., dim] any float dtype -> [..., dim] in the promoted dtype of weight and x.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm's numbers (the family's one definition; the decode runtime calls it too): x normalised over
    its last axis in float32, rounded back to x's dtype, then times ``weight``; into ``out`` when given."""
    t = x.to(torch.float32)
    t = (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * t if out is None else torch.mul(weight, t, out=out)


def rope_inv_freq(cfg: LlmConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] float32: 1 / theta^(2i/d), llama3-scaled when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    r = cfg.rope_scaling
    if r is None:
        return inv_freq
    # Llama 3.1: long wavelengths divided by factor, short ones kept, the band between interpolated.
    old = r.original_max_position_embeddings
    low_wavelen, high_wavelen = old / r.low_freq_factor, old / r.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)
    smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(cfg: LlmConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] (``dtype``) for int64 ``positions`` [T]: angles computed in float32."""
    inv_freq = rope_inv_freq(cfg).to(positions.device)
    freqs = positions[:, None].to(torch.float32) * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with rotate-half pairing: x [..., head_dim] with cos, sin broadcasting to it (rope_cos_sin)."""
    return x * cos + _rotate_half(x) * sin


def causal_mask(t: int, sliding_window: int | None, device: torch.device | str = "cpu", start: int = 0
                ) -> torch.Tensor:
    """Additive mask [T, start + T] float32 for queries at positions start .. start+T-1 over keys at
    0 .. start+T-1: 0 where query i may see key j (j <= i, and i - j < window), -inf-like else."""
    i = torch.arange(start, start + t, device=device)[:, None]
    j = torch.arange(start + t, device=device)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed &= j > i - sliding_window
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min).to(torch.float32)


class Attention(nn.Module):
    """Grouped-query self-attention. x [B, T, hidden] -> [B, T, hidden].

    q_proj [heads*head_dim, hidden], k_proj / v_proj [kv_heads*head_dim, hidden], o_proj
    [hidden, heads*head_dim]; key/value head g serves query heads g*n_rep .. (g+1)*n_rep - 1.
    """

    def __init__(self, cfg: LlmConfig) -> None:
        super().__init__()
        h, q, kv = cfg.hidden_size, cfg.q_dim, cfg.kv_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scaling = cfg.head_dim ** -0.5
        self.q_proj = nn.Linear(h, q, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, kv, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, kv, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0) -> torch.Tensor:
        """x [B, T, hidden] at positions start .. start+T-1; cos, sin [T, head_dim] of those positions; mask
        [T, start + T] additive float32. ``cache``: (keys, values) [B, kv_heads, max_len, head_dim], the
        layer's static KV cache: this call's keys and values (after RoPE) are written at start .. start+T-1
        and the queries attend over 0 .. start+T-1 of it. Without a cache, start is 0 and T keys are used."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:  # qwen3: per-head RMSNorm over head_dim, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            keys, values = cache
            keys[:, :, start:start + t] = k
            values[:, :, start:start + t] = v
            k, v = keys[:, :, :start + t], values[:, :, :start + t]
        rep = self.heads // self.kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.o_proj(out)


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). x [B, T, hidden] -> [B, T, hidden]; gate/up [inter, hidden]."""

    def __init__(self, cfg: LlmConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). x [B, T, hidden] -> [B, T, hidden]."""

    def __init__(self, cfg: LlmConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """``model.*`` of an HF checkpoint: embed_tokens, layers, norm."""

    def __init__(self, cfg: LlmConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class KvCache:
    """A static KV cache: per layer (keys, values) [B, kv_heads, max_len, head_dim] after RoPE, and how many
    positions hold tokens (``length``). ``ReferenceLM.new_cache`` makes one, ``step`` fills it."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.layers = layers
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    @property
    def batch(self) -> int:
        return self.layers[0][0].shape[0] if self.layers else 0


class ReferenceLM(nn.Module):
    """The family's causal LM. ``forward(input_ids [B, T] int64) -> logits [B, T, vocab] float32``.

    For layer-by-layer use (calibration): ``embed(ids) -> h [B, T, hidden]``, ``rope(T)``,
    ``mask(T)``, each ``model.layers[i](h, cos, sin, mask)``, then ``head(h) -> logits``.
    For decoding: ``new_cache(max_len)``, ``step(ids, cache)`` (a prompt, then one token at a time)
    and ``generate(prompt, n)`` (greedy) -- the float32 reference a decode runtime is held to.
    """

    def __init__(self, cfg: LlmConfig, dtype: torch.dtype = torch.float32) -> None:
        if cfg.mlp_bias:  # (parse_config(runtime=True) never returns one: a record's layout only)
            raise InvalidInputError("the reference model has no MLP biases (config.json sets mlp_bias true)")
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] int64 in [0, vocab) -> hidden states [B, T, hidden] (``dtype``)."""
        if input_ids.dtype != torch.int64 or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D int64 tensor [B, T], got {input_ids.dtype} "
                             f"{list(input_ids.shape)}")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise InvalidInputError(f"token id {bad} is outside the model's vocabulary [0, {self.cfg.vocab_size})")
        return self.model.embed_tokens(input_ids.to(self.device))

    def rope(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] for positions 0 .. T-1."""
        return rope_cos_sin(self.cfg, torch.arange(t, device=self.device), self.dtype)

    def mask(self, t: int) -> torch.Tensor:
        """The additive attention mask [T, T] float32 (causal; sliding window for mistral)."""
        return causal_mask(t, self.cfg.sliding_window, self.device)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head: h [B, T, hidden] -> logits [B, T, vocab] float32."""
        return self.lm_head(self.model.norm(h)).to(torch.float32)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(input_ids)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The whole-sequence forward, with gradients where the caller enables them (``forward`` is this
        under no_grad, for inference; task llama-lm trains through it)."""
        h = self.embed(input_ids)
        t = input_ids.shape[1]
        cos, sin = self.rope(t)
        mask = self.mask(t)
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask)
        return self.head(h)

    # ----------------------------------------------------------------------- decoding

    def new_cache(self, max_len: int, batch: int = 1) -> KvCache:
        """An empty static KV cache of ``max_len`` positions (zeros, this model's dtype and device)."""
        if not isinstance(max_len, int) or isinstance(max_len, bool) or not 1 <= max_len <= self.cfg.max_position_embeddings:
            raise UsageError(f"cache length must be in [1, {self.cfg.max_position_embeddings}] (the model's "
                             f"max_position_embeddings), got {max_len!r}")
        shape = (batch, self.cfg.num_key_value_heads, max_len, self.cfg.head_dim)
        return KvCache([(torch.zeros(shape, dtype=self.dtype, device=self.device),
                         torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in self.model.layers])

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, cache: KvCache) -> torch.Tensor:
        """Run ``input_ids`` [B, T] (a prompt, or one token) at the cache's next positions, appending their
        keys and values; logits [B, T, vocab] float32, equal to ``forward`` of the whole sequence so far at
        those positions. UsageError (exit 2) when they do not fit the cache (never written past its end)."""
        t = input_ids.shape[1] if input_ids.dim() == 2 else 0
        start = cache.length
        if input_ids.dim() == 2 and input_ids.shape[0] != cache.batch:
            raise UsageError(f"a batch of {input_ids.shape[0]} sequence(s) for a KV cache of batch {cache.batch}")
        if t < 1 or start + t > cache.max_len:
            raise UsageError(f"{t} token(s) at position {start} do not fit a KV cache of {cache.max_len} positions")
        h = self.embed(input_ids)
        cos, sin = rope_cos_sin(self.cfg, torch.arange(start, start + t, device=self.device), self.dtype)
        mask = causal_mask(t, self.cfg.sliding_window, self.device, start)
        for layer, kv in zip(self.model.layers, cache.layers):
            h = layer(h, cos, sin, mask, kv, start)
        cache.length = start + t
        return self.head(h)

    @torch.no_grad()
    def generate(self, prompt: list[int] | torch.Tensor, max_new_tokens: int, *, max_len: int | None = None,
                 choose: Callable[[torch.Tensor], int] | None = None, on_prefill: Callable[[], None] | None = None
                 ) -> list[int]:
        """Decoding at batch 1: the prompt in one step, then one token per step. ``choose`` picks the next id
        from the last position's logits [vocab] float32 (default greedy: argmax, the lowest id on a tie, as
        torch.argmax); ``on_prefill`` is called once the prompt's step has run (a timer's split). Returns
        the ``max_new_tokens`` new ids. The cache holds ``max_len`` positions (default: what the run
        stores, the prompt and every new token but the last); a longer run is a UsageError."""
        ids = torch.as_tensor(prompt, dtype=torch.int64).reshape(1, -1)
        cache = self.new_cache(max_len if max_len is not None else ids.shape[1] + max(0, max_new_tokens - 1))
        pick = choose if choose is not None else (lambda logits: int(torch.argmax(logits)))
        out: list[int] = []
        logits = self.step(ids, cache)
        if on_prefill is not None:
            on_prefill()
        for _ in range(max_new_tokens):
            out.append(pick(logits[0, -1]))
            if len(out) < max_new_tokens:
                logits = self.step(torch.tensor([[out[-1]]], dtype=torch.int64), cache)
        return out

    # ----------------------------------------------------------------------- loading

    @classmethod
    def from_checkpoint(cls, cfg: LlmConfig, ckpt: Checkpoint, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> ReferenceLM:
        """Build the model and read its weights from ``ckpt`` one tensor at a time.

        The layout must already be checked (``family.check_layout``; ``from_folder`` does it). Each
        tensor is converted to ``dtype`` and moved to ``device`` as it is read; the module is created
        on the meta device, so no random initialisation is allocated first.
        """
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        if torch.device(device).type == "cpu":
            _check_memory(cfg, ckpt, dtype)
        with torch.device("meta"):
            model = cls(cfg, dtype)
        for name in expected_tensors(cfg):
            t = ckpt.load(name).to(device=device, dtype=dtype)
            _assign(model, name, t)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        leftover = [n for n, p in model.named_parameters() if p.is_meta]
        if leftover:  # expected_tensors and the module disagree: a bug, not an input problem
            raise RuntimeError(f"reference model parameters not loaded: {leftover[:5]}")
        return model.eval()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> ReferenceLM:
        """``open_llm(folder)`` (config and layout checked), then ``from_checkpoint``."""
        cfg, ckpt = open_llm(folder)
        return cls.from_checkpoint(cfg, ckpt, dtype=dtype, device=device)


def _check_memory(cfg: LlmConfig, ckpt: Checkpoint, dtype: torch.dtype) -> None:
    """The model in ``dtype`` (plus the largest tensor as read) must fit in available memory: exit 4 with
    the figures, not an OOM kill. The shapes were checked against the files, so these are real sizes."""
    item = torch.empty((), dtype=dtype).element_size()
    sizes = {t.name: t for t in ckpt.tensors}
    need = sum(math.prod(s) * item for s in expected_tensors(cfg).values())
    need += max((t.nbytes for t in sizes.values()), default=0)
    safeio.check_fits_memory(need, f"{ckpt.display}: the reference model in {dtype} (weights plus one tensor "
                             "being read)", hint="load it in bfloat16, or on a machine with more memory")


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(t, requires_grad=False))
