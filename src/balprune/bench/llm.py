"""``balprune bench PACKED --model`` for a Llama-family packed file: decode latency at batch 1.

For each dtype, in one process on one GPU: balprune's decode runtime (runtime.model.llama.PackedLlama,
every matrix product on the path its dispatcher measured fastest), the dense masked model in torch
(the same decoder with every product through cuBLAS: static KV cache, one CUDA graph per token, the
same weights with zeros) and, where transformers imports, transformers' own model of the same weights
(bench.hf_peer: StaticCache, the step in a CUDA graph; timed eager, and said so, when its step cannot
be captured), all first checked against the float32 reference model
(llm.reference.ReferenceLM) over a prompt and teacher-forced steps (runtime.measure.relative_error
within MODEL_TOLERANCE; a runner outside it is reported and not timed, and only balprune's failing
makes ``bench`` fail). Then, hot, replayed from each runner's CUDA graph: ms per token at each
context (the prompt prefilled to that length first), and the prefill of a ``PROMPT_TOKENS`` prompt
(eager: it is one batched pass).

Report (schema balprune.bench/2, so ``compare`` works on it): layer "model" is decode at the first
context, "model@ctxN" the others, "prefill@N" the prefill; kernel "balprune", "torch" or "transformers"; the
dispatcher's per-product figures as per-layer measurements; ``meta["model"]`` holds the config, the
unit ("token"; kernel "transformers" for the transformers peer), each dtype's decisions and errors, and the bandwidth floors of the dense and the
packed weight bytes at this run's plain-read bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import GpuRuntimeError, InvalidInputError
from ..runtime.measure import MODEL_TOLERANCE, relative_error
from .model import DTYPE_CODE, record_dispatch, untimed_runner
from .report import BenchReport, Measurement
from .run import Session

#: Contexts decode is timed at, the prompt prefill is timed for, and the checked run's shape.
CONTEXTS = (128, 1024)
PROMPT_TOKENS = 128
CHECK_PROMPT, CHECK_STEPS = 32, 16


def llm_preflight(path: str | Path):
    """(config, checkpoint) when ``path`` is a packed file that records an HF causal-LM config.json
    (llm.evaluate.open_model: the layout checked, exit 4 when it does not describe the tensors), the
    whole file verified first (formats.packed_file.verify_packed, exit 4); None for any other packed
    file (the built-in architectures' path). No GPU is looked for."""
    from ..formats.packed_file import read_packed, verify_packed
    from ..llm.evaluate import open_model

    if read_packed(path).hf_files() is None:  # the header alone says
        return None
    verify_packed(path)
    cfg, ckpt, _ = open_model(path)
    return cfg, ckpt


def _ids(n: int, vocab: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.int64) * 7 + 3) % vocab


def _reference(cfg, ckpt, dev) -> tuple[list[torch.Tensor], list[int]]:
    """float32 reference logits of the check prompt's last position and CHECK_STEPS - 1 greedy steps."""
    from ..llm.reference import ReferenceLM

    ref = ReferenceLM.from_checkpoint(cfg, ckpt, dtype=torch.float32, device=dev)
    cache = ref.new_cache(CHECK_PROMPT + CHECK_STEPS)
    logits = [ref.step(_ids(CHECK_PROMPT, cfg.vocab_size)[None].to(dev), cache)[0, -1].cpu()]
    tokens = [int(torch.argmax(logits[-1]))]
    for _ in range(CHECK_STEPS - 1):
        logits.append(ref.step(torch.tensor([[tokens[-1]]], device=dev), cache)[0, -1].cpu())
        tokens.append(int(torch.argmax(logits[-1])))
    del ref, cache
    return logits, tokens


def _error(rt, want: list[torch.Tensor], tokens: list[int]) -> float:
    """Largest relative error of ``rt``'s logits over the checked run (teacher-forced on the reference's tokens)."""
    rt.reset()
    got = [rt.prefill(_ids(CHECK_PROMPT, rt.cfg.vocab_size)).cpu()]
    got += [rt.step(t).cpu() for t in tokens[:-1]]
    return max(relative_error(g, w) for g, w in zip(got, want))


#: The transformers peer's runner name (bench.hf_peer): the one runner whose failures are only reported.
PEER = "transformers"


def _peer_failed(report: BenchReport, dtype: str, what: str, exc: BaseException) -> None:
    first = str(exc).splitlines()[0] if str(exc) else ""
    report.unavailable.append({"layer": "model", "batch": 1, "kernel": PEER + what,
                               "reason": f"{dtype}: {type(exc).__name__}: {first}"[:300]})


def _time_runner(s: Session, report: BenchReport, name: str, r, dtype: str, nbytes: int, err: float, n: int,
                 cfg) -> None:
    """Time runner ``r``: its step replayed from its CUDA graph at each context, then the prefill. The
    transformers peer whose step cannot be captured is timed eager (graph False), and a note says why."""
    graph = True
    try:
        r.capture()
    except Exception as exc:
        if name != PEER:
            raise
        graph = False
        _peer_failed(report, dtype, " (graph)", exc)
    for i, ctx in enumerate(CONTEXTS):
        r.reset()
        r.prefill(_ids(ctx, cfg.vocab_size))
        t = s.timer.time_calls(r.step, iters=n)
        gbps = nbytes / (t.median_us * 1e-6) / 1e9
        report.measurements.append(Measurement(
            "model" if i == 0 else f"model@ctx{ctx}", (1, 1), DTYPE_CODE[dtype], 1, "hot", graph, name,
            t.median_us, t.p10_us, t.p90_us, nbytes, gbps, 100.0 * gbps / s.bandwidth, err, True,
            f"token at context {ctx}" + ("" if graph else " (eager: the step could not be captured)")))
    prompt = _ids(PROMPT_TOKENS, cfg.vocab_size)
    t = s.timer.time_calls(lambda: (r.reset(), r.prefill(prompt)), iters=max(5, n // 10))
    report.measurements.append(Measurement(
        f"prefill@{PROMPT_TOKENS}", (1, 1), DTYPE_CODE[dtype], 1, "hot", False, name, t.median_us, t.p10_us, t.p90_us,
        nbytes, 0.0, 0.0, err, True, f"prompt of {PROMPT_TOKENS} tokens, one batched pass"))


def _transformers_peer(path, cfg, ckpt, max_len: int, dtype: str, dev):
    """transformers' model of the file (bench.hf_peer.TransformersDecoder), or why there is none."""
    from ..formats.packed_file import read_packed
    from ..runtime.model.llama import checkpoint_weights
    from .hf_peer import TransformersDecoder, transformers_or_reason

    tf, why = transformers_or_reason()
    if tf is None:
        return why
    try:
        return TransformersDecoder(cfg, read_packed(path).hf_files().config, checkpoint_weights(ckpt), max_len=max_len,
                                   dtype=dtype, device=dev)
    except Exception as exc:  # a peer that cannot be built is reported, never fatal
        return f"transformers could not build the model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"[:300]


def bench_llm(path: str | Path, checked, *, dtypes: tuple[str, ...], iters: int, device: int, paths: str,
              progress: Callable[[str], None] | None = None) -> BenchReport:
    """Benchmark the Llama-family packed file at ``path`` (module doc); ``checked`` is llm_preflight's result."""
    from ..runtime.measure import free_device_memory, gpu_failures
    from ..runtime.model.llama import PackedLlama, checkpoint_weights

    cfg, ckpt = checked
    say = progress or (lambda _m: None)
    n = max(10, iters)
    max_len = max(max(CONTEXTS), PROMPT_TOKENS, CHECK_PROMPT + CHECK_STEPS) + n + 8
    if max_len > cfg.max_position_embeddings:
        raise InvalidInputError(f"{path}: decode is timed up to {max_len} positions; the model has "
                                f"{cfg.max_position_embeddings} (max_position_embeddings)")
    with Session(device) as s:
        report = s.new_report(str(path))
        dev = torch.device("cuda", device)
        try:
            say("float32 reference logits")
            want, tokens = _reference(cfg, ckpt, dev)
            free_device_memory()
            model_meta = {"architecture": f"{cfg.model_type} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size})",
                          "kind": "llama", "unit": "token", "contexts": list(CONTEXTS), "prompt_tokens": PROMPT_TOKENS,
                          "paper": None, "tolerance": {d: MODEL_TOLERANCE[d] for d in dtypes}, "dtypes": {},
                          "read_gbps": s.bandwidth}
            for dtype in dtypes:
                say(f"{dtype}: building the runtime (measuring each product's paths)")
                rt = PackedLlama(cfg, checkpoint_weights(ckpt), max_len=max_len, dtype=dtype, device=device,
                                 paths=paths, progress=say)
                say(f"{dtype}: building the dense torch peer")
                dense = PackedLlama(cfg, checkpoint_weights(ckpt), max_len=max_len, dtype=dtype, device=device,
                                    paths="dense", measure=False)
                runners = {"balprune": rt, "torch": dense}
                say(f"{dtype}: building the transformers peer")
                hf = _transformers_peer(path, cfg, ckpt, max_len, dtype, dev)
                if isinstance(hf, str):
                    report.unavailable.append({"layer": "model", "batch": 1, "kernel": PEER,
                                               "reason": f"{dtype}: {hf}"})
                else:
                    runners[PEER] = hf
                errors = {k: _error(r, want, tokens) for k, r in runners.items() if k != PEER}
                if PEER in runners:
                    try:
                        errors[PEER] = _error(runners[PEER], want, tokens)
                    except Exception as exc:  # transformers' own failure: reported, never fatal
                        _peer_failed(report, dtype, "", exc)
                        del runners[PEER]
                nbytes = {k: r.weight_bytes for k, r in runners.items()}
                meta = {"unit": "token", "dispatch": rt.describe(), "max_rel_error": errors, "weight_bytes": nbytes,
                        "floor_us": {k: v / (s.bandwidth * 1e3) for k, v in nbytes.items()},
                        "paths": {c.layer: c.path for c in rt.choices}, "decode_ops": rt.decode_ops}
                model_meta["dtypes"][dtype] = meta
                record_dispatch(report, rt.choices, dtype, s.bandwidth)
                for name in list(runners):
                    if not errors[name] <= MODEL_TOLERANCE[dtype]:
                        report.measurements.append(untimed_runner(name, dtype, nbytes[name], errors[name], "hot", True))
                        continue
                    say(f"{dtype}: timing {name}")
                    if name != PEER:
                        _time_runner(s, report, name, runners[name], dtype, nbytes[name], errors[name], n, cfg)
                        continue
                    try:
                        _time_runner(s, report, name, runners[name], dtype, nbytes[name], errors[name], n, cfg)
                    except Exception as exc:
                        _peer_failed(report, dtype, " (timing)", exc)
                del rt, dense, hf, runners
                free_device_memory()
            report.meta["model"] = model_meta
        except gpu_failures() as exc:
            free_device_memory()
            raise GpuRuntimeError(f"model {cfg.model_type}: {type(exc).__name__}: {exc}") from None
    return report


__all__ = ["CONTEXTS", "PEER", "PROMPT_TOKENS", "bench_llm", "llm_preflight"]
