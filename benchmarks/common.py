"""Helpers shared by the benchmark scripts: timing, medians, table and JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

from ray_cartridges.fsutil import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def cpu_model() -> str:
    """The CPU's model name (Linux), as results should name the machine they come from."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import os

    import torch

    from ray_cartridges.models import cpu_has_fast_bf16

    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_table(title: str, header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [title, line, "-+-".join("-" * w for w in widths)]
    out += [" | ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows]
    text = "\n".join(out)
    print(text, flush=True)
    return text


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    write_text_atomic(path, json.dumps({"machine": machine(), **payload}, indent=2))
    print(f"wrote {path}")
    return path


REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CHECKPOINT = REPO / "examples" / "agent_checkpoint"


def long_memory_text(tok, memory, n_tokens: int) -> str:
    """The example memory, repeated (each round marked) until it is exactly ``n_tokens`` tokens long."""
    text, k = memory.render(), 1
    while len(tok(text).input_ids) < n_tokens:
        k += 1
        text += "\n" + "\n".join(f"(round {k}) {e.render()}" for e in memory.entries)
    return tok.decode(tok(text).input_ids[:n_tokens])


def bench_dataset(path: str | None, model: str = "smollm2-135m-instruct", answer_tokens: int = 48) -> Path:
    """Flat top-k training data for the training benchmarks.

    ``path`` if given; else the demo's generated data (``outputs/demo/data/shards``) when present; else one
    teacher answer per memory question of the example checkpoint, made once by the transformers reference
    teacher and cached under ``~/.cache/ray_cartridges/bench``.
    """
    if path:
        return Path(path)
    demo = REPO / "outputs" / "demo" / "data" / "shards"
    if demo.is_dir() and any(demo.glob("*.parquet")):
        print(f"[bench] training data: {demo} (the demo's)", flush=True)
        return demo
    cache = Path.home() / ".cache" / "ray_cartridges" / "bench" / f"teacher-{model}-{answer_tokens}.parquet"
    if cache.exists():
        return cache
    print(f"[bench] making training data with the reference teacher -> {cache}", flush=True)
    from ray_cartridges.flat_topk import write_flat_topk
    from ray_cartridges.memory import read_memory
    from ray_cartridges.models import load_model, load_tokenizer

    tok, mem = load_tokenizer(model), read_memory(EXAMPLE_CHECKPOINT)
    _, rows = teacher_rows(load_model(model), tok, mem, mem.render(), answer_tokens=answer_tokens, top_k=20)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_flat_topk(rows, cache)
    return cache


def teacher_rows(model, tok, memory, context: str, *, answer_tokens: int, top_k: int, limit: int | None = None):
    """(records, flat top-k rows): the transformers reference teacher, ``context`` in its prompt, answering the
    memory's questions (the first ``limit`` of them)."""
    from ray_cartridges.contracts import SamplingParams
    from ray_cartridges.convert import convert_record
    from ray_cartridges.generate.engines import HFEngine
    from ray_cartridges.generate.teacher import run_prompts

    questions = [g[0].content for g in memory.triples()][:limit]
    prompts = [
        {"prompt_id": str(i), "strategy": "bench", "context": context, "user": q, "split_key": str(i)}
        for i, q in enumerate(questions)
    ]
    records, _ = run_prompts(
        HFEngine(model, tok), prompts, sampling=SamplingParams(max_tokens=answer_tokens, top_logprobs=top_k)
    )
    return records, [convert_record(r, tok, top_k=top_k) for r in records]
