"""From an agent checkpoint to a chatting agent: generate -> train -> publish -> evaluate.

    python jobs/distill.py --config configs/demo.yaml [generate.max_samples=40 train.training.epochs=2 ...]
    python jobs/distill.py --gen-config configs/distillation/example_gen.yaml \
                           --train-config configs/distillation/cartridge_train_example.yaml
    ray job submit --working-dir . -- python jobs/distill.py --config configs/demo.yaml

Every stage resumes: finished teacher shards are kept, training continues from its last checkpoint.
Without a reachable Ray cluster (RAY_ADDRESS or `ray start`), a local one is started.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit --working-dir .` without install


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Distil an agent checkpoint's memory into a cartridge, end to end.")
    ap.add_argument("--config", help="one YAML with `generate:` and `train:` sections (see configs/demo.yaml)")
    ap.add_argument("--gen-config", help="the seed's generation YAML (with --train-config)")
    ap.add_argument("--train-config", help="the seed's training YAML (with --gen-config)")
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["generate", "train", "publish", "evaluate"],
        help="skip a stage (repeatable)",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value (e.g. train.training.epochs=2)")
    args = ap.parse_args(argv)
    if not args.config and not (args.gen_config and args.train_config):
        ap.error("give --config, or both --gen-config and --train-config")
    return args


def load(args):
    from ray_cartridges.config import DistillConfig, apply_overrides, load_yaml, validate_config

    if args.config:
        data, source = load_yaml(args.config), args.config
    else:
        data = {"generate": load_yaml(args.gen_config), "train": load_yaml(args.train_config)}
        source = f"{args.gen_config} + {args.train_config}"
    apply_overrides(data, args.overrides, source)
    cfg = validate_config(DistillConfig, data, source)
    for s in args.skip:
        setattr(cfg.stages, s, False)
    return cfg


def main(argv=None) -> int:
    from ray_cartridges.cli import run_entry, setup_env

    args = parse_args(argv)
    setup_env()

    def body() -> int:
        cfg = load(args)
        from ray_cartridges.raycluster import init_ray

        init_ray()  # joins RAY_ADDRESS / a `ray start` cluster when there is one, else starts a local one
        run_job(cfg)
        return 0

    return run_entry(body)


def _stage(report: dict, name: str, title: str, fn, summary) -> dict:
    print(f"\n{title}", flush=True)
    t = time.perf_counter()
    out = fn()
    print(summary(out))
    report["stages"][name] = {**out, "seconds": time.perf_counter() - t}
    return out


def run_job(cfg) -> None:
    """The configured stages in order; writes distill_report.json and prints the summary."""
    from ray_cartridges.fsutil import write_text_atomic

    t_start = time.perf_counter()
    report: dict = {"stages": {}}
    out_dir = Path(cfg.train.output.local_dir).resolve()
    if cfg.stages.train:  # a run that cannot train stops now, not after its generation
        from ray_cartridges.raycluster import check_fits
        from ray_cartridges.train.driver import training_resources

        check_fits(*training_resources(cfg.train))
    if cfg.stages.generate:
        from ray_cartridges.generate.pipeline import format_summary, run_generation

        _stage(report, "generate", "[1/4] teacher generation", lambda: run_generation(cfg.generate), format_summary)
    if cfg.stages.train:
        from ray_cartridges.train import run_training
        from ray_cartridges.train.driver import format_summary as train_summary

        _stage(report, "train", "[2/4] cartridge training", lambda: run_training(cfg.train), train_summary)
    evaluation = evaluate(cfg, out_dir, report) if cfg.stages.evaluate else None
    write_card(cfg, out_dir, evaluation)
    if cfg.stages.publish and cfg.train.output.upload_to_hf:
        publish(cfg, out_dir, report)
    report["seconds"] = time.perf_counter() - t_start
    write_text_atomic(out_dir / "distill_report.json", json.dumps(report, indent=2, default=str))
    print(final_summary(out_dir, evaluation, report, _sample_question(cfg.generate.checkpoint_dir)))


def _sample_question(checkpoint_dir: str) -> str:
    """A question of the memory for the closing summary's chat examples (a generic one if it cannot be read)."""
    from ray_cartridges.memory import read_memory, sample_question

    try:
        return sample_question(read_memory(checkpoint_dir))
    except (OSError, ValueError):
        return "What do you remember?"


def evaluate(cfg, out_dir: Path, report: dict) -> dict:
    from ray_cartridges.eval.evaluate import evaluate_cartridge
    from ray_cartridges.fsutil import write_text_atomic
    from ray_cartridges.memory import read_memory

    print("\n[3/4] evaluation (held-out fidelity, recall vs no memory and in-context memory)", flush=True)
    t = time.perf_counter()
    evaluation = evaluate_cartridge(
        out_dir,
        Path(cfg.generate.output_dir) / "dataset.jsonl",
        read_memory(cfg.generate.checkpoint_dir),
        eval_fraction=cfg.train.input_dataset.eval_fraction,
        split_seed=cfg.train.input_dataset.split_seed,
        max_questions=cfg.eval.max_questions,
        max_tokens=cfg.eval.max_tokens,
        engine=cfg.eval.engine,
        enforce_eager=cfg.eval.enforce_eager,
    )
    write_text_atomic(out_dir / "eval.json", json.dumps(evaluation, indent=2))
    report["stages"]["evaluate"] = {"seconds": time.perf_counter() - t, "file": str(out_dir / "eval.json")}
    return evaluation


def write_card(cfg, out_dir: Path, evaluation: dict | None) -> None:
    """The model card and the job's resolved config beside a trained cartridge."""
    from ray_cartridges.config import dump_config
    from ray_cartridges.fsutil import write_text_atomic
    from ray_cartridges.model_card import cartridge_card

    if not (out_dir / "cartridge.json").is_file():
        return
    repo = cfg.train.output.hf_repo_id if cfg.train.output.upload_to_hf else None
    card = cartridge_card(out_dir, repo_id=repo, memory_source=cfg.generate.checkpoint_dir, evaluation=evaluation)
    write_text_atomic(out_dir / "README.md", card)
    write_text_atomic(out_dir / "distill_job.yaml", dump_config(cfg))


def publish(cfg, out_dir: Path, report: dict) -> None:
    """Push the cartridge to the hub; a failed push leaves the local artifact and says so."""
    from ray_cartridges.hub import HubError, push_folder

    print("\n[4/4] publish", flush=True)
    try:
        url = push_folder(
            out_dir,
            cfg.train.output.hf_repo_id,
            repo_type="model",
            private=cfg.train.output.hf_private,
            allow_patterns=[
                "adapter_config.json",
                "adapter_model.safetensors",
                "cartridge.json",
                "cache-final.pt",
                "distillation_config.yaml",
                "README.md",
                "eval.json",
                "loss.png",
                "metrics.jsonl",
                "tokasaurus/*/*",
            ],
        )
        report["stages"]["publish"] = {"url": url}
    except HubError as err:
        print(f"warning: {err}", file=sys.stderr)
        report["stages"]["publish"] = {"error": str(err)}


def final_summary(out_dir: Path, evaluation: dict | None, report: dict, question: str = "What do you remember?") -> str:
    name = out_dir.name
    minutes = report["seconds"] / 60
    if not (out_dir / "cartridge.json").is_file():  # training skipped (and none from an earlier run)
        lines = [
            "",
            "=" * 72,
            f"Done in {minutes:.1f} min ({', '.join(report['stages']) or 'no stage'}); no cartridge yet.",
        ]
        if gen := report["stages"].get("generate"):
            lines.append(f"  teacher data: {gen.get('parquet_shards')} ({gen.get('rows')} conversations)")
        lines += ["  train on it: the same command with --skip generate", "=" * 72]
        return "\n".join(lines)
    lines = ["", "=" * 72, f"Done in {minutes:.1f} min. Cartridge: {out_dir}"]
    from ray_cartridges.report import evaluation_lines

    lines += [f"  {line}" for line in evaluation_lines(evaluation)]
    if "publish" in report["stages"]:
        lines.append(f"  hub: {report['stages']['publish']}")
    payload = json.dumps({"model": name, "messages": [{"role": "user", "content": question}]})
    q, model = json.dumps(question), json.dumps(name)  # JSON strings are Python literals, double-quoted
    client = (
        'from openai import OpenAI; c = OpenAI(base_url="http://localhost:8000/v1", api_key="none"); '
        f'print(c.chat.completions.create(model={model}, messages=[{{"role": "user", "content": {q}}}])'
        ".choices[0].message.content)"
    )
    lines += [
        "",
        "Chat with it:",
        f"  ray-cartridges chat --cartridge {out_dir}       # on vLLM (--engine transformers: the reference loop)",
        f"  ray-cartridges serve --cartridge {out_dir}      # OpenAI-compatible endpoint on :8000",
        "  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
        f"    -d {shlex.quote(payload)}",
        f"  python -c {shlex.quote(client)}",
        "=" * 72,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
