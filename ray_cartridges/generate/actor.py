"""TeacherActor: the Ray Data callable class that owns a teacher engine and writes finished shards.

Used as ``ds.map_batches(TeacherActor, compute=ActorPoolStrategy(size=n), batch_size=1, ...)`` over rows
``{shard, name, prompts, keys, earlier}``: one row is one shard of prompts, answered in one batched engine call
(the memory is the shared prefix of every prompt, so prefix caching turns N prefills into one); ``keys`` are the
prompts' keys and ``earlier`` where earlier shards hold records under some of them (file, byte offset), which
are kept, not answered again. Each shard is written as ``shards/<name>.jsonl`` (seed format) and
``shards/<name>.parquet`` (flat top-k), each atomically (write then rename, parquet last), so a shard is either
complete or absent.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import GenerateConfig
from ..convert import ConversionError, convert_record
from ..flat_topk import write_flat_topk
from ..fsutil import write_text_atomic
from ..models import load_tokenizer, resolve_dtype, resolve_model
from .engines import HFEngine, Sampling, VLLMEngine
from .teacher import resolve_score_engine, run_prompts


class TeacherActor:
    def __init__(self, config: dict, shards_dir: str, base_metadata: dict):
        self.cfg = GenerateConfig.model_validate(config)
        if self.cfg.dtype == "auto":  # run_generation resolves it; an actor built on its own does here
            self.cfg = self.cfg.model_copy(update={"dtype": resolve_dtype("auto", gpu=self.cfg.use_gpu)})
        self.cfg = self.cfg.model_copy(update={"score_engine": resolve_score_engine(self.cfg)})
        c = self.cfg
        self._engine = None  # started on the first prompt to answer: shards rebuilt from earlier answers need none
        self._scorer = None
        self._tokenizer = None
        self.shards_dir = Path(shards_dir)
        self.base_metadata = base_metadata
        self.sampling = Sampling(c.temperature, c.top_p, c.max_tokens, c.top_logprobs)
        self.q_sampling = Sampling(c.self_study.question_temperature, 1.0, c.self_study.question_max_tokens, 1)

    @property
    def engine(self):
        """The answering engine (vLLM or transformers), started on first use."""
        if self._engine is None:
            c = self.cfg
            if c.engine == "vllm":
                self._engine = VLLMEngine(
                    resolve_model(c.model_name, c.dtype),
                    dtype=c.dtype,
                    max_model_len=c.max_model_len,
                    tensor_parallel_size=c.tensor_parallel_size,
                    seed=c.seed,
                    enforce_eager=c.enforce_eager,
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
        fields = ("shard", "rows", "reused", "rejected", "answer_tokens", "seconds", "problems")
        out: dict[str, list] = {k: [] for k in fields}
        cols = zip(batch["shard"], batch["name"], batch["prompts"], batch["keys"], batch["earlier"])
        for shard, name, prompts_json, keys_json, earlier_json in cols:
            prompts = json.loads(prompts_json)
            keys = json.loads(keys_json)
            earlier = read_earlier(json.loads(earlier_json))
            todo = [p for p, k in zip(prompts, keys) if k not in earlier]
            engine = self.engine if todo else None  # started before the clock: seconds are time in shard work
            t0 = time.perf_counter()
            fresh, problems = [], []
            if todo:
                fresh, problems = run_prompts(
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
            rows, kept = [], []
            for rec in records:
                try:
                    rows.append(
                        convert_record(
                            rec,
                            self.tokenizer,
                            min_prob_mass=self.cfg.min_prob_mass,
                            top_k=self.cfg.top_logprobs,
                            student_system_prompt=self.cfg.student_system_prompt,
                            where=f"shard {name} prompt {rec['metadata']['prompt_id']}",
                        )
                    )
                    kept.append(rec)
                except ConversionError as err:
                    problems.append(str(err))
            self.shards_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.shards_dir / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
            if rows:
                write_flat_topk(rows, self.shards_dir / f"{name}.parquet")
            else:
                write_text_atomic(self.shards_dir / f"{name}.empty", "")
            out["shard"].append(int(shard))
            earlier_ids = {id(r) for r in earlier.values()}
            out["rows"].append(len(rows))
            out["reused"].append(sum(1 for r in kept if id(r) in earlier_ids))
            out["rejected"].append(len(records) - len(rows) + sum(1 for p in problems if "no usable question" in p))
            # tokens written now (the speed of this run), not those reused
            out["answer_tokens"].append(
                sum(len(r["messages"][-1]["token_ids"]) for r in kept if id(r) not in earlier_ids)
            )
            out["seconds"].append(time.perf_counter() - t0)
            out["problems"].append(json.dumps(problems))
        return out


def read_earlier(where: dict[str, list]) -> dict[str, dict]:
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
