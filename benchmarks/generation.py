"""Teacher generation speed: our Ray Data + vLLM pipeline vs a naive transformers loop and vs plain vLLM.

    python benchmarks/generation.py [--memory-tokens 2000] [--prompts 32] [--max-tokens 64] [--dtype auto]

One run, same prompts (replay questions over a ~2,000-token memory), same model and machine:
  (a) ours: `run_generation` (Ray Data, TeacherActor owning a vllm.LLM, prefix caching, batched shards)
      vs a naive per-request transformers `generate` loop that re-reads the memory for every prompt
      (measured on --naive-prompts prompts; its rate does not depend on how many). Target >= 10x.
  (b) ours vs calling `vllm.LLM.generate` directly on the same prompts in this process. Target >= 0.8x.
Rates are answer tokens per second of generation; start-up (Ray, engine load) is reported apart. (a) and (b)
run in --repeats interleaved rounds, each with fresh engines on both sides; rates are medians over the rounds,
the ratio to plain vLLM the median of the rounds' paired ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def make_checkpoint(root: Path, memory_tokens: int, tokenizer) -> Path:
    """A HistoryAgent checkpoint whose rendered memory has about ``memory_tokens`` tokens."""
    src = REPO / "examples" / "agent_checkpoint" / "checkpoints" / "ep_000030"
    lines = (src / "memory_30.jsonl").read_text().splitlines()
    ep = root / "checkpoints" / "ep_000001"
    ep.mkdir(parents=True)
    shutil.copy(src / "agent.json", ep / "agent.json")
    mem_file = ep / json.loads((src / "agent.json").read_text())["memory_snapshot_path"]
    shutil.copy(src / "runtime.json", ep / "runtime.json")
    out, rnd = [], 0
    while True:
        for line in lines:
            rec = json.loads(line)
            if rnd:
                rec["content"] = f"(round {rnd}) {rec['content']}"
            out.append(json.dumps(rec))
        rnd += 1
        from ray_cartridges.memory import read_memory

        mem_file.write_text("\n".join(out) + "\n")
        n = len(tokenizer(read_memory(root).render()).input_ids)
        if n >= memory_tokens:
            break
    # trim whole experiences until just above the target
    while True:
        trial = out[:-3]
        mem_file.write_text("\n".join(trial) + "\n")
        if len(tokenizer(read_memory(root).render()).input_ids) < memory_tokens:
            mem_file.write_text("\n".join(out) + "\n")
            break
        out = trial
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 where this CPU computes it natively",
    )
    ap.add_argument("--memory-tokens", type=int, default=2000)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--naive-prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=None, help="prompts per engine call (default: generate's)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of ours and plain vLLM; medians")
    args = ap.parse_args()

    from ray_cartridges.cli import setup_env

    setup_env()
    import torch

    from ray_cartridges.config import GenerateConfig, validate_config
    from ray_cartridges.engine_env import set_engine_env
    from ray_cartridges.generate.pipeline import run_generation
    from ray_cartridges.generate.strategies import build_prompts
    from ray_cartridges.generate.teacher import chat_ids
    from ray_cartridges.memory import read_memory
    from ray_cartridges.models import load_model, load_tokenizer, resolve_dtype, resolve_model

    args.dtype = resolve_dtype(args.dtype)

    tok = load_tokenizer(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    ckpt = make_checkpoint(work / "agent", args.memory_tokens, tok)
    memory = read_memory(ckpt)
    mem_tokens = len(tok(memory.render()).input_ids)
    cfg = validate_config(
        GenerateConfig,
        {
            "checkpoint_dir": str(ckpt),
            "output_dir": str(work / "out"),
            "model_name": args.model,
            "dtype": args.dtype,
            "engine": "vllm",
            "temperature": 0.0,
            "max_tokens": args.max_tokens,
            "top_logprobs": 20,
            "max_samples": args.prompts,
            **({"shard_size": args.shard_size} if args.shard_size else {}),
            "self_study": {"enabled": False},
            "quiz": {"enabled": False},  # replay questions only: the baseline answers the same prompts as given
            "max_model_len": 4096,
        },
    )
    prompts = build_prompts(memory, cfg)
    ids = [chat_ids(tok, p["context"], p["user"]) for p in prompts]

    # (a) ours through Ray Data and (b) plain vLLM in this process, interleaved rounds, fresh engines in both
    # every round (and a fresh output dir for ours: nothing resumed or reused)
    import gc

    import ray

    from ray_cartridges.contracts import SamplingParams
    from ray_cartridges.generate.engines import VLLMEngine

    sampling = SamplingParams(max_tokens=args.max_tokens, top_logprobs=20)
    rounds = []
    for r in range(args.repeats):
        print(f"[bench] round {r + 1}/{args.repeats}: ours (Ray Data + vLLM actor)", flush=True)
        t0 = time.perf_counter()
        summary = run_generation(cfg.model_copy(update={"output_dir": str(work / f"out-{r}")}), progress=False)
        ours_wall = time.perf_counter() - t0
        ray.shutdown()
        set_engine_env(cpu=not torch.cuda.is_available())
        print(f"[bench] round {r + 1}/{args.repeats}: plain vllm.LLM.generate", flush=True)
        t0 = time.perf_counter()
        engine = VLLMEngine(resolve_model(args.model, args.dtype), dtype=args.dtype, max_model_len=4096)
        vllm_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = engine.complete(ids, sampling, [0] * len(ids))
        vllm_s = time.perf_counter() - t0
        del engine
        gc.collect()
        rounds.append(
            {
                "ours_tokens": summary["answer_tokens_now"],
                "ours_engine_s": summary["engine_seconds_now"],
                "ours_wall_s": ours_wall,
                "vllm_tokens": sum(len(o[0]) for o in outs),
                "vllm_s": vllm_s,
                "vllm_start_s": vllm_start,
            }
        )
    for x in rounds:
        x["ours_tokens_per_s"] = x["ours_tokens"] / x["ours_engine_s"]
        x["vllm_tokens_per_s"] = x["vllm_tokens"] / x["vllm_s"]
        x["ratio_vs_vllm"] = x["ours_tokens_per_s"] / x["vllm_tokens_per_s"]

    def med(key):
        return statistics.median(x[key] for x in rounds)

    ours_tokens, ours_engine_s, ours_wall = med("ours_tokens"), med("ours_engine_s"), med("ours_wall_s")
    vllm_tokens, vllm_s, vllm_start = med("vllm_tokens"), med("vllm_s"), med("vllm_start_s")

    # (c) naive transformers loop: generate() per prompt, memory re-read every time
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(args.model, args.dtype)
    naive_tokens, t0 = 0, time.perf_counter()
    for p in ids[: args.naive_prompts]:
        out = model.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=args.max_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        naive_tokens += out.sequences.shape[1] - len(p)
    naive_s = time.perf_counter() - t0

    r_ours = med("ours_tokens_per_s")
    r_ours_e2e = statistics.median(x["ours_tokens"] / x["ours_wall_s"] for x in rounds)
    r_vllm = med("vllm_tokens_per_s")
    r_naive = naive_tokens / naive_s
    rows = [
        [
            "ours: Ray Data + vLLM actor (generation)",
            f"{ours_tokens}",
            f"{ours_engine_s:.1f}",
            f"{r_ours:.1f}",
            "1.00x",
        ],
        [
            "ours: end to end incl. Ray + engine start",
            f"{ours_tokens}",
            f"{ours_wall:.1f}",
            f"{r_ours_e2e:.1f}",
            f"{r_ours_e2e / r_ours:.2f}x",
        ],
        [
            "plain vllm.LLM.generate (same prompts)",
            f"{vllm_tokens}",
            f"{vllm_s:.1f}",
            f"{r_vllm:.1f}",
            f"{r_vllm / r_ours:.2f}x",
        ],
        [
            f"naive transformers loop ({args.naive_prompts} prompts)",
            f"{naive_tokens}",
            f"{naive_s:.1f}",
            f"{r_naive:.1f}",
            f"{r_naive / r_ours:.2f}x",
        ],
    ]
    paired = ", ".join(f"{x['ratio_vs_vllm']:.2f}" for x in rounds)
    print_table(
        f"generation: {args.model} {args.dtype}, memory {mem_tokens} tokens, {len(ids)} prompts, {args.max_tokens} "
        f"max answer tokens; ours and plain vLLM: medians over {args.repeats} interleaved rounds "
        f"(paired ratios: {paired})",
        ["approach", "answer tokens", "seconds", "tokens/s", "vs ours"],
        rows,
    )
    a = r_ours / r_naive
    b = med("ratio_vs_vllm")  # the median of the rounds' paired ratios
    print(f"(a) ours / naive transformers: {a:.1f}x (target >= 10x) -> {'MET' if a >= 10 else 'NOT MET'}")
    print(f"(b) ours / plain vLLM: {b:.2f}x (target >= 0.8x) -> {'MET' if b >= 0.8 else 'NOT MET'}")
    print(
        f"    vLLM engine start {vllm_start:.0f} s; ours end to end {ours_wall:.0f} s (Ray start, actor and engine start included)"
    )
    write_json(
        "generation",
        {
            "config": {**vars(args), "shard_size": cfg.shard_size},
            "memory_tokens": mem_tokens,
            "ours": {
                "tokens": ours_tokens,
                "engine_s": ours_engine_s,
                "wall_s": ours_wall,
                "tokens_per_s": r_ours,
                "e2e_tokens_per_s": r_ours_e2e,
            },
            "plain_vllm": {"tokens": vllm_tokens, "s": vllm_s, "tokens_per_s": r_vllm, "engine_start_s": vllm_start},
            "rounds": rounds,
            "naive_transformers": {
                "tokens": naive_tokens,
                "s": naive_s,
                "tokens_per_s": r_naive,
                "prompts": args.naive_prompts,
            },
            "ratio_vs_naive": a,
            "ratio_vs_vllm": b,
            "targets": {"vs_naive": 10, "vs_vllm": 0.8},
        },
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
