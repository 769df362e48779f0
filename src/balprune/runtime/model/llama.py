"""Llama-family decoding at batch 1 from a packed file: one token step on static buffers.

``LlamaDecoder`` owns the step. Its state lives in fixed buffers (the token, its position, the
residual stream, the per-layer KV cache of ``max_len`` positions), so ``step_()`` does no host work
beyond issuing launches and allocates nothing balprune keeps: a CUDA graph of one step, replayed,
decodes one token per replay (the position and the token advance on the device; the greedy argmax
is taken there too). Per decoder layer: RMSNorm; q/k/v as ONE matrix product over the shared
input when the three packed matrices have the same block geometry (their rows concatenated); per-
head q/k RMSNorm (qwen3); RoPE from a table indexed by the position; the KV-cache append; grouped-
query attention over the cache, masked past the position (and outside a sliding window);
o_proj; the residual add; RMSNorm; gate/up as one matrix product; SiLU-multiply; down; the residual
add. Then the final norm, the head and the argmax.

Every matrix product is a ``stages.Projection`` on buffers the decoder owns: on a GPU
(``PackedLlama``) each is gated against float64 and bound to its fastest correct path by
``stages.dispatch`` (balprune's balanced kernel or the masked matrix through cuBLAS); anywhere
else (the CPU tests) the masked matrix through torch. The prompt is prefilled in one batched pass
over its tokens with the masked matrices (the dense path), writing the same cache.

The numbers follow llm.reference.ReferenceLM operation for operation (RMSNorm in float32, RoPE and
attention scores in the model dtype, a float32 softmax), so its float32 logits are the reference
a step is held to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from ...errors import UsageError
from ...llm.family import LlmConfig
from ...llm.reference import apply_rope, causal_mask, rms_norm, rope_cos_sin
from .base import PackedModel

#: One linear of the family as the decoder builds it: the packed object (BalancedTensor ... or a
#: dense tensor) and the masked dense matrix [out, in] it stands for.
Weight = tuple[object, torch.Tensor]

#: The projections of one decoder layer, with the HF linears each one stacks (rows concatenated).
FUSED = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "o": ("self_attn.o_proj",),
         "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
         "down": ("mlp.down_proj",)}


def stack_rows(packed: list[object]):
    """One balanced tensor holding the rows of ``packed`` in order, or None when they cannot share one
    launch (not all balanced, or another dtype, column count, block length, keep or index width)."""
    from dataclasses import replace

    from ...formats.balanced import BalancedTensor

    if not packed or not all(isinstance(p, BalancedTensor) for p in packed):
        return None
    first = packed[0]
    g0 = first.geometry
    for p in packed[1:]:
        g = p.geometry
        if (p.dtype, g.cols, g.blocks, g.block_length, g.keep, p.indices.dtype) != \
                (first.dtype, g0.cols, g0.blocks, g0.block_length, g0.keep, first.indices.dtype):
            return None
    if len(packed) == 1:
        return first
    rows = sum(p.geometry.rows for p in packed)
    return replace(first, geometry=replace(g0, rows=rows), shape=(rows, g0.cols),
                   values=torch.cat([p.values for p in packed]), indices=torch.cat([p.indices for p in packed]))


@dataclass
class LayerWeights:
    """One decoder layer's small tensors (model dtype, on the device) and its projections."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    projections: dict[str, list]  # FUSED key -> the Projections (one when stacked)


#: make(name, packed, dense [rows, cols] on the device, x buffer, y buffer, bias or None) -> a Projection
#: already bound to a path (see LlamaDecoder).
MakeProjection = Callable[[str, object, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], object]


class LlamaDecoder:
    """The decode step of a Llama-family model on static buffers (module doc).

    ``cfg`` the family config; ``weight(name)`` returns (packed object, masked dense) of an HF tensor
    name (dense tensors come back as (tensor, tensor)); ``make_projection`` builds each matrix
    product. ``max_len`` positions of KV cache (1 .. max_position_embeddings).

    Use: ``prefill(ids)`` (the prompt at positions 0 .. T-1; returns the last position's logits and
    leaves the greedy next token in ``token``), then ``step_()`` per token (reads ``token`` at
    ``pos``, writes ``logits`` and ``next_token``, then advances: token <- next_token, pos += 1).
    ``length`` counts the positions filled, on the host; ``step_`` itself never checks it (it is
    the graph's body): ``PackedLlama.step`` / ``generate`` refuse a run that would not fit.
    """

    def __init__(self, cfg: LlmConfig, weight: Callable[[str], Weight], *, dtype: torch.dtype,
                 device: torch.device, max_len: int, make_projection: MakeProjection,
                 progress: Callable[[str], None] | None = None, keep_stacked: bool = False) -> None:
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= cfg.max_position_embeddings:
            raise UsageError(f"the KV cache must hold 1 .. {cfg.max_position_embeddings} positions (the model's "
                             f"max_position_embeddings), got {max_len!r}")
        self.cfg, self.dtype, self.device, self.max_len = cfg, dtype, device, max_len
        f = {"dtype": dtype, "device": device}
        h, q, kv, inter = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
        self.embed = weight("model.embed_tokens.weight")[1].to(**f)
        # the step's state: every buffer below keeps its address for the decoder's life
        self.token = torch.zeros(1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)
        self.next_token = torch.zeros(1, dtype=torch.int64, device=device)
        self.history = torch.zeros(max_len, dtype=torch.int64, device=device)  # next_token of each position
        self.h = torch.zeros(h, **f)  # the residual stream
        self.xn = torch.zeros(h, **f)  # the normed input of q/k/v, gate/up and the head
        self.qkv = torch.zeros(q + 2 * kv, **f)
        self.attn = torch.zeros(q, **f)
        self.o = torch.zeros(h, **f)
        self.gate_up = torch.zeros(2 * inter, **f)
        self.act = torch.zeros(inter, **f)
        self.down = torch.zeros(h, **f)
        self.logits = torch.zeros(cfg.vocab_size, **f)
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.keys, self.values = torch.zeros(shape, **f), torch.zeros(shape, **f)
        self.cos, self.sin = rope_cos_sin(cfg, torch.arange(max_len, device=device), dtype)  # [max_len, head_dim]
        self.positions = torch.arange(max_len, device=device)
        self.length = 0
        self.fused: FusedOps | None = None
        self.persistent = None  # a llama_step.StepKernel: every layer in one launch (PackedLlama chooses)
        #: with ``keep_stacked``, per layer: FUSED key -> (the group's packed matrix as one tensor when its
        #: matrices stack (stack_rows; else None), its float32 bias or None), for the step kernel's records
        self.stacked: list[dict[str, tuple]] | None = [] if keep_stacked else None
        outputs = {"qkv": self.qkv, "o": self.o, "gate_up": self.gate_up, "down": self.down}
        inputs = {"qkv": self.xn, "o": self.attn, "gate_up": self.xn, "down": self.act}
        self.layers: list[LayerWeights] = []
        for n in range(cfg.num_hidden_layers):
            p = f"model.layers.{n}."
            if progress:
                progress(f"layer {n}")
            kept: dict[str, tuple] = {}
            projections = {key: self._projections(p, key, names, weight, inputs[key], outputs[key], make_projection,
                                                  kept)
                           for key, names in FUSED.items()}
            if self.stacked is not None:
                self.stacked.append(kept)

            def small(name: str) -> torch.Tensor:
                return weight(name)[1].to(**f)

            self.layers.append(LayerWeights(
                small(p + "input_layernorm.weight"), small(p + "post_attention_layernorm.weight"),
                small(p + "self_attn.q_norm.weight") if cfg.qk_norm else None,
                small(p + "self_attn.k_norm.weight") if cfg.qk_norm else None, projections))
        self.final_norm = weight("model.norm.weight")[1].to(**f)
        head = weight("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
        self.head = make_projection("lm_head", head[0], head[1].to(**f), self.xn, self.logits, None)

    def _projections(self, prefix: str, key: str, names: tuple[str, ...], weight, x, y, make, kept: dict) -> list:
        """The Projections of one FUSED group: one over the stacked rows when the packed matrices allow
        it (stack_rows), else one per matrix on consecutive slices of ``y``. ``kept[key]``: (stacked, bias)."""
        loaded = [weight(prefix + n + ".weight") for n in names]
        biases = [self._bias(prefix + n, weight) for n in names]
        stacked = stack_rows([w[0] for w in loaded]) if len(names) > 1 else loaded[0][0]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(w[1].shape[0]) for b, w in zip(biases, loaded)])
        kept[key] = (stacked, bias)
        if stacked is not None:
            dense = torch.cat([w[1] for w in loaded]).to(self.dtype).to(self.device)
            return [make(prefix + key, stacked, dense, x, y, bias)]
        out, r0 = [], 0
        for n, (packed, dense), b in zip(names, loaded, biases):
            r1 = r0 + dense.shape[0]
            out.append(make(prefix + n, packed, dense.to(self.device, self.dtype), x, y[r0:r1], b))
            r0 = r1
        return out

    def _bias(self, name: str, weight) -> torch.Tensor | None:
        cfg = self.cfg
        has = (cfg.attention_bias and name.endswith(("q_proj", "k_proj", "v_proj"))) or (
            cfg.o_bias and name.endswith("o_proj"))
        return weight(name + ".bias")[1].to(torch.float32) if has else None

    # -- the token step -----------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, w, self.cfg.rms_norm_eps, out)

    @staticmethod
    def _launch(projections: list) -> None:
        for proj in projections:
            proj.launch()

    def step_(self) -> None:
        """One decode step on the buffers (class doc): no host synchronisation, capturable. With
        ``fused`` set (a FusedOps, GPU only) the work between the products is kernels/llama_ops.cu
        (eight launches per layer), else torch ops (about forty)."""
        if self.persistent is not None:
            self._step_persistent()
            return
        if self.fused is not None:
            self._step_fused()
            return
        cfg = self.cfg
        heads, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_dim, kv_dim, inter = cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
        torch.index_select(self.embed, 0, self.token, out=self.h.view(1, -1))
        cos, sin = self.cos.index_select(0, self.pos), self.sin.index_select(0, self.pos)  # [1, d]
        visible = self.positions <= self.pos
        if cfg.sliding_window is not None:
            visible &= self.positions > self.pos - cfg.sliding_window
        mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)  # [max_len] float32
        scaling = d ** -0.5
        for n, layer in enumerate(self.layers):
            self._norm(self.h, layer.input_norm, self.xn)
            self._launch(layer.projections["qkv"])
            q = self.qkv[:q_dim].view(heads, d)
            k = self.qkv[q_dim:q_dim + kv_dim].view(kvh, d)
            v = self.qkv[q_dim + kv_dim:].view(kvh, 1, d)
            if layer.q_norm is not None:
                q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.keys[n].index_copy_(1, self.pos, k.view(kvh, 1, d))
            self.values[n].index_copy_(1, self.pos, v)
            scores = torch.matmul(q.view(kvh, heads // kvh, d), self.keys[n].transpose(1, 2)) * scaling + mask
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(self.dtype)
            torch.matmul(probs, self.values[n], out=self.attn.view(kvh, heads // kvh, d))
            self._launch(layer.projections["o"])
            self.h.add_(self.o)
            self._norm(self.h, layer.post_norm, self.xn)
            self._launch(layer.projections["gate_up"])
            torch.mul(F.silu(self.gate_up[:inter]), self.gate_up[inter:], out=self.act)
            self._launch(layer.projections["down"])
            self.h.add_(self.down)
        self._norm(self.h, self.final_norm, self.xn)
        self._head_and_advance()

    def _head_and_advance(self) -> None:
        """The head on the normed state, the greedy id on the device, and the move to the next position."""
        self.head.launch()
        torch.argmax(self.logits, dim=0, keepdim=True, out=self.next_token)
        self.history.index_copy_(0, self.pos, self.next_token)
        self.token.copy_(self.next_token)
        self.pos.add_(1)

    def _step_fused(self) -> None:
        f = self.fused
        torch.index_select(self.embed, 0, self.token, out=self.h.view(1, -1))
        for n, layer in enumerate(self.layers):
            f.input_norm[n]()  # layer 0: the embedding row; later: + the previous layer's down output
            self._launch(layer.projections["qkv"])
            f.attention[n]()  # RoPE and the KV-cache append included
            self._launch(layer.projections["o"])
            f.post_norm[n]()  # h += o, then the norm
            self._launch(layer.projections["gate_up"])
            f.silu_mul()
            self._launch(layer.projections["down"])
        f.final_norm()  # h += the last down output, then the final norm
        self._head_and_advance()

    def _step_persistent(self) -> None:
        torch.index_select(self.embed, 0, self.token, out=self.h.view(1, -1))
        self.persistent.launch()  # every layer and the final norm (kernels/llama_step.cu)
        self._head_and_advance()

    # -- the prompt ---------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``ids`` [T] int64 at positions 0 .. T-1 in one batched pass (the masked matrices
        through torch), filling the cache; returns the last position's logits [vocab] (model dtype) and
        leaves the state as after a step: token = the greedy next id, pos = T. UsageError when T does not
        fit the cache."""
        cfg = self.cfg
        t = int(ids.numel())
        if not 1 <= t <= self.max_len:
            raise UsageError(f"a prompt of {t} token(s) does not fit a KV cache of {self.max_len} positions")
        heads, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_dim, kv_dim, inter = cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
        ids = ids.to(self.device).reshape(-1)
        h = self.embed.index_select(0, ids)  # [T, hidden]
        cos, sin = self.cos[:t], self.sin[:t]
        mask = causal_mask(t, cfg.sliding_window, self.device)
        for n, layer in enumerate(self.layers):
            qkv = _dense_apply(layer.projections["qkv"], self._norm(h, layer.input_norm))
            q = qkv[:, :q_dim].view(t, heads, d).transpose(0, 1)
            k = qkv[:, q_dim:q_dim + kv_dim].view(t, kvh, d).transpose(0, 1)
            v = qkv[:, q_dim + kv_dim:].view(t, kvh, d).transpose(0, 1)
            if layer.q_norm is not None:
                q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.keys[n, :, :t] = k
            self.values[n, :, :t] = v
            rep = heads // kvh
            scores = torch.matmul(q, k.repeat_interleave(rep, 0).transpose(1, 2)) * d ** -0.5 + mask
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(self.dtype)
            attn = torch.matmul(probs, v.repeat_interleave(rep, 0)).transpose(0, 1).reshape(t, q_dim)
            h = h + _dense_apply(layer.projections["o"], attn)
            gu = _dense_apply(layer.projections["gate_up"], self._norm(h, layer.post_norm))
            h = h + _dense_apply(layer.projections["down"], F.silu(gu[:, :inter]) * gu[:, inter:])
        logits = _dense_apply([self.head], self._norm(h[-1:], self.final_norm))[0]
        self.logits.copy_(logits)
        self.next_token.copy_(torch.argmax(logits, dim=0, keepdim=True))
        self.history[t - 1] = self.next_token[0]
        self.token.copy_(self.next_token)
        self.pos.fill_(t)
        self.length = t
        return logits


def _dense_apply(projections: list, x: torch.Tensor) -> torch.Tensor:
    """x [T, cols] @ W^T (+ bias) for the rows of a FUSED group (its projections' masked matrices)."""
    outs = []
    for proj in projections:
        y = x @ proj.dense.T
        if proj.bias_t is not None:
            y = y + proj.bias_t
        outs.append(y)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class FusedOps:
    """kernels/llama_ops.cu bound to one LlamaDecoder's buffers (GPU only): per layer the two residual
    add + RMSNorm launches and attention (RoPE and the KV-cache append included); the SiLU-multiply; the final
    norm. Each is a zero-argument launch on the current CuPy stream (``overlap``: a programmatic
    dependent launch, runtime._launch). ``supported`` says why a decoder cannot take them (None when
    it can)."""

    THREADS_NORM = 1024
    THREADS_ATTENTION = 256  # kernels/llama_ops.cu kAttThreads
    # the default shared-memory limit per CTA (no attribute needed), less attention_split's static shared memory
    # (mx, sum, red, last: 400 bytes per ptxas; 1 KiB kept), which counts against the same 48 KiB
    SHARED_LIMIT = 48 * 1024 - 1024
    CHUNKS = (64, 32, 16, 8)  # cache positions per attention CTA, the largest that fits SHARED_LIMIT

    @classmethod
    def supported(cls, dec: LlamaDecoder) -> str | None:
        cfg = dec.cfg
        if dec.dtype not in _KERNEL_TYPE:
            return f"no kernels for {dec.dtype}"
        if cfg.head_dim > 1024 or cfg.head_dim % 2:
            return f"head_dim {cfg.head_dim}: the kernels take an even head_dim <= 1024"
        if cfg.num_attention_heads // cfg.num_key_value_heads > 32:
            return (f"{cfg.num_attention_heads // cfg.num_key_value_heads} query heads per key/value head: the attention "
                    "kernel takes at most 32")
        if cls.attention_chunk(cfg) is None:
            return (f"head_dim {cfg.head_dim} with {cfg.num_attention_heads // cfg.num_key_value_heads} query heads per "
                    f"key/value head needs more than {cls.SHARED_LIMIT} bytes of shared memory in the attention kernel")
        return None

    @classmethod
    def attention_shared(cls, cfg, chunk: int) -> int:
        """Bytes of dynamic shared memory attention_split takes (its header: staged keys and values, q, scores)."""
        d, rep = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
        return 4 * (2 * chunk * (d + 1) + rep * d + rep * chunk)

    @classmethod
    def attention_chunk(cls, cfg) -> int | None:
        """Cache positions per attention CTA: the largest of CHUNKS whose shared memory fits, or None."""
        return next((c for c in cls.CHUNKS if cls.attention_shared(cfg, c) <= cls.SHARED_LIMIT), None)

    def __init__(self, dec: LlamaDecoder, device: int, *, overlap: bool = False) -> None:
        from functools import partial

        from .._launch import prepared as prepared_any
        from ..kernels import load_module
        from .stages import ptr

        why = self.supported(dec)
        if why is not None:
            raise UsageError(why)
        prepared = partial(prepared_any, overlap=overlap)
        cfg = dec.cfg
        t = _KERNEL_TYPE[dec.dtype]
        names = {k: f"bp::{k}<{t}>" for k in LLAMA_KERNELS}
        mod = load_module("llama_ops.cu", tuple(names.values()), device=device)
        fn = {k: mod.get_function(n) for k, n in names.items()}
        i32, f32 = np.int32, np.float32
        heads, kvh, d, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        eps = f32(cfg.rms_norm_eps)
        # the raw pointers below point into dec's buffers: dec owns these launches (dec.fused) and outlives them

        def norm(delta, w):
            return prepared(fn["add_rms_norm"], (1,), (self.THREADS_NORM,),
                            (ptr(dec.h), ptr(delta), ptr(w), ptr(dec.xn), i32(h), eps))

        layer_elems = dec.keys[0].numel()
        chunk = self.attention_chunk(cfg)
        nchunks = -(-dec.max_len // chunk)
        # attention_split's partial outputs and per-K/V-head counters, shared by the layers (they run in
        # turn, and the last CTA of each head resets its counter)
        self.part = torch.zeros(heads * nchunks * (d + 2), dtype=torch.float32, device=dec.h.device)
        self.count = torch.zeros(kvh, dtype=torch.int32, device=dec.h.device)
        att_shared = self.attention_shared(cfg, chunk)
        window = cfg.sliding_window or 0
        self.input_norm, self.post_norm, self.attention = [], [], []
        for n, layer in enumerate(dec.layers):
            self.input_norm.append(norm(None if n == 0 else dec.down, layer.input_norm))
            self.post_norm.append(norm(dec.o, layer.post_norm))
            keys, values = ptr(dec.keys.view(-1), n * layer_elems), ptr(dec.values.view(-1), n * layer_elems)
            self.attention.append(prepared(fn["attention_split"], (kvh, nchunks), (self.THREADS_ATTENTION,), (
                ptr(dec.qkv), keys, values, ptr(dec.cos), ptr(dec.sin), ptr(layer.q_norm), ptr(layer.k_norm), eps,
                ptr(dec.pos), ptr(dec.attn), ptr(self.part), ptr(self.count), i32(heads), i32(kvh), i32(d),
                i32(dec.max_len), i32(window), f32(d ** -0.5), i32(chunk)), shared_mem=att_shared))
        inter = cfg.intermediate_size
        self.silu_mul = prepared(fn["silu_mul"], (-(-inter // 256),), (256,),
                                 (ptr(dec.gate_up), ptr(dec.act), i32(inter)))
        self.final_norm = norm(dec.down, dec.final_norm)


#: PackedLlama's default for ``overlap`` (programmatic dependent launches of the step): on, measured 3.5-4%
#: faster per token with bit-identical logits (BENCHMARKS.md, kernels/NOTES.md v27).
OVERLAP = True

#: PackedLlama's ``persistent``: "auto" the step kernel when it passes its gate and times faster, "on" whenever it
#: passes its gate, "off" never.
PERSISTENT_CHOICES = ("auto", "on", "off")

#: kernels/llama_ops.cu's kernels and the type each model dtype instantiates them with.
LLAMA_KERNELS = ("add_rms_norm", "attention_split", "silu_mul")
_KERNEL_TYPE = {torch.float32: "float", torch.float16: "bp::f16", torch.bfloat16: "bp::bf16"}


def llama_kernel_variants() -> list[str]:
    """Every instantiation of kernels/llama_ops.cu the decoder launches (the compile test builds them)."""
    return [f"bp::{k}<{t}>" for k in LLAMA_KERNELS for t in _KERNEL_TYPE.values()]


# --------------------------------------------------------------------------- building from a file


def checkpoint_weights(ckpt) -> Callable[[str], Weight]:
    """``weight(name)`` for LlamaDecoder over an llm.evaluate checkpoint: a packed file's stored objects
    (each checked by PackedFile.load on the bytes it returns) with their masked dense matrices, or a
    dense checkpoint's tensors as both."""
    from ...models.arch import stored_name

    pf = getattr(ckpt, "packed_file", None)

    def weight(name: str) -> Weight:
        if pf is None:
            t = ckpt.load(name)
            return t, t
        obj = pf.load(stored_name(pf, name))
        return obj, obj if isinstance(obj, torch.Tensor) else obj.to_dense(name)

    return weight


def dense_projection(dtype: str) -> MakeProjection:
    """A MakeProjection binding every matrix product to its masked matrix through torch (any device):
    the CPU tests' decoder, and the same numbers a GPU's dense path gives."""
    from .stages import Projection

    def make(name, packed, dense, x, y, bias):
        proj = Projection(name, dense, x, y, dtype=dtype, kernels=None, views=None,
                          pattern=getattr(packed, "pattern", "dense"), bias=bias)
        proj.bind("dense")
        return proj

    return make


class PackedLlama(PackedModel):
    """A packed Llama-family model decoding at batch 1 on a GPU (module doc).

    Built from ``weight(name)`` (LlamaDecoder's; ``PackedLlama.open(path)`` reads a packed file with its
    recorded config, or a dense folder: every product then dense) with ``max_len`` positions of KV cache; every
    matrix product is dispatched (``paths``: "auto" fastest correct, "sparse", "dense"; runtime.model
    for the rules) with sample data in its input, and ``choices`` says which path each took and why.
    ``dtype`` float32, float16 or bfloat16 (accumulation float32). ``fused``: run the work between
    the products on kernels/llama_ops.cu where they pass their gate (``decode_ops`` says which ran).
    ``overlap``: balprune's launches of the step (the fused kernels and the sparse products) are
    programmatic dependent launches (runtime._launch): each grid is placed while the one before it
    runs, which takes the launch gap out of most of the step's ~8 launches per layer (sm_90 and newer;
    ignored on older GPUs).

    ``prefill(ids)`` then ``step()`` per token, or ``generate(ids, n)`` (greedy, on the device: one
    host synchronisation for the whole run); ``capture()`` gives the CUDA graph of one step, which
    ``step``/``generate`` replay once it exists. A run that would write past the cache is refused
    (UsageError, exit 2) before anything is launched.
    """

    unit = "token"

    def __init__(self, cfg: LlmConfig, weight: Callable[[str], Weight], *, max_len: int, dtype: str = "float16", device: int = 0,
                 paths: str = "auto", measure: bool = True, fused: bool = True, overlap: bool = OVERLAP,
                 persistent: str = "auto", progress: Callable[[str], None] | None = None) -> None:
        if persistent not in PERSISTENT_CHOICES:
            raise UsageError(f"persistent must be one of {', '.join(PERSISTENT_CHOICES)}, got {persistent!r}")
        # PackedModel owns the dtype/device/paths checks, the kernels, the views and the dispatch record
        super().__init__(None, dtype=dtype, device=device, paths=paths, measure=measure, progress=progress)
        self.cfg = cfg
        # programmatic dependent launch exists from Hopper (sm_90) on; elsewhere the launches stay ordinary
        self._can_overlap = torch.cuda.get_device_capability(self.dev) >= (9, 0)
        self.overlap = bool(overlap) and self._can_overlap
        self.graph: torch.cuda.CUDAGraph | None = None

        def make(name, packed, dense, x, y, bias):
            proj = self._projection(name, dense, x, y, packed, bias=bias, overlap=self.overlap)
            self._random_(x)  # the dispatcher's sample input
            self._dispatch(proj)
            # the decoder launches only the bound path: let the other encodings' device copies go (the
            # masked dense matrix stays: the prefill multiplies by it)
            proj.release_unbound(keep_dense=True)
            return proj

        with torch.no_grad():
            self.decoder = LlamaDecoder(cfg, weight, dtype=self.tdt, device=self.dev, max_len=max_len,
                                        make_projection=make, progress=progress,
                                        keep_stacked=persistent != "off" and paths != "dense")
            #: how the step runs: {"path": "persistent" | "fused" | "torch ops", "reason": ...}
            self.decode_ops = self._choose_ops(fused)
            if persistent != "off" and self.paths != "dense":  # (a forced-dense runtime streams no sparse rows)
                self.decode_ops = self._choose_persistent(persistent == "on")
            self.decoder.stacked = None  # (the host copies the step kernel's records were built from)
        self.reset()

    def _choose_ops(self, fused: bool) -> dict:
        """kernels/llama_ops.cu when they can take this decoder and pass the gate: two steps after a short
        prompt, their logits against the torch-ops step's within MODEL_TOLERANCE (only summation order
        and the exponential's rounding differ); else torch ops, saying why."""
        from ..measure import MODEL_TOLERANCE, relative_error

        dec = self.decoder
        why = "not asked for" if not fused else FusedOps.supported(dec)
        if why is None and dec.max_len < 4:
            why = f"a cache of {dec.max_len} positions leaves no room for the gate's run"
        if why is not None:
            return {"path": "torch ops", "reason": why}
        ops = FusedOps(dec, self.device, overlap=self.overlap)
        reference = self._gate_logits()
        dec.fused = ops
        err = max(relative_error(f, t) for f, t in zip(self._gate_logits(), reference))
        dec.fused = None
        bound = MODEL_TOLERANCE[self.dtype]
        if not err <= bound:
            return {"path": "torch ops", "reason": f"the fused kernels failed their gate (relative error {err:.2e} > "
                                                   f"{bound:.0e} against the torch-ops step)"}
        dec.fused = ops
        return {"path": "fused", "reason": f"kernels/llama_ops.cu, 8 launches per layer (relative error {err:.1e} "
                                           "against the torch-ops step)"}

    def _gate_logits(self) -> list[torch.Tensor]:
        """The logits (float32) of two steps after a short prompt, as the decoder's step runs now (its
        ``fused`` / ``persistent`` as set): what the gates compare. Leaves the decoder reset."""
        from ..measure import cupy_on_torch_stream

        dec = self.decoder
        fused, persistent = dec.fused, dec.persistent
        self.reset()
        dec.prefill(torch.arange(min(8, dec.max_len - 2)) * 7 % self.cfg.vocab_size)
        logits = []
        with cupy_on_torch_stream():
            for _ in range(2):
                dec.step_()
                logits.append(dec.logits.float().clone())
        dec.fused, dec.persistent = fused, persistent
        self.reset()
        return logits

    def _step_us(self, steps: int) -> float:
        """Device time (us) of one step as it runs now, replayed from a CUDA graph (how the step runs in
        ``generate`` and the benchmarks): the best of three runs of ``steps`` replays after a 1-token prompt."""
        from ..measure import capture_graph

        dec = self.decoder
        self.reset()
        with torch.no_grad():
            graph = capture_graph(dec.step_, warmup=1)
        best = float("inf")
        for _ in range(3):
            self.reset()
            dec.prefill(torch.tensor([1]))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                graph.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) * 1000.0 / steps)
        self.reset()
        return best

    def _choose_persistent(self, forced: bool) -> dict:
        """kernels/llama_step.cu (every layer in one launch) when it can take this decoder, passes the gate of
        _choose_ops against the torch-ops step and (unless ``forced``) steps faster than the step chosen there,
        both replayed from CUDA graphs; else ``decode_ops`` as it was, with the reason added."""
        from ..measure import MODEL_TOLERANCE, relative_error
        from .llama_step import StepKernel

        dec, before = self.decoder, self.decode_ops

        def keep(why: str) -> dict:
            return {**before, "persistent": why}

        try:
            kernel = StepKernel(dec, dec.stacked, self.device)
        except ValueError as exc:
            return keep(str(exc))
        except Exception as exc:  # a compile or driver refusal (e.g. a cooperative grid this GPU will not place)
            return keep(f"could not be built: {type(exc).__name__}: {str(exc)[:200]}")
        fused = dec.fused
        dec.fused = None
        reference = self._gate_logits()
        dec.persistent = kernel
        try:
            err = max(relative_error(f, t) for f, t in zip(self._gate_logits(), reference))
        except Exception as exc:  # the launch itself refused (cooperative launch limits): the layers stay
            dec.persistent, dec.fused = None, fused
            self.reset()
            return keep(f"could not be launched: {type(exc).__name__}: {str(exc)[:200]}")
        dec.persistent, dec.fused = None, fused
        bound = MODEL_TOLERANCE[self.dtype]
        if not err <= bound:
            return keep(f"failed its gate (relative error {err:.2e} > {bound:.0e} against the torch-ops step)")
        chosen = {"path": "persistent", "reason": f"{kernel.describe()} (relative error {err:.1e} against the "
                                                  "torch-ops step)"}
        if forced:
            dec.persistent = kernel
            return chosen
        steps = min(32, dec.max_len - 2)
        if steps < 4:
            return keep(f"a cache of {dec.max_len} positions leaves no room to time it")
        layers_us = self._step_us(steps)
        dec.persistent = kernel
        persistent_us = self._step_us(steps)
        timing = f"{persistent_us:.1f} us per step against {layers_us:.1f} us ({before['path']})"
        if persistent_us < layers_us:
            return {**chosen, "reason": f"{chosen['reason']}; {timing}"}
        dec.persistent = None
        return keep(f"slower: {timing}")

    @classmethod
    def open(cls, path, *, like=None, **kw) -> PackedLlama:
        """The runtime of an eval MODEL (llm.evaluate.open_model: a packed file and the config.json it
        recorded, a folder, or a file with ``like``'s config); keywords as the constructor's."""
        from ...llm.evaluate import open_model

        cfg, ckpt, _ = open_model(path, like)
        return cls(cfg, checkpoint_weights(ckpt), **kw)

    def run(self) -> None:
        """One decode step (PackedModel's unit of work; the position advances)."""
        self.decoder.step_()

    def set_overlap(self, on: bool) -> None:
        """Rebind the step's launches with programmatic dependent launch on or off (``overlap``, class
        doc): every product keeps its dispatched path, the fused ops their gate; a captured graph is
        dropped (``capture()`` again). For same-run comparisons of the two launch modes."""
        dec = self.decoder
        self.overlap = bool(on) and self._can_overlap
        for proj in [p for layer in dec.layers for ps in layer.projections.values() for p in ps] + [dec.head]:
            proj.set_overlap(self.overlap)
        if dec.fused is not None:
            dec.fused = FusedOps(dec, self.device, overlap=self.overlap)
        self.graph = None

    def reset(self) -> None:
        """An empty cache position 0 (the cache's stale entries are masked, never read)."""
        d = self.decoder
        d.pos.zero_()
        d.token.zero_()
        d.length = 0

    def capture(self) -> torch.cuda.CUDAGraph:
        """The CUDA graph of one ``step_`` (warmed once at position 0, then the state reset)."""
        from ..measure import capture_graph

        self.reset()
        with torch.no_grad():
            self.graph = capture_graph(self.decoder.step_, warmup=1)
        self.reset()
        return self.graph

    def _check_room(self, steps: int) -> None:
        d = self.decoder
        if d.length == 0:
            raise UsageError("no prompt yet: prefill(ids) first")
        if d.length + steps > d.max_len:
            raise UsageError(f"{steps} more token(s) at position {d.length} do not fit a KV cache of {d.max_len} "
                             "positions")

    def _replay(self) -> None:
        from ..measure import cupy_on_torch_stream

        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.no_grad(), cupy_on_torch_stream():
                self.decoder.step_()
        self.decoder.length += 1

    def prefill(self, ids) -> torch.Tensor:
        """The prompt (int ids) at positions 0 .. T-1; the last position's logits [vocab] float32 (device)."""
        t = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if t.numel() and not (0 <= int(t.min()) and int(t.max()) < self.cfg.vocab_size):
            raise UsageError(f"token ids must be in [0, {self.cfg.vocab_size})")
        return self.decoder.prefill(t).float()

    def step(self, token: int | None = None) -> torch.Tensor:
        """One token (``token``, or the greedy choice of the last step) at the next position; its logits
        [vocab] float32 on the device."""
        self._check_room(1)
        if token is not None:
            if not 0 <= int(token) < self.cfg.vocab_size:
                raise UsageError(f"token id {token} is outside [0, {self.cfg.vocab_size})")
            self.decoder.token.fill_(int(token))
        self._replay()
        return self.decoder.logits.float()

    def generate(self, ids, n: int, *, on_prefill: Callable[[torch.Tensor], None] | None = None) -> list[int]:
        """Greedy decoding: ``n`` new ids after the prompt ``ids`` (the first from the prefill);
        ``on_prefill`` is called with the prompt's last logits (float32) before the steps run."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UsageError(f"the number of new tokens must be a positive integer, got {n!r}")
        t = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if t.numel() + n - 1 > self.decoder.max_len:
            raise UsageError(f"a prompt of {t.numel()} token(s) and {n} new ones need {t.numel() + n - 1} cache "
                             f"positions; the cache holds {self.decoder.max_len}")
        logits = self.prefill(t)
        if on_prefill is not None:
            on_prefill(logits)
        for _ in range(n - 1):
            self._replay()
        start = t.numel() - 1
        return self.decoder.history[start:start + n].tolist()


__all__ = ["FUSED", "LLAMA_KERNELS", "PERSISTENT_CHOICES", "FusedOps", "LayerWeights", "LlamaDecoder", "PackedLlama", "checkpoint_weights",
           "dense_projection", "llama_kernel_variants", "stack_rows"]
