"""Training step time with the frozen model's weights in fp32 vs bf16 (the cartridge and AdamW stay fp32).

    python benchmarks/train_dtype.py                 # this machine (CPU)
    python benchmarks/train_dtype.py --use-gpu       # a GPU node

The same real training job as ``train_scaling.py`` (Ray Train, one DDP worker, p = 128, the demo's teacher
data), once per dtype per round, rounds interleaved. Reports the median step time and tokens/s over the steps
after ``--warmup`` and the largest relative difference of the per-step training losses between the two
dtypes (the same data and seed: bf16 should change speed, not what is learned). On a CPU with avx512_bf16 or
AMX, bf16 matmuls run natively; on one without, expect bf16 to be slower.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, write_json  # noqa: E402
from train_scaling import run_args, run_one, start  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    run_args(ap, "train_dtype", steps=12)
    args = ap.parse_args()
    data = start(args)
    dtypes = ("fp32", "bf16")
    runs: dict[str, list[dict]] = {d: [] for d in dtypes}
    with tempfile.TemporaryDirectory(prefix="dtype") as tmp:
        for r in range(args.repeats):
            for d in dtypes:
                print(f"[bench] round {r + 1}/{args.repeats}: {d}", flush=True)
                one = Namespace(**{**vars(args), "dtype": d})
                runs[d].append(run_one(data, "ddp", 1, one, Path(tmp) / f"{d}-{r}"))

    def med(d, key):
        return statistics.median(x for run in runs[d] for x in run[key])

    # same data, seed and step order in every run: compare the loss of each step across the dtypes
    loss_gap = max(
        abs(a - b) / abs(b) for ra, rb in zip(runs["bf16"], runs["fp32"]) for a, b in zip(ra["loss"], rb["loss"])
    )
    speedup = med("fp32", "step_s") / med("bf16", "step_s")
    rows = [
        [d, f"{med(d, 'step_s'):.3f}", f"{med(d, 'tokens_per_s'):.0f}", "1.00x" if d == "fp32" else f"{speedup:.2f}x"]
        for d in dtypes
    ]
    device = "GPU" if args.use_gpu else f"CPU ({os.cpu_count()} cores)"
    table = print_table(
        f"frozen-model dtype on {device}: p={args.p}, global batch {args.global_batch}, median over steps "
        f"{args.warmup + 1}..{args.steps} x {args.repeats} runs; largest per-step loss difference "
        f"bf16 vs fp32: {loss_gap:.2%}",
        ["dtype", "step s", "tokens/s", "speed vs fp32"],
        rows,
    )
    write_json(
        args.name,
        {
            "config": vars(args),
            "speedup_bf16_vs_fp32": speedup,
            "max_rel_loss_diff": loss_gap,
            "median": {d: {k: med(d, k) for k in ("step_s", "tokens_per_s")} for d in dtypes},
            "runs": runs,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
