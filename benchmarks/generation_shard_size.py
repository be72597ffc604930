"""Teacher generation time per prompt against the shard size (prompts per engine call), on a config's prompts.

    python benchmarks/generation_shard_size.py                       # the demo's prompts (configs/demo.yaml)
    python benchmarks/generation_shard_size.py --sizes 16,64,128 --prompts 256

One teacher actor, built in this process as Ray Data builds it, writes the same prompts (a slice of the
config's replay, self-study, quiz and unrelated prompts) in shards of each size, rounds interleaved after a
warm-up shard; vLLM's prefix cache holds the same memory prefixes for every size. Reports the median seconds
per round and the speed against the smallest size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import median, print_table, write_json  # noqa: E402


def _prompts(config: str, start: int, count: int):
    import yaml

    from ray_cartridges.config import DistillConfig, validate_config
    from ray_cartridges.generate.pipeline import build_prompts, for_memory, read_memory
    from ray_cartridges.generate.teacher import fit_engine_context, resolved_config

    cfg = resolved_config(validate_config(DistillConfig, yaml.safe_load(open(config))).generate)
    memory = read_memory(cfg.checkpoint_dir)
    cfg = for_memory(cfg, memory)
    prompts = build_prompts(memory, cfg)
    cfg = fit_engine_context(cfg, prompts, memory.source)
    return cfg, prompts[:16], prompts[start : start + count]


def sweep_args(ap: argparse.ArgumentParser, what: str, sizes: str, prompts: int, name: str) -> None:
    """The arguments of a sweep over one size of the teacher's generation, on a config's prompts."""
    ap.add_argument("--config", default="configs/demo.yaml", help="job config whose generate section is used")
    ap.add_argument("--sizes", default=sizes, help=f"comma-separated {what} sizes; the first is the baseline")
    ap.add_argument("--prompts", type=int, default=prompts, help="prompts written per size per round")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default=name, help="results file: benchmarks/results/<name>.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sweep_args(ap, "shard", "16,32,64", 128, "generation_shard_size")
    args = ap.parse_args()
    from ray_cartridges.generate.actor import TeacherActor

    sizes = [int(s) for s in args.sizes.split(",")]
    cfg, warm, prompts = _prompts(args.config, 16, args.prompts)
    actor = TeacherActor(cfg.model_dump(mode="json"), tempfile.mkdtemp(prefix="shards"), {}, {})
    actor.write_shard("warm", warm, [f"w{i}" for i in range(len(warm))], {})  # engine start and first calls
    seconds: dict[int, list[float]] = {s: [] for s in sizes}
    for r in range(args.repeats):
        for size in sizes:
            t0 = time.perf_counter()
            for i in range(0, len(prompts), size):
                chunk = prompts[i : i + size]
                actor.write_shard(f"r{r}-s{size}-{i}", chunk, [f"k{i + j}" for j in range(len(chunk))], {})
            seconds[size].append(time.perf_counter() - t0)
            print(f"[bench] round {r + 1}: shard size {size}: {seconds[size][-1]:.1f} s", flush=True)
    base = median(seconds[sizes[0]])
    rows = [[s, f"{median(seconds[s]):.1f}", f"{base / median(seconds[s]):.2f}x"] for s in sizes]
    table = print_table(
        f"teacher generation, {len(prompts)} prompts of {args.config}, {cfg.dtype}, median of {args.repeats} rounds",
        ["shard size", "seconds", f"speed vs {sizes[0]}"],
        rows,
    )
    write_json(
        args.name,
        {
            "config": vars(args),
            "seconds": {str(s): v for s, v in seconds.items()},
            "speedup": {str(s): base / median(seconds[s]) for s in sizes},
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
