"""Training throughput and step-time breakdown for 1 vs N workers, DDP vs DeepSpeed ZeRO-2, on Ray Train.

    python benchmarks/train_scaling.py                              # this machine (CPU, gloo)
    python benchmarks/train_scaling.py --use-gpu --workers 1,2,4,8  # a GPU node or cluster (nccl)

Every configuration runs the real training job (``run_training``: Ray Train TorchTrainer, the project's loop)
with ``training.profile=true``, which times each step's phases on every step:
data (collate + copy to device), forward (+ loss), backward (without the gradient reduce), optimizer
(clip + AdamW step; under ZeRO it includes the parameter all-gather), communication (gradient all-reduce /
reduce-scatter, and the loss all-reduce). Figures are medians over the steps after ``--warmup``, and over
``--repeats`` runs interleaved across configurations. The global batch is the same for every configuration,
so a worker count that scales perfectly shows tokens/s growing with the workers.

On a 2-core CPU machine, two workers share the same two cores that one worker uses alone (one thread each
instead of two), so no speed-up is possible here: the run shows the overhead of the data-parallel machinery.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import bench_dataset, print_table, write_json  # noqa: E402

PHASES = ("data", "forward", "backward", "optimizer", "comm")


def run_one(data: Path, backend: str, workers: int, args, out: Path, extra: dict | None = None) -> dict:
    """One real training run; ``extra``: more TrainConfig keys (``attn_implementation``, ``training.lr``)."""
    import json

    from ray_cartridges.config import TrainConfig, validate_config
    from ray_cartridges.train import run_training

    training = {
        "global_batch_size": args.global_batch,
        "max_steps": args.steps,
        "lr": 1e-2,
        "profile": True,
        "resume": False,
        "keep_best": False,
        "backend": "deepspeed" if backend.startswith("zero") else "ddp",
    }
    if backend.startswith("zero"):
        training["zero_stage"] = int(backend[4:])
    extra = dict(extra or {})
    training.update({k.split(".", 1)[1]: extra.pop(k) for k in list(extra) if k.startswith("training.")})
    cfg = validate_config(
        TrainConfig,
        {
            "input_dataset": {"local_path": str(data), "eval_fraction": 0.0},
            "output": {"local_dir": str(out)},
            "model_dtype": getattr(args, "dtype", "fp32"),
            "kv_cache": {"method": "random", "num_tokens": args.p},
            "training": training,
            "scaling": {"num_workers": workers, "use_gpu": args.use_gpu},
            **extra,
        },
    )
    run_training(cfg)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "train/loss" in m][args.warmup :]
    return {
        "loss": [m["train/loss"] for m in steps],
        "tokens_per_s": [m["train/tokens_per_s"] for m in steps],
        "step_s": [m["train/step_time_s"] for m in steps],
        **{p: [m[f"time/{p}_s"] for m in steps] for p in PHASES},
    }


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to the driver"


def run_args(ap: argparse.ArgumentParser, name: str, steps: int) -> None:
    """The options every training benchmark that goes through ``run_one`` takes."""
    ap.add_argument("--data", default=None, help="flat top-k parquet dir (default: the demo's, else made here)")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--p", type=int, default=128)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--name", default=name, help="results file: benchmarks/results/<name>.json")


def start(args) -> Path:
    """The benchmark's training data, with Ray up."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    data = bench_dataset(args.data)
    if not ray.is_initialized():
        ray.init(log_to_driver=False, include_dashboard=False)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    run_args(ap, "train_scaling", steps=10)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--backends", default="ddp,zero2", help="comma-separated: ddp, zero1, zero2, zero3")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    data = start(args)
    workers = [int(w) for w in args.workers.split(",")]
    backends = args.backends.split(",")
    configs = [(b, w) for b in backends for w in workers]
    runs: dict = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="scaling") as tmp:
        for r in range(args.repeats):  # interleaved: every configuration once per round
            for b, w in configs:
                print(f"[bench] round {r + 1}/{args.repeats}: {b} x {w} worker(s)", flush=True)
                runs[(b, w)].append(run_one(data, b, w, args, Path(tmp) / f"{b}-{w}-{r}"))

    def med(c, key):
        return statistics.median(x for run in runs[c] for x in run[key])

    rows, results = [], {}
    for b, w in configs:
        base = (b, workers[0])
        speed = med((b, w), "tokens_per_s") / med(base, "tokens_per_s")
        ddp_same = ("ddp", w)
        vs_ddp = med((b, w), "tokens_per_s") / med(ddp_same, "tokens_per_s") if ddp_same in runs else float("nan")
        rows.append(
            [
                b,
                w,
                f"{med((b, w), 'tokens_per_s'):.0f}",
                f"{speed:.2f}x",
                f"{vs_ddp:.2f}x",
                f"{med((b, w), 'step_s'):.3f}",
            ]
            + [f"{med((b, w), p):.3f}" for p in PHASES]
        )
        results[f"{b}x{w}"] = {
            "backend": b,
            "workers": w,
            "median": {k: med((b, w), k) for k in ("tokens_per_s", "step_s", *PHASES)},
            "speedup_vs_fewest_workers": speed,
            "vs_ddp_same_workers": vs_ddp,
            "runs": runs[(b, w)],
        }
    device = f"GPU ({_gpu_name()})" if args.use_gpu else f"CPU ({os.cpu_count()} cores)"
    table = print_table(
        f"train scaling on {device}: p={args.p}, {args.dtype}, global batch {args.global_batch}, "
        f"median over steps {args.warmup + 1}..{args.steps} x {args.repeats} runs (seconds per step)",
        ["backend", "workers", "tokens/s", f"vs {workers[0]}w", "vs ddp", "step", *PHASES],
        rows,
    )
    write_json(args.name, {"config": vars(args), "results": results, "table": table})


if __name__ == "__main__":
    main()
