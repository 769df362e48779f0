#!/usr/bin/env python3
"""Issue 18: decode ms/token of the packed Llama-family runtime against the dense masked model.

Run on the GPU machine from the repository root:

    PYTHONPATH=src python3 benchmarks/llm_decode.py [--model 1b|8b|tiny] [--configs dense,50%,70%,2:4]
        [--dtype float16] [--contexts 128,1024] [--steps 64] [--split] [--overlap on|off|both] [--json OUT.json]

Random weights (std 0.02, norms 1), the Llama-3.2-1B or Llama-3-8B shapes (tied head for 1B), pruned
in memory balanced (32 blocks per row) at each sparsity or N:M with the index encoding `prune --index
auto` would store (bitmask at 50-80%: the runtime times the bitmask and the offsets kernel on it), no
file written (``--prune-head``: the head's matrix too, the tied embedding for 1B). For each config the
runtime (runtime.model.llama.PackedLlama) is built with every product dispatched ("auto"), and the
same weights with every product forced dense ("dense": the masked model in torch with a static
cache, the peer every config is compared with, identical for every mask); both run one decode step
per CUDA-graph replay. Per context: prefill of that many prompt tokens, then ``--steps`` replays
timed with CUDA events (ms/token = elapsed / steps). Also: the weight bytes each runtime reads per
token, the bandwidth floor of those bytes at the same run's plain-read bandwidth, and the relative
error of the packed runtime's logits against the dense runtime's over 8 teacher-forced steps. With
``--transformers`` also transformers' own model of the unpruned weights (StaticCache, the step in a
CUDA graph where it can be captured), the issue's transformers peer. ``--overlap``: the step's own
launches as programmatic dependent launches (PackedLlama ``overlap``, on by default) or not; "both"
times each runtime both ways in the same run (row key "overlap_on": the figures with it on).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import zlib

import torch

from balprune.formats.balanced import BalancedTensor
from balprune.formats.layouts import choose_encoding
from balprune.llm.family import LlmConfig, expected_tensors
from balprune.patterns.balanced import geometry_for
from balprune.patterns.kinds import BalancedPattern
from balprune.runtime.measure import Timer
from balprune.runtime.model.llama import PackedLlama

BASE = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None, attention_bias=False,
            max_position_embeddings=8192, torch_dtype="bfloat16")
MODELS = {
    "tiny": LlmConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, **BASE),
    "1b": LlmConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, **BASE),
    "8b": LlmConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, **BASE),
}
CONFIGS = {"dense": None, "30%": BalancedPattern(0.3, blocks=32), "50%": BalancedPattern(0.5, blocks=32),
           "70%": BalancedPattern(0.7, blocks=32), "80%": BalancedPattern(0.8, blocks=32),
           "2:4": BalancedPattern(0.5, blocks=None, block_size=4), "4:8": BalancedPattern(0.5, blocks=None, block_size=8)}


def head_name(cfg: LlmConfig) -> str:
    """The tensor the head's product reads: the embedding when the model ties them, else lm_head."""
    return "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"


def weights(cfg: LlmConfig, pattern, dtype: torch.dtype, *, prune_head: bool = False):
    """weight(name) for PackedLlama: random tensors per name (seeded by the name), the decoder's linears
    pruned with ``pattern`` (None: dense) by magnitude on the GPU; with ``prune_head`` the head's matrix
    too (a tied one is then the pruned embedding as well: the runtime looks tokens up in its masked
    dense form)."""
    shapes = expected_tensors(cfg)
    pruned_beyond_layers = {head_name(cfg)} if prune_head else set()

    def weight(name: str):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
            return t, t
        g = torch.Generator(device="cuda").manual_seed(zlib.crc32(name.encode()))
        w = (torch.randn(shape, generator=g, device="cuda") * 0.02).to(dtype)
        if pattern is None or (".layers." not in name and name not in pruned_beyond_layers):
            return w, w
        geo = geometry_for(shape[0], shape[1], pattern)
        bt = BalancedTensor.from_offsets(w.cpu(), pattern, _gpu_offsets(w, geo))
        # the index encoding `balprune prune` (--index auto) would store: the one with fewer bytes
        enc, _ = choose_encoding("auto", geo.rows, geo.blocks, geo.block_length, geo.keep)
        return bt.with_encoding(enc), bt.to_dense(name)
    return weight


def _gpu_offsets(w: torch.Tensor, geo) -> torch.Tensor:
    """In-block offsets [R, B, k] (the geometry's index dtype, CPU) of the k largest |w| per block, on the GPU."""
    pad = geo.padded_width - geo.cols
    m = torch.nn.functional.pad(w.float().abs(), (0, pad), value=-1.0).view(geo.rows, geo.blocks, geo.block_length)
    idx = torch.topk(m, geo.keep, dim=-1, sorted=False).indices
    return torch.sort(idx, dim=-1).values.to(torch.int32).cpu().to(geo.index_dtype)


def time_decode(rt: PackedLlama, context: int, steps: int) -> dict:
    """Prefill ``context`` tokens, then ``steps`` graph replays timed with CUDA events."""
    ids = torch.arange(context) % rt.cfg.vocab_size
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rt.prefill(ids)
    torch.cuda.synchronize()
    prefill_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(3):  # warm replays (part of the cache budget)
        rt.step()
    ms = _events_ms(rt.step, steps)
    return {"context": context, "prefill_ms": round(prefill_ms, 3), "ms_per_token": round(ms, 4)}


def _events_ms(fn, n: int) -> float:
    """ms per call of ``fn`` over ``n`` back-to-back calls, timed with CUDA events."""
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / n


def _graph_ms(fn, replays: int = 50) -> float:
    """ms per call of ``fn`` replayed from a CUDA graph (best of three runs of ``replays`` replays)."""
    from balprune.runtime.measure import capture_graph

    g = capture_graph(fn, warmup=1)
    return min(_events_ms(g.replay, replays) for _ in range(3))


def split_step(rt: PackedLlama) -> dict:
    """Where one decode step's time goes (issue 18's first question), each part replayed from its own
    CUDA graph at a fixed position: the products alone (every projection and the head, in step order),
    the work between them alone (kernels/llama_ops.cu, embedding, argmax; the position not advanced),
    the same number of empty launches (what a graph node costs before any work), and the sum of the
    dispatcher's isolated per-product times (hot, 20 per graph)."""
    import cupy as cp

    dec = rt.decoder
    keys = ("qkv", "o", "gate_up", "down")

    def products():
        for layer in dec.layers:
            for key in keys:
                for proj in layer.projections[key]:
                    proj.launch()
        dec.head.launch()

    def ops():
        f = dec.fused
        torch.index_select(dec.embed, 0, dec.token, out=dec.h.view(1, -1))
        for n in range(len(dec.layers)):
            f.input_norm[n]()
            f.attention[n]()
            f.post_norm[n]()
            f.silu_mul()
        f.final_norm()
        torch.argmax(dec.logits, dim=0, keepdim=True, out=dec.next_token)

    n_products = sum(len(layer.projections[k]) for layer in dec.layers for k in keys) + 1
    n_ops = 4 * len(dec.layers) + 3
    nop = cp.RawKernel('extern "C" __global__ void nop() {}', "nop")

    def empty():
        for _ in range(n_products + n_ops):
            nop((1,), (32,), ())

    rt.reset()
    rt.prefill(torch.arange(128) % rt.cfg.vocab_size)
    out = {"launches": n_products + n_ops, "products_ms": round(_graph_ms(products), 4),
           "empty_launches_ms": round(_graph_ms(empty), 4),
           "dispatcher_products_sum_ms": None}
    if all(c.path in c.times_us for c in rt.choices):  # measured dispatch (not the forced-dense peer)
        out["dispatcher_products_sum_ms"] = round(sum(c.times_us[c.path] for c in rt.choices) / 1e3, 4)
        out["per_product_us"] = {c.layer: round(c.times_us[c.path], 1) for c in rt.choices[:5] + rt.choices[-1:]}
    if dec.fused is not None:
        out["ops_ms"] = round(_graph_ms(ops), 4)
        f = dec.fused
        for kind in ("input_norm", "attention", "post_norm"):  # each op over every layer, alone
            launches = getattr(f, kind)
            out[f"{kind}_ms"] = round(_graph_ms(lambda launches=launches: [g() for g in launches]), 4)
        out["silu_mul_ms"] = round(_graph_ms(lambda: [f.silu_mul() for _ in dec.layers]), 4)
    return out


def transformers_row(cfg, weight, max_len: int, dtype: str, contexts: list[int], steps: int, bw: float) -> dict:
    """transformers' own model of the unpruned weights (the issue's "transformers with a static cache and
    the step in a CUDA graph" figure), timed like the runtimes; or why it could not run."""
    from balprune.bench.hf_peer import TransformersDecoder
    from balprune.llm.examples import config_dict

    try:
        peer = TransformersDecoder(cfg, config_dict(cfg), weight, max_len=max_len, dtype=dtype,
                                   device=torch.device("cuda"))
    except Exception as exc:
        return {"config": "transformers", "error": f"{type(exc).__name__}: {exc}"[:300]}
    row = {"config": "transformers", "weight_MB": round(peer.weight_bytes / 1e6, 1),
           "floor_ms": round(peer.weight_bytes / bw / 1e6, 4)}
    try:
        peer.capture()
        row["graph"] = True
    except Exception as exc:
        row["graph"] = False
        row["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    for ctx in contexts:
        peer.reset()
        row[f"ctx{ctx}"] = time_decode(peer, ctx, steps)
    del peer
    torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b", choices=list(MODELS))
    ap.add_argument("--configs", default="50%,70%,2:4")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--torch-ops", action="store_true", help="the work between the products in torch ops")
    ap.add_argument("--transformers", action="store_true",
                    help="also time transformers' own model of the dense weights (bench.hf_peer: StaticCache + CUDA graph)")
    ap.add_argument("--split", action="store_true", help="also time the step's products and ops apart (split_step)")
    ap.add_argument("--overlap", default="on", choices=("off", "on", "both"),
                    help="programmatic dependent launches of the step (both: each runtime timed both ways)")
    ap.add_argument("--prune-head", action="store_true",
                    help="prune the head's matrix too (the tied embedding for 1B): the whole-model byte ratios "
                         "issue 18 states (56%% at 50%%); Wanda's and SparseGPT's scope keeps it dense")
    ap.add_argument("--persistent", default="auto", choices=("auto", "on", "off"),
                    help="the packed runtime's step kernel (every layer in one launch): chosen by timing, forced, or not")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    cfg, dt = MODELS[a.model], getattr(torch, a.dtype)
    contexts = [int(c) for c in a.contexts.split(",")]
    max_len = max(contexts) + a.steps + 8
    timer = Timer(0)
    bw = timer.read_bandwidth_gbps()
    rows = []
    print(json.dumps({"model": a.model, "dtype": a.dtype, "read_GBps": round(bw, 1), "max_len": max_len,
                      "device": torch.cuda.get_device_name()}), flush=True)
    for cname in a.configs.split(","):
        pattern = CONFIGS[cname]
        built = {}
        for paths in (("dense",) if pattern is None else ("auto", "dense")):
            t0 = time.perf_counter()
            rt = PackedLlama(cfg, weights(cfg, pattern, dt, prune_head=a.prune_head), max_len=max_len, dtype=a.dtype, paths=paths,
                             measure=paths != "dense", fused=not a.torch_ops, overlap=a.overlap == "on",
                             persistent=a.persistent)
            build_s = time.perf_counter() - t0
            rt.capture()
            row = {"config": cname, "paths": paths, "build_s": round(build_s, 1), "weight_MB": round(rt.weight_bytes / 1e6, 1),
                   "floor_ms": round(rt.weight_bytes / bw / 1e6, 4),
                   "sparse_layers": sum(c.path != "dense" for c in rt.choices), "layers": len(rt.choices),
                   "decode_ops": rt.decode_ops["path"], "decode_why": rt.decode_ops, "overlap": a.overlap == "on",
                   "head": "pruned" if a.prune_head and pattern is not None else "dense"}
            for ctx in contexts:
                rt.reset()
                row[f"ctx{ctx}"] = time_decode(rt, ctx, a.steps)
            if a.split:
                row["split"] = split_step(rt)
            if a.overlap == "both":  # the same runtime, its launches rebound as programmatic dependent launches
                rt.set_overlap(True)  # (from here on: the error summary below runs overlapped too)
                rt.capture()
                row["overlap_on"] = {}
                for ctx in contexts:
                    rt.reset()
                    row["overlap_on"][f"ctx{ctx}"] = time_decode(rt, ctx, a.steps)
            built[paths] = rt
            rows.append(row)
            print(json.dumps(row), flush=True)
        if a.transformers and "dense" in built:
            rows.append(transformers_row(cfg, weights(cfg, None, dt), max_len, a.dtype, contexts, a.steps, bw))
            print(json.dumps(rows[-1]), flush=True)
        if len(built) == 2:  # the packed logits against the dense path's, teacher-forced
            errs = []
            prompt = torch.arange(16) % cfg.vocab_size
            la, ld = built["auto"].prefill(prompt), built["dense"].prefill(prompt)
            errs.append(float((la - ld).norm() / ld.norm()))
            for t in range(8):
                la, ld = built["auto"].step(t + 1), built["dense"].step(t + 1)
                errs.append(float((la - ld).norm() / ld.norm()))
            a_ms = rows[-2][f"ctx{contexts[0]}"]["ms_per_token"]
            d_ms = rows[-1][f"ctx{contexts[0]}"]["ms_per_token"]
            summary = {"config": cname, "dense/packed": round(d_ms / a_ms, 3), "max_rel_err_vs_dense": max(errs),
                       "errors_with_overlap": built["auto"].overlap,
                       "paths": {c.layer: c.path for c in built["auto"].choices[:5]}}
            print(json.dumps(summary), flush=True)
            rows.append(summary)
        del built
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
