"""`balprune generate`: text from a Llama-family model at batch 1, greedy or sampled.

The model is what ``eval`` reads (llm.evaluate.open_model: an HF folder, a packed file with its
recorded config.json and tokenizer.json, or a single file with ``like``). On a GPU it runs on the
packed decode runtime (runtime.model.llama.PackedLlama: every matrix product on its fastest correct
path, balprune's balanced kernel or cuBLAS, one CUDA graph per token, the greedy choice on the
device); on the CPU on the reference model (llm.reference.ReferenceLM: the dense masked weights in
torch, a static KV cache). The result names the engine that ran (``runtime``).

Order, so that nothing heavy happens before a refusal: the device (NoGpuError, exit 6, for CUDA
without one), the options (UsageError, exit 2), the model's config and headers, the tokenizer and
the prompt's length against the cache (exit 2 when prompt + new tokens do not fit), the memory
check, then the weights.

Sampling (``temperature`` > 0): softmax(logits / temperature) in float32, then nucleus filtering
(``top_p``: the smallest set of most likely ids whose probability reaches top_p, the boundary id
included), drawn with a torch.Generator seeded by ``seed`` on the CPU, so the same seed gives the
same text on every machine for the same logits.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import GpuRuntimeError, InvalidInputError, UsageError
from ..values import MAX_NEW_TOKENS
from .evaluate import DTYPES, check_model_memory, folder_bytes, forward_bytes, kv_cache_bytes, open_model
from .reference import ReferenceLM
from .text import TextCodec, tokenizer_name

SCHEMA = "balprune.generate/1"
#: The engines (see the module doc), as the result names them.
RUNTIME = "reference (dense masked weights, torch, static KV cache)"
PACKED_RUNTIME = "packed decode runtime (dispatched kernels, CUDA graph per token)"
#: The default cache length (--max-context).
DEFAULT_MAX_CONTEXT = 2048


@dataclass
class GenerateResult:
    model: str
    prompt_tokens: int
    new_tokens: list[int]
    text: str
    prefill_s: float
    decode_s: float
    device: str
    dtype: str
    runtime: str = RUNTIME
    schema: str = field(default=SCHEMA)

    @property
    def tokens_per_s(self) -> float | None:
        """New tokens after the first, per second of decoding (the first comes from the prefill)."""
        steps = len(self.new_tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def sampler(temperature: float, top_p: float, seed: int):
    """The ``choose`` function of ReferenceLM.generate for these options (module doc); None: greedy."""
    if temperature == 0:
        return None
    g = torch.Generator().manual_seed(seed)

    def choose(logits: torch.Tensor) -> int:
        z = logits.float().cpu()
        probs = torch.softmax((z - z.max()) / temperature, dim=-1)  # shifted first: a tiny T cannot overflow
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_p, dim=-1)
            keep = int(torch.searchsorted(cumulative, torch.tensor([top_p])).item()) + 1
            probs = torch.zeros_like(probs).scatter_(0, order[:keep], sorted_p[:keep])
        return int(torch.multinomial(probs, 1, generator=g).item())

    return choose


def finite_choice(choose, dtype: str):
    """``choose`` (None: greedy) behind a check that the logits are finite: a model whose activations
    overflow ``dtype`` gives NaN logits, and argmax of NaN is id 0 -- text that looks generated."""
    pick = choose if choose is not None else (lambda logits: int(torch.argmax(logits)))

    def checked(logits: torch.Tensor) -> int:
        if not bool(torch.isfinite(logits).all()):
            raise InvalidInputError(f"the model's logits are not finite in {dtype}: the weights hold NaN/Inf or "
                                    "huge values, or the activations overflow this dtype",
                                    hint="try --dtype float32 or bfloat16")
        return pick(logits)

    return checked


def check_options(max_new_tokens: int, temperature: float, top_p: float, max_context: int) -> None:
    """UsageError (exit 2) for an option out of its range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UsageError(f"--max-new-tokens must be in [1, {MAX_NEW_TOKENS}], got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and 0.0 <= temperature <= 100.0):
        raise UsageError(f"--temperature must be in [0, 100] (0: greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise UsageError(f"--top-p must be in (0, 1], got {top_p!r}")
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
        raise UsageError(f"--max-context must be a positive integer, got {max_context!r}")


def generate(model: str | os.PathLike[str], prompt: str, *, like: str | os.PathLike[str] | None = None,
             tokenizer: str | os.PathLike[str] | None = None, max_new_tokens: int = 64,
             max_context: int = DEFAULT_MAX_CONTEXT, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             dtype: str = "float32", device: torch.device | str = "cpu") -> GenerateResult:
    """Generate ``max_new_tokens`` tokens after ``prompt`` (module doc for the order and the sampling)."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    check_options(max_new_tokens, temperature, top_p, max_context)
    dev = torch.device(device)
    cfg, ckpt, model_tokenizer = open_model(model, like)
    tok_source = Path(tokenizer) if tokenizer is not None else model_tokenizer
    if tok_source is None:
        raise UsageError(f"{model}: no tokenizer.json comes with the model", hint="pass --tokenizer FOLDER or FILE")
    codec = TextCodec(tok_source)
    ids = codec.encode(prompt, "the prompt").tolist()
    if not ids and prompt:  # the text was there: the tokenizer is at fault, not the user
        raise InvalidInputError(f"tokenizer {tokenizer_name(tok_source)} gives no tokens for the prompt "
                                f"({len(prompt)} characters)", hint="use the model's own tokenizer.json")
    if not ids:
        raise UsageError("the prompt gives no tokens", hint="give a non-empty --prompt")
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise InvalidInputError(f"tokenizer {tokenizer_name(tok_source)} gives id {bad[0]}, outside the model's vocabulary "
                                f"[0, {cfg.vocab_size})")
    context = min(max_context, cfg.max_position_embeddings)
    need = len(ids) + max_new_tokens - 1
    if need > context:
        raise UsageError(f"the prompt's {len(ids)} tokens and {max_new_tokens} new ones need {need} cache positions; "
                         f"the cache holds {context}",
                         hint="a shorter prompt, fewer --max-new-tokens, or a larger --max-context")
    torch_dtype = DTYPES[dtype]
    packed_runtime = dev.type == "cuda"
    # the packed runtime keeps each product's masked matrix beside its sparse operator (the dense path)
    extra = folder_bytes(cfg, torch_dtype) if packed_runtime else 0
    check_model_memory(cfg, torch_dtype, dev, forward_bytes(cfg, len(ids), torch_dtype) + extra
                       + kv_cache_bytes(cfg, context, torch_dtype), f"generating with a cache of {context} positions",
                       "use a smaller --max-context or --dtype bfloat16" + (", or --device cpu" if dev.type == "cuda" else ""))
    marks: list[float] = []

    def clock() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        marks.append(time.perf_counter())

    choose = sampler(float(temperature), float(top_p), seed)
    try:
        if packed_runtime:
            new = _packed_generate(cfg, ckpt, ids, max_new_tokens, context, dtype, dev, choose, clock)
            clock()
        else:
            lm = ReferenceLM.from_checkpoint(cfg, ckpt, dtype=torch_dtype, device=dev)
            clock()
            new = lm.generate(ids, max_new_tokens, max_len=context, choose=finite_choice(choose, dtype),
                              on_prefill=clock)
            clock()
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise GpuRuntimeError(f"out of GPU memory generating with {model} on {dev}: {str(exc).splitlines()[0][:200]}",
                              hint="use --dtype bfloat16, a smaller --max-context, or --device cpu") from None
    text = codec.decode(new, "the generated ids")
    return GenerateResult(str(model), len(ids), new, text, marks[1] - marks[0], marks[2] - marks[1], str(dev), dtype,
                          PACKED_RUNTIME if packed_runtime else RUNTIME)


def _packed_generate(cfg, ckpt, ids: list[int], n: int, context: int, dtype: str, dev: torch.device, choose,
                     clock) -> list[int]:
    """``n`` new ids on the packed runtime (module doc): greedy on the device, replaying the step's graph
    with one host synchronisation for the run; sampled, one replay and one host choice per token. The
    logits are checked finite after the prompt and after the last step (a model whose activations
    overflow gives NaN at every step from the first)."""
    from ..runtime.model.llama import PackedLlama, checkpoint_weights

    rt = PackedLlama(cfg, checkpoint_weights(ckpt), max_len=context, dtype=dtype, device=dev.index or 0)
    rt.capture()
    check = finite_choice(None, dtype)
    clock()
    if choose is None:
        def prefilled(logits: torch.Tensor) -> None:
            check(logits)
            clock()

        out = rt.generate(ids, n, on_prefill=prefilled)
        check(rt.decoder.logits.float())
        return out
    logits = rt.prefill(ids)
    check(logits)
    clock()
    out = [choose(logits)]
    for _ in range(n - 1):
        logits = rt.step(out[-1])
        check(logits)
        out.append(choose(logits))
    return out
