"""Training step time with the frozen model's attention as PyTorch SDPA vs transformers' eager kernel.

    python benchmarks/train_attention.py                 # this machine (CPU)
    python benchmarks/train_attention.py --use-gpu       # a GPU node

The same real training job as ``train_dtype.py`` (one DDP worker, p = 128, the demo's teacher data), once per
kernel per round, rounds interleaved, the frozen model in ``--dtype``; reports median step time and tokens/s
and the largest per-step loss difference (the kernels compute the same attention: it should be rounding).
``attn_implementation: auto`` picks the faster one per device on the strength of this run.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from train_dtype import compare_variants  # noqa: E402
from train_scaling import run_args  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    run_args(ap, "train_attention", steps=12)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="the frozen model's weights")
    args = ap.parse_args()
    compare_variants(args, "attn_implementation", ("sdpa", "eager"), {"model_dtype": args.dtype})


if __name__ == "__main__":
    main()
