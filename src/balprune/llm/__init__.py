"""Hugging Face causal LMs of the Llama family: recognition, a torch reference model, example folders.

- ``family``: config.json parsed hostile-proof into :class:`LlmConfig`, and a folder's tensor names
  and shapes checked against the layout that config implies (:func:`open_llm`).
- ``reference``: :class:`ReferenceLM`, the family's forward pass in plain torch (no transformers).
- ``examples``: HF folders with random weights (presets llama-tiny / llama-1b / llama-8b), streamed
  shard by shard, with a small byte-level BPE tokenizer.json.
- ``text``: data files to token ids (.npy, ids text, or text through a tokenizer.json) and the windows
  cut from them (calibration samples, perplexity windows); the one user of the ``tokenizers`` package
  (TextCodec runs it on a user's tokenizer.json in a memory-capped child: ``tokenizer_child``).
- ``evaluate``: perplexity of a folder, an unpacked or a packed file (``balprune eval``).
"""

from __future__ import annotations

from .family import Llama3RopeScaling, LlmConfig, check_layout, expected_tensors, open_llm, parse_config, read_config
from .text import eval_windows, read_token_ids, token_windows

__all__ = [
    "LlmConfig",
    "Llama3RopeScaling",
    "check_layout",
    "eval_windows",
    "expected_tensors",
    "open_llm",
    "parse_config",
    "read_config",
    "read_token_ids",
    "token_windows",
]
