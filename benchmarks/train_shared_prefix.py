"""Training step time with each micro-batch's shared prefix read once vs every row read whole.

    python benchmarks/train_shared_prefix.py                 # this machine (CPU)
    python benchmarks/train_shared_prefix.py --use-gpu       # a GPU node

The same real training job as ``train_dtype.py`` (one DDP worker, p = 128, the demo's teacher data), with
``training.shared_prefix`` off (the baseline) and on, rounds interleaved, the frozen model in ``--dtype``;
reports median step time and tokens/s and the largest per-step loss difference (the two compute the same
loss: it should be rounding).
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
    run_args(ap, "train_shared_prefix", steps=12)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="the frozen model's weights")
    args = ap.parse_args()
    compare_variants(args, "training.shared_prefix", (False, True), {"model_dtype": args.dtype})


if __name__ == "__main__":
    main()
