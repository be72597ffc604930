"""Teacher generation time against vLLM's KV block size (the unit its prefix cache reuses), on a config's prompts.

    python benchmarks/generation_block_size.py                      # the demo's prompts: 128 (baseline), 32
    python benchmarks/generation_block_size.py --sizes 128,32,64

Each round writes the same prompts (the config's replay, self-study, quiz and unrelated prompts, in shards of
``generate.shard_size``) with a fresh teacher actor per block size, each in its own process, sizes interleaved;
the engine's start is timed apart. Reports the median seconds over rounds, the speed against the first size, and
how many answers are token for token the same as the first size's (greedy answers: prefix reuse changes only
rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import median, print_table, write_json  # noqa: E402
from generation_shard_size import _prompts, sweep_args  # noqa: E402


def one_run(config: str, block_size: int, count: int) -> dict:
    """Write ``count`` prompts with blocks of ``block_size``: engine start and shard seconds, and the answers."""
    from ray_cartridges.generate.actor import TeacherActor

    cfg, _, prompts = _prompts(config, 0, count)
    cfg = cfg.model_copy(update={"block_size": block_size})
    actor = TeacherActor(cfg.model_dump(mode="json"), tempfile.mkdtemp(prefix="shards"), {}, {})
    t0 = time.perf_counter()
    actor.engine  # noqa: B018 (started here, outside the shards' time)
    actor.scorer()
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), cfg.shard_size):
        chunk = prompts[i : i + cfg.shard_size]
        actor.write_shard(f"s{i:05d}", chunk, [f"k{i + j}" for j in range(len(chunk))], {})
    seconds = time.perf_counter() - t0
    answers = {}
    for path in sorted(actor.shards_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            answers[rec["metadata"]["prompt_id"]] = rec["messages"][-1]["token_ids"]
    return {"start_s": start, "seconds": seconds, "answers": answers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sweep_args(ap, "KV block", "128,32", 192, "generation_block_size")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one run in this process, JSON out
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_run(args.config, args.one, args.prompts)), flush=True)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[int, list[dict]] = {s: [] for s in sizes}
    for r in range(args.repeats):
        for size in sizes:
            cmd = [
                sys.executable,
                __file__,
                "--config",
                args.config,
                "--prompts",
                str(args.prompts),
                "--one",
                str(size),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[size].append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
            print(f"[bench] round {r + 1}: block {size}: {runs[size][-1]['seconds']:.1f} s", flush=True)
    base_answers = runs[sizes[0]][0]["answers"]
    base = median([x["seconds"] for x in runs[sizes[0]]])
    rows, summary = [], {}
    for s in sizes:
        secs = median([x["seconds"] for x in runs[s]])
        same = sum(base_answers.get(k) == v for k, v in runs[s][0]["answers"].items()) / max(1, len(base_answers))
        summary[s] = {"seconds": secs, "start_s": median([x["start_s"] for x in runs[s]]), "speedup": base / secs,
                      "same_answers": same}  # fmt: skip
        rows.append([s, f"{secs:.1f}", f"{summary[s]['start_s']:.1f}", f"{base / secs:.2f}x", f"{same:.2f}"])
    table = print_table(
        f"teacher generation, {args.prompts} prompts of {args.config}, median of {args.repeats} rounds",
        ["block size", "seconds", "engine start s", f"speed vs {sizes[0]}", f"answers same as {sizes[0]}'s"],
        rows,
    )
    write_json(
        args.name,
        {
            "config": vars(args),
            "seconds": {str(s): [x["seconds"] for x in runs[s]] for s in sizes},
            "summary": {str(s): v for s, v in summary.items()},
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
