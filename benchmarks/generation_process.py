"""A CPU teacher whose vLLM engine runs in its Ray actor's process against vLLM's own engine-core and worker
processes (the baseline), end to end through `ray-cartridges generate` on a config's generate section.

    python benchmarks/generation_process.py                  # the demo's settings, capped at 40 conversations
    python benchmarks/generation_process.py --max-samples 0  # the whole demo generation

Each round runs both layouts, each a fresh job in its own process (its own local Ray cluster), layouts
interleaved; the baseline sets VLLM_ENABLE_V1_MULTIPROCESSING=1 in the driver's environment, which the teacher
actor's environment takes over. Reports the median wall seconds of a job, the speed against the baseline, and
whether both layouts wrote the same answers token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, os.path.dirname(__file__))
from common import median, print_table, write_json  # noqa: E402

LAYOUTS = {"vLLM processes (baseline)": "1", "in the actor's process": "0"}


def run_job(section: dict, out: Path, multiprocessing: str) -> tuple[float, dict]:
    """One generation job: wall seconds and its answers by prompt id."""
    cfg_path = out.with_suffix(".yaml")
    cfg_path.write_text(yaml.safe_dump({**section, "output_dir": str(out)}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": multiprocessing}
    cmd = [sys.executable, "-m", "ray_cartridges.cli", "generate", "--config", str(cfg_path)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    records = [json.loads(x) for x in (out / "dataset.jsonl").read_text().splitlines()]
    return seconds, {r["metadata"]["prompt_id"]: r["messages"][-1]["token_ids"] for r in records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml", help="job config whose generate section is used")
    ap.add_argument("--max-samples", type=int, default=40, help="cap on conversations (0: the config's own)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default="generation_process", help="results file: benchmarks/results/<name>.json")
    args = ap.parse_args()
    section = yaml.safe_load(open(args.config))["generate"]
    if args.max_samples:
        section["max_samples"] = args.max_samples
    root = Path(tempfile.mkdtemp(prefix="gen-process-"))
    runs: dict[str, list[tuple[float, dict]]] = {name: [] for name in LAYOUTS}
    for r in range(args.repeats):
        for i, (name, mp) in enumerate(LAYOUTS.items()):
            runs[name].append(run_job(section, root / f"r{r}-{i}", mp))
            print(f"[bench] round {r + 1}: {name}: {runs[name][-1][0]:.1f} s", flush=True)
    base_name = next(iter(LAYOUTS))
    base = median([s for s, _ in runs[base_name]])
    base_answers = runs[base_name][0][1]
    rows, summary = [], {}
    for name in LAYOUTS:
        secs = median([s for s, _ in runs[name]])
        same = all(a == base_answers for _, a in runs[name])
        summary[name] = {"seconds": secs, "speedup": base / secs, "same_answers": same}
        rows.append([name, f"{secs:.1f}", f"{base / secs:.2f}x", "yes" if same else "no"])
    n = len(base_answers)
    table = print_table(
        f"CPU teacher job, {n} conversations of {args.config}, median of {args.repeats} rounds",
        ["vLLM engine", "job seconds", "speed vs baseline", "same answers"],
        rows,
    )
    write_json(
        args.name,
        {"config": vars(args), "seconds": {k: [s for s, _ in v] for k, v in runs.items()}, "summary": summary,
         "table": table},
    )  # fmt: skip


if __name__ == "__main__":
    main()
