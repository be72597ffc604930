"""TeacherActor: the Ray Data callable class that owns a teacher engine and writes finished shards.

Used as ``ds.map_batches(TeacherActor, compute=ActorPoolStrategy(size=n), batch_size=1, ...)`` over rows
``{shard, name, keys, earlier_keys, earlier_files, earlier_offsets}``: one row is one shard of prompts (the
prompts themselves reach each actor once, through the object store), answered in one batched engine call (the
memory is the shared prefix of every prompt, so prefix caching turns N prefills into one); ``keys`` are the
prompts' keys and ``earlier_*`` where earlier shards hold records under some of them (file, byte offset), which
are kept, not answered again. Each shard is written as ``shards/<name>.jsonl`` (seed format) and
``shards/<name>.parquet`` (flat top-k), each atomically (write then rename, parquet last), so a shard is either
complete or absent.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..config import GenerateConfig
from ..contracts import Prompt, Rejection, SamplingParams
from ..convert import ConversionError, convert_record
from ..flat_topk import write_flat_topk
from ..fsutil import write_text_atomic
from ..models import context_limit, load_tokenizer, resolve_model
from .engines import HFEngine, VLLMEngine
from .teacher import resolved_config, run_prompts


class TeacherActor:
    def __init__(self, config: dict, shards_dir: str, base_metadata: dict, prompts):
        """``prompts``: {shard index: its prompts}, or an object ref to it."""
        import ray

        self.prompts: dict[int, list[Prompt]] = ray.get(prompts) if isinstance(prompts, ray.ObjectRef) else prompts
        self.cfg = GenerateConfig.model_validate(config)
        self.cfg = resolved_config(self.cfg)  # run_generation did; an actor built on its own does here
        c = self.cfg
        if not c.use_gpu:
            # Ray pins OMP_NUM_THREADS to the actor's num_cpus; the transformers scorer runs while the vLLM engine
            # waits, so it gets the node's cores (shared between the actors)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(c.num_threads, os.cpu_count() or 1)))
        self._engine = None  # started on the first prompt to answer: shards rebuilt from earlier answers need none
        self._scorer = None
        self._tokenizer = None
        self.shards_dir = Path(shards_dir)
        self.base_metadata = base_metadata
        self.sampling = SamplingParams(
            temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_tokens, top_logprobs=c.top_logprobs
        )
        self.q_sampling = SamplingParams(
            temperature=c.self_study.question_temperature, max_tokens=c.self_study.question_max_tokens, top_logprobs=1
        )

    @property
    def engine(self):
        """The answering engine (vLLM or transformers), started on first use."""
        if self._engine is None:
            c = self.cfg
            if c.engine == "vllm":
                self._engine = VLLMEngine(
                    resolve_model(c.model_name, c.dtype),
                    dtype=c.dtype,
                    max_model_len=c.max_model_len or context_limit(c.model_name, c.dtype) or 4096,
                    tensor_parallel_size=c.tensor_parallel_size,
                    seed=c.seed,
                    enforce_eager=c.enforce_eager,
                    block_size=c.block_size,
                )
            else:
                self._engine = HFEngine.load(c.model_name, c.dtype)
        return self._engine

    @property
    def tokenizer(self):
        """The teacher's tokenizer (the engine's once it runs; loaded alone for shards rebuilt from earlier
        answers)."""
        if self._engine is not None:
            return self._engine.tokenizer
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.model_name)
        return self._tokenizer

    def scorer(self):
        """The engine that reads answers for another teacher's targets (score_engine): the answering engine, or
        the same model under transformers, loaded on first use (a shard without such answers never loads it)."""
        if self._scorer is None:
            c = self.cfg
            use_engine = c.engine == "transformers" or c.score_engine == "vllm"
            self._scorer = self.engine if use_engine else HFEngine.load(c.model_name, c.dtype)
        return self._scorer

    def __call__(self, batch: dict) -> dict:
        """One shard per row: answered (or rebuilt from earlier answers), converted and written; its counts."""
        outs = []
        for i, shard in enumerate(batch["shard"]):
            where = zip(batch["earlier_keys"][i], batch["earlier_files"][i], batch["earlier_offsets"][i])
            outs.append(
                self.write_shard(
                    str(batch["name"][i]),
                    self.prompts[int(shard)],
                    [str(k) for k in batch["keys"][i]],
                    {str(k): (str(f), int(o)) for k, f, o in where},
                )
            )
        out = {k: [o[k] for o in outs] for k in ("rows", "reused", "rejected", "answer_tokens", "seconds", "problems")}
        out["shard"] = [int(k) for k in batch["shard"]]
        return out

    def write_shard(self, name: str, prompts: list[Prompt], keys: list[str], where: dict[str, tuple[str, int]]) -> dict:
        earlier = read_earlier(where)
        todo = [p for p, k in zip(prompts, keys) if k not in earlier]
        engine = self.engine if todo else None  # started before the clock: seconds are time in shard work
        t0 = time.perf_counter()
        fresh, rejected = [], []
        if todo:
            fresh, rejected = run_prompts(
                engine,
                todo,
                sampling=self.sampling,
                question_sampling=self.q_sampling,
                seed=self.cfg.seed,
                base_metadata=self.base_metadata,
                scorer=self.scorer,
            )
        key_of = {p["prompt_id"]: k for p, k in zip(prompts, keys)}
        for rec in fresh:
            rec["metadata"]["prompt_key"] = key_of[rec["metadata"]["prompt_id"]]
        by_id = {rec["metadata"]["prompt_id"]: rec for rec in [*earlier.values(), *fresh]}
        records = [by_id[p["prompt_id"]] for p in prompts if p["prompt_id"] in by_id]  # prompt order
        rows, kept = self._convert(name, records, rejected)
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.shards_dir / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        if rows:
            write_flat_topk(rows, self.shards_dir / f"{name}.parquet")
        else:
            write_text_atomic(self.shards_dir / f"{name}.empty", "")
        earlier_ids = {id(r) for r in earlier.values()}
        return {
            "rows": len(rows),
            "reused": sum(1 for r in kept if id(r) in earlier_ids),
            "rejected": len(rejected),
            # tokens written now (the speed of this run), not those reused
            "answer_tokens": sum(len(r["messages"][-1]["token_ids"]) for r in kept if id(r) not in earlier_ids),
            "seconds": time.perf_counter() - t0,
            "problems": [str(r) for r in rejected],
        }

    def _convert(self, name: str, records: list[dict], rejected: list[Rejection]) -> tuple[list[dict], list[dict]]:
        """The flat top-k rows of ``records`` and the records they came from; a record that cannot be converted
        is added to ``rejected``."""
        rows, kept = [], []
        for rec in records:
            pid = rec["metadata"]["prompt_id"]
            try:
                rows.append(
                    convert_record(
                        rec,
                        self.tokenizer,
                        min_prob_mass=self.cfg.min_prob_mass,
                        top_k=self.cfg.top_logprobs,
                        student_system_prompt=self.cfg.student_system_prompt,
                        where=f"shard {name} prompt {pid}",
                    )
                )
                kept.append(rec)
            except ConversionError as err:
                rejected.append(Rejection(pid, "conversion", str(err)))
        return rows, kept


def read_earlier(where: dict[str, tuple[str, int]]) -> dict[str, dict]:
    """The records at ``{prompt_key: (file, byte offset)}``; one that cannot be read back under its key (its
    file gone or changed since the index was made) is left out, and its prompt answered again."""
    found = {}
    for key, (path, offset) in where.items():
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                rec = json.loads(fh.readline())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("metadata", {}).get("prompt_key") == key:
            found[key] = rec
    return found
