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
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, write_json  # noqa: E402
from train_scaling import run_args, run_one, start  # noqa: E402


def compare_variants(args, field: str, values: tuple, fixed: dict | None = None) -> dict:
    """Interleaved rounds of the real job, once per value of the config ``field`` (top-level, or
    ``training.<key>``) per round; the first value is the baseline. Prints the table and writes ``results/<args.name>.json``; returns its dict."""
    data = start(args)
    runs: dict[str, list[dict]] = {v: [] for v in values}
    with tempfile.TemporaryDirectory(prefix=field) as tmp:
        for r in range(args.repeats):
            for v in values:
                print(f"[bench] round {r + 1}/{args.repeats}: {field}={v}", flush=True)
                extra = {**(fixed or {}), field: v}
                runs[v].append(run_one(data, "ddp", 1, args, Path(tmp) / f"{v}-{r}", extra))

    def med(v, key):
        return statistics.median(x for run in runs[v] for x in run[key])

    base = values[0]
    # same data, seed and step order in every run: compare the loss of each step with the baseline's
    loss_gap = max(
        abs(a - b) / abs(b)
        for v in values[1:]
        for ra, rb in zip(runs[v], runs[base])
        for a, b in zip(ra["loss"], rb["loss"])
    )
    speedup = {v: med(base, "step_s") / med(v, "step_s") for v in values}
    rows = [[v, f"{med(v, 'step_s'):.3f}", f"{med(v, 'tokens_per_s'):.0f}", f"{speedup[v]:.2f}x"] for v in values]
    device = "GPU" if args.use_gpu else f"CPU ({os.cpu_count()} cores)"
    table = print_table(
        f"{field} on {device}{''.join(f', {k}={x}' for k, x in (fixed or {}).items())}: p={args.p}, global batch "
        f"{args.global_batch}, median over steps {args.warmup + 1}..{args.steps} x {args.repeats} runs; largest "
        f"per-step loss difference vs {base}: {loss_gap:.2%}",
        [field, "step s", "tokens/s", f"speed vs {base}"],
        rows,
    )
    result = {
        "config": {**vars(args), "field": field, "values": list(values), "fixed": fixed or {}},
        "speedup": speedup,
        "max_rel_loss_diff": loss_gap,
        "median": {v: {k: med(v, k) for k in ("step_s", "tokens_per_s")} for v in values},
        "runs": runs,
        "table": table,
    }
    write_json(args.name, result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    run_args(ap, "train_dtype", steps=12)
    args = ap.parse_args()
    compare_variants(args, "model_dtype", ("fp32", "bf16"))


if __name__ == "__main__":
    main()
