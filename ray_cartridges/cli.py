"""``ray-cartridges``: the command-line entry point.

ray-cartridges prepare-model                      # convert the bundled model once (make setup does it)
ray-cartridges convert --input X.jsonl --output Y.parquet --model M --min-prob-mass 0.99 --top-k 20
ray-cartridges train --config configs/distillation/cpu_demo_train.yaml [key.sub=value ...]
ray-cartridges show-config train|generate         # every config field with its type, default and help
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable


def setup_env() -> None:
    """Process-wide settings for entry points only (never at import time)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's token auth is left as Ray configures it (see raycluster.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _cmd_prepare_model(args) -> int:
    from .models import ensure_bundled_model

    for dtype, path in ensure_bundled_model(args.name).items():
        print(f"{args.name} ({dtype}): {path}")
    return 0


def _cmd_convert(args) -> int:
    from .convert import convert_jsonl, convert_their_parquet
    from .models import load_tokenizer

    # a .parquet input is the Cartridges trainer's converted file; anything else JSONL records
    convert = convert_their_parquet if str(args.input).endswith(".parquet") else convert_jsonl
    stats = convert(
        args.input,
        args.output,
        load_tokenizer(args.model),
        min_prob_mass=args.min_prob_mass,
        top_k=args.top_k,
        student_system_prompt=args.student_system_prompt,
        strict=args.strict,
    )
    print(f"wrote {args.output}: {stats.summary()}")
    for e in stats.errors[:10]:
        print(f"  rejected: {e}")
    return 0


def _cmd_train(args) -> int:
    from .config import TrainConfig, load_config
    from .train.driver import format_summary, run_training

    cfg = load_config(TrainConfig, args.config, args.overrides)
    summary = run_training(cfg, max_failures=args.max_failures)
    print(format_summary(summary))
    return 0


def _cmd_generate(args) -> int:
    from .config import GenerateConfig, load_config
    from .generate.pipeline import format_summary, run_generation

    cfg = load_config(GenerateConfig, args.config, args.overrides)
    print(format_summary(run_generation(cfg)))
    return 0


def _serve_config(args):
    from pathlib import Path

    from .config import load_config
    from .config.serve import ServeConfig

    overrides = list(args.overrides)
    if args.cartridge:
        name = args.name or Path(args.cartridge.rstrip("/")).name
        from .hub import cartridge_source

        local = cartridge_source(args.cartridge) == "local"
        ref = args.cartridge if local else f"hf://{args.cartridge}"
        overrides.append(f"cartridges={{{name}: {ref}}}")
    if args.port:
        overrides.append(f"port={args.port}")
    if args.config is None and not args.cartridge:
        raise ValueError("give --config or --cartridge")
    return load_config(ServeConfig, args.config, overrides)


def _cmd_serve(args) -> int:
    import time

    from ray import serve

    from .raycluster import check_fits, init_ray
    from .serve.app import deployment, replica_resources
    from .serve.engine import preflight

    cfg = _serve_config(args)
    preflight(cfg)  # a cartridge that cannot be served is named here, before Ray and vLLM start
    init_ray()
    check_fits(*replica_resources(cfg))  # `serve.run` would wait forever for replicas that cannot be placed
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(deployment(cfg), name="ray_cartridges", route_prefix="/")
    print(f"serving {list(cfg.cartridges)} on http://{cfg.host}:{cfg.port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM through Ray's handler
        serve.shutdown()
    return 0


# a terminal chat shows the conversation, not the engine's start-up log (VLLM_LOGGING_LEVEL=INFO shows it);
# set where the user has not, in the environment so that vLLM's engine processes get it too
CHAT_QUIET_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TORCH_CPP_LOG_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore"}


def _cmd_chat(args) -> int:
    for var, quiet in CHAT_QUIET_ENV.items():
        os.environ.setdefault(var, quiet)
    logging.getLogger().setLevel(logging.ERROR)

    from .agent import KVArtifact, KVCacheMemoryConfig, KVMemoryAgent, KVMemoryAgentConfig
    from .hub import cartridge_source

    src = cartridge_source(args.cartridge)
    agent = KVMemoryAgent(
        KVMemoryAgentConfig(
            memory_config=KVCacheMemoryConfig(artifact=KVArtifact(args.cartridge, source=src)),
            system_prompt=args.system_prompt,
            engine=args.engine,
        )
    )
    print(f"cartridge {args.cartridge} ({agent.num_tokens} tokens) on {agent.meta.model_name}; empty line quits")
    history: list[dict] = []
    try:
        while line := input("you> ").strip():
            history.append({"role": "user", "content": line})
            reply = agent.chat(history, temperature=args.temperature, max_tokens=args.max_tokens)
            history.append({"role": "assistant", "content": reply})
            print(f"agent> {reply}")
    except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C ends the chat like an empty line
        print()
    finally:
        if agent.engine is not None:
            agent.engine.shutdown()
    return 0


def _cmd_import_cartridge(args) -> int:
    from .interop import import_cartridge

    out = import_cartridge(args.pt_file, args.model, args.out)
    print(f"wrote {out} (chat: ray-cartridges chat --cartridge {out})")
    return 0


def _cmd_export_cartridge(args) -> int:
    from pathlib import Path

    from .interop import export_cartridges_pt, export_tokasaurus

    if args.format == "tokasaurus":
        name = args.id or Path(args.cartridge.rstrip("/")).name
        out = export_tokasaurus(args.cartridge, args.out, name, args.dtype or "bf16")
    else:
        out = export_cartridges_pt(args.cartridge, args.out, args.dtype or "fp32")
    print(f"wrote {out}")
    return 0


def eval_split(cartridge: str, eval_fraction: float | None, split_seed: int | None) -> tuple[float, int]:
    """The held-out split to evaluate on: the one the cartridge's training left out (its
    ``distillation_config.yaml``) unless given; a given one that differs is warned about, since its held-out
    rows then include rows the cartridge was trained on."""
    from pathlib import Path

    from .config.base import load_yaml
    from .config.train import InputDatasetConfig

    fields = InputDatasetConfig.model_fields
    path = Path(cartridge) / "distillation_config.yaml"
    ds = (load_yaml(path).get("input_dataset") or {}) if path.is_file() else {}  # not trained here: the defaults
    trained = (
        ds.get("eval_fraction", fields["eval_fraction"].default),
        ds.get("split_seed", fields["split_seed"].default),
    )
    chosen = (trained[0] if eval_fraction is None else eval_fraction, trained[1] if split_seed is None else split_seed)
    if path.is_file() and chosen != trained:
        print(
            f"warning: evaluating on eval_fraction={chosen[0]}, split_seed={chosen[1]}, but {path} trained with "
            f"eval_fraction={trained[0]}, split_seed={trained[1]}: the held-out figures then include rows it "
            "was trained on",
            file=sys.stderr,
        )
    return chosen


def _cmd_eval(args) -> int:
    import json
    from pathlib import Path

    from .eval.evaluate import evaluate_cartridge
    from .fsutil import write_text_atomic
    from .memory import read_memory
    from .report import evaluation_lines

    eval_fraction, split_seed = eval_split(args.cartridge, args.eval_fraction, args.split_seed)
    ev = evaluate_cartridge(
        args.cartridge,
        args.dataset,
        read_memory(args.checkpoint),
        eval_fraction=eval_fraction,
        split_seed=split_seed,
        max_questions=args.max_questions,
        max_tokens=args.max_tokens,
        engine=args.engine,
        enforce_eager=args.enforce_eager,
    )
    out = Path(args.output or Path(args.cartridge) / "eval.json")
    write_text_atomic(out, json.dumps(ev, indent=2))
    print("\n".join(evaluation_lines(ev)))
    print(f"wrote {out}")
    return 0


def _cmd_show_config(args) -> int:
    from .config.reference import config_reference, full_reference

    text = full_reference() if args.stage == "all" else config_reference(args.stage)
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray-cartridges", description="Distil an agent's memory into a cartridge on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_pipeline_commands(sub)
    _add_use_commands(sub)
    _add_file_commands(sub)
    return p


def _add_pipeline_commands(sub) -> None:
    """prepare-model, convert, generate, train."""
    s = sub.add_parser("prepare-model", help="Convert the bundled GGUF model into safetensors directories (once).")
    s.add_argument("--name", default="smollm2-135m-instruct", help="bundled model short name")
    s.set_defaults(func=_cmd_prepare_model)

    s = sub.add_parser("convert", help="Seed JSONL with OpenAI-style logprobs -> flat top-k parquet.")
    s.add_argument("--input", required=True, help="seed-format JSONL file")
    s.add_argument("--output", required=True, help="parquet file to write (atomically)")
    s.add_argument("--model", required=True, help="model whose tokenizer and chat template to use")
    s.add_argument("--min-prob-mass", type=float, default=0.99, help="keep top tokens until this probability mass")
    s.add_argument("--top-k", type=int, default=20, help="keep at most this many tokens per position")
    s.add_argument("--student-system-prompt", default=None, help="system prompt of the student conversation")
    s.add_argument("--strict", action="store_true", help="fail on the first bad row instead of skipping it")
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser("generate", help="Teacher data: agent checkpoint -> Ray Data + vLLM actors -> top-k dataset.")
    s.add_argument("--config", required=True, help="generation YAML (see configs/distillation/)")
    s.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("train", help="Distil a cartridge with Ray Train from a flat top-k (or JSONL) dataset.")
    s.add_argument("--config", required=True, help="training YAML (see configs/distillation/)")
    s.add_argument(
        "--max-failures", type=int, default=None, help="worker failures to recover from (default: scaling.max_failures)"
    )
    s.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    s.set_defaults(func=_cmd_train)


def _add_use_commands(sub) -> None:
    """serve, chat, eval."""
    s = sub.add_parser("serve", help="Serve cartridges behind an OpenAI-compatible HTTP API (Ray Serve).")
    s.add_argument("--config", default=None, help="serve YAML (see configs/serve.yaml)")
    s.add_argument("--cartridge", default=None, help="serve this one cartridge (local dir or hub id)")
    s.add_argument("--name", default=None, help="model name of --cartridge (default: its directory name)")
    s.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    s.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("chat", help="Chat with a cartridge in the terminal.")
    s.add_argument("--cartridge", required=True, help="cartridge directory or hub model id")
    s.add_argument("--system-prompt", default=None, help="system prompt (default: the one it was trained with)")
    s.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    s.add_argument("--max-tokens", type=int, default=256, help="max answer tokens")
    s.add_argument(
        "--engine",
        choices=["vllm", "transformers"],
        default="vllm",
        help="vllm (cartridge read through its KV connector) or the transformers reference loop",
    )
    s.set_defaults(func=_cmd_chat)

    s = sub.add_parser("eval", help="Evaluate a cartridge: fidelity (KL to ICL), recall of memory facts, no harm.")
    s.add_argument("--cartridge", required=True, help="cartridge directory")
    s.add_argument("--dataset", required=True, help="teacher dataset.jsonl (its held-out split is used)")
    s.add_argument("--checkpoint", required=True, help="agent checkpoint (for the ICL baseline and the facts)")
    s.add_argument(
        "--eval-fraction",
        type=float,
        default=None,
        help="held-out share (default: the cartridge's training config's, so the split is the one it never saw)",
    )
    s.add_argument("--split-seed", type=int, default=None, help="split seed (default: as in the cartridge's training)")
    s.add_argument("--max-questions", type=int, default=30, help="memory facts asked")
    s.add_argument("--max-tokens", type=int, default=40, help="max answer tokens")
    s.add_argument("--output", default=None, help="JSON file to write (default: <cartridge>/eval.json)")
    s.add_argument(
        "--engine",
        choices=["vllm", "transformers"],
        default="vllm",
        help="what answers the recall questions (KL is always read by the transformers reference)",
    )
    s.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile: starts sooner")
    s.set_defaults(func=_cmd_eval)


def _add_file_commands(sub) -> None:
    """import-cartridge, export-cartridge, show-config."""
    s = sub.add_parser("import-cartridge", help="A Cartridges-trainer .pt -> a cartridge directory (PEFT adapter).")
    s.add_argument("pt_file", help="the .pt file (trainable_keys/values, frozen_* or fixed_*)")
    s.add_argument("--model", required=True, help="the model it was trained on (name, hub id or directory)")
    s.add_argument("--out", required=True, help="cartridge directory to write")
    s.set_defaults(func=_cmd_import_cartridge)

    s = sub.add_parser("export-cartridge", help="A cartridge directory -> a Cartridges .pt or a Tokasaurus layout.")
    s.add_argument("cartridge", help="cartridge directory")
    s.add_argument("--format", choices=["cartridges", "tokasaurus"], default="cartridges", help="what to write")
    s.add_argument("--out", required=True, help=".pt file (cartridges) or root directory (tokasaurus)")
    s.add_argument("--id", default=None, help="tokasaurus: the cartridge id (default: the directory's name)")
    s.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="tensor dtype (cartridges: fp32, tokasaurus: bf16)"
    )
    s.set_defaults(func=_cmd_export_cartridge)

    s = sub.add_parser("show-config", help="Print every config field with its type, default and description.")
    s.add_argument(
        "stage", choices=["train", "generate", "distill", "serve", "all"], help="which stage's config (all: every one)"
    )
    s.set_defaults(func=_cmd_show_config)


INTERRUPTED = "interrupted (finished shards and checkpoints are kept: the same command resumes)"


def user_errors() -> tuple[type[Exception], ...]:
    """What bad input raises: an entry point prints these as one line, not a traceback."""
    from .config import ConfigError
    from .convert import ConversionError
    from .flat_topk import FlatTopkError
    from .hub import HubError
    from .memory import CheckpointError
    from .train.loop import NonFiniteError

    return (
        ConfigError,
        ConversionError,
        FlatTopkError,
        CheckpointError,
        HubError,
        FileNotFoundError,
        ValueError,
        NonFiniteError,
    )


def run_entry(body: Callable[[], int]) -> int:
    """An entry point's exit status: ``body``'s, or 2 with one line on stderr for bad input, or 130 on Ctrl-C."""
    try:
        return body()
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_env()
    return run_entry(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
