"""transformers' own model as a decode peer of ``bench --model`` on a Llama-family file (issue 18).

``TransformersDecoder`` builds ``AutoModelForCausalLM.from_config`` of the config.json the packed file
recorded, loads the same masked dense weights the torch peer runs (so the three runners compute the
same function), and decodes at batch 1 the way a transformers user serving at batch 1 does at best:
a ``StaticCache`` of the runtime's length and one decode step (token and position in device buffers,
greedy id on the device) captured in a CUDA graph. It has the surface bench times (``reset``,
``prefill``, ``step``, ``capture``, ``weight_bytes``, ``cfg``), so bench checks it against the float32
reference like the other runners.

transformers is a dev dependency, never a runtime one: ``transformers_or_reason`` says why the peer
is absent when it cannot be imported, and bench reports that instead of failing. Nothing here reads a
file: the config dict and the weights come from the already-checked packed file.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch

from ..errors import UsageError


def transformers_or_reason():
    """(the transformers module, None), or (None, why it cannot be used). transformers imports
    torchvision; balprune.vision makes that import work beside a CPU-only torch."""
    try:
        from ..vision import torchvision

        try:
            torchvision()
        except ImportError:
            pass
        import transformers
        transformers.AutoModelForCausalLM  # noqa: B018 - the lazy import is where a broken install fails
        return transformers, None
    except Exception as exc:  # any failure to import is a reason to report, not a crash
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"transformers is not importable here ({type(exc).__name__}: {first})"[:300]


@contextlib.contextmanager
def _quiet():
    """transformers' deprecation notices (``past_key_values`` is renamed after 5.25; the device's 5.17
    knows only that name) kept off the bench output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


class TransformersDecoder:
    """transformers' model of ``config`` (an HF config.json dict, the family's) with the weights
    ``weight(name) -> (packed, dense)`` gives (the dense masked matrices are loaded), ``max_len``
    positions of StaticCache, in ``dtype`` on ``device`` (module doc). UsageError when transformers is
    absent or the weights do not fill the model's parameters."""

    unit = "token"

    def __init__(self, cfg, config: dict, weight: Callable[[str], tuple], *, max_len: int, dtype: str,
                 device: torch.device) -> None:
        tf, why = transformers_or_reason()
        if tf is None:
            raise UsageError(why)
        self.cfg = cfg
        self.dev = torch.device(device)
        tdt = getattr(torch, dtype)
        hf_cfg = tf.AutoConfig.for_model(**config)
        with torch.device(self.dev):
            model = tf.AutoModelForCausalLM.from_config(hf_cfg, dtype=tdt, attn_implementation="sdpa")
        params = dict(model.named_parameters(remove_duplicate=False))
        tied = bool(getattr(hf_cfg, "tie_word_embeddings", False))
        with torch.no_grad():
            for name, p in params.items():
                if name == "lm_head.weight" and tied:
                    continue  # the embedding's own storage
                dense = weight(name)[1]
                if tuple(dense.shape) != tuple(p.shape):
                    raise UsageError(f"transformers peer: {name} is {list(dense.shape)} in the file, "
                                     f"{list(p.shape)} in the model")
                p.copy_(dense.to(self.dev, tdt))
        self.model = model.eval()
        self.max_len = max_len
        self.cache = tf.StaticCache(config=hf_cfg, max_cache_len=max_len)
        self.ids = torch.zeros(1, 1, dtype=torch.int64, device=self.dev)
        self.pos = torch.zeros(1, dtype=torch.int64, device=self.dev)
        self.logits = torch.zeros(cfg.vocab_size, dtype=torch.float32, device=self.dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.length = 0
        seen: set[int] = set()
        self.weight_bytes = 0
        for p in params.values():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                self.weight_bytes += p.numel() * p.element_size()

    def reset(self) -> None:
        self.cache.reset()
        self.pos.zero_()
        self.length = 0

    @torch.no_grad()
    def prefill(self, ids) -> torch.Tensor:
        """The prompt at positions 0 .. T-1 in one pass; its last logits [vocab] float32."""
        t = torch.as_tensor(ids, dtype=torch.int64).reshape(1, -1).to(self.dev)
        n = int(t.shape[1])
        if not 1 <= n <= self.max_len:
            raise UsageError(f"a prompt of {n} token(s) does not fit a cache of {self.max_len} positions")
        with _quiet():
            out = self.model(input_ids=t, past_key_values=self.cache, use_cache=True,
                             cache_position=torch.arange(n, device=self.dev))
        self.logits.copy_(out.logits[0, -1])
        self.ids.copy_(torch.argmax(self.logits).view(1, 1))
        self.pos.fill_(n)
        self.length = n
        return self.logits

    @torch.no_grad()
    def _step(self) -> None:
        with _quiet():
            out = self.model(input_ids=self.ids, past_key_values=self.cache, use_cache=True, cache_position=self.pos,
                             position_ids=self.pos.view(1, 1))
        self.logits.copy_(out.logits[0, -1])
        self.ids.copy_(torch.argmax(self.logits).view(1, 1))
        self.pos.add_(1)

    def capture(self) -> torch.cuda.CUDAGraph:
        """The CUDA graph of one decode step (RuntimeError when transformers' step cannot be captured)."""
        from ..runtime.measure import capture_graph

        self.reset()
        self.prefill([0])
        self.graph = capture_graph(self._step, warmup=2)
        self.reset()
        return self.graph

    def step(self, token: int | None = None) -> torch.Tensor:
        """One token (``token``, or the last greedy id) at the next position; its logits [vocab] float32."""
        if self.length + 1 > self.max_len:
            raise UsageError(f"a step at position {self.length} does not fit a cache of {self.max_len} positions")
        if token is not None:
            self.ids.fill_(int(token))
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        self.length += 1
        return self.logits


__all__ = ["TransformersDecoder", "transformers_or_reason"]
