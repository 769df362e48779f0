"""Write a checkpoint holding the paper's benchmark shapes with random weights (for `balprune bench`).

    python benchmarks/paper_shapes.py --dtype float16 -o paper.safetensors

Shapes: the micro-benchmark matrix 16384 x 8192, VGG-16 fc6 4096 x 25088 and fc7 4096 x 4096, and
the LSTM-1500 gate matrix 6000 x 3000 (four gates of [W_ih W_hh] side by side).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from balprune.save import save_state_dict  # noqa: E402

SHAPES = {"micro.weight": (16384, 8192), "fc6.weight": (4096, 25088), "fc7.weight": (4096, 4096),
          "lstm1500_gates.weight": (6000, 3000)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--only", nargs="*", default=None, help="names of SHAPES to include")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    sd = {n: torch.randn(*s, generator=g).to(dtype) for n, s in SHAPES.items() if not args.only or n in args.only}
    save_state_dict(sd, args.output, force=True)
    print(f"wrote {len(sd)} tensors ({args.dtype}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
