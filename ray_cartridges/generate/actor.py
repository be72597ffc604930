"""TeacherActor: the Ray Data callable class that owns a teacher engine and writes finished shards.

Used as ``ds.map_batches(TeacherActor, compute=ActorPoolStrategy(size=n), batch_size=1, ...)`` over rows
``{shard, name, prompts}``: one row is one shard of prompts, answered in one batched engine call (the
memory is the shared prefix of every prompt, so prefix caching turns N prefills into one). Each shard
is written as ``shards/<name>.jsonl`` (seed format) and ``shards/<name>.parquet`` (flat top-k), each
atomically (write then rename, parquet last), so a shard is either complete or absent.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import GenerateConfig
from ..convert import ConversionError, convert_record
from ..flat_topk import write_flat_topk
from ..fsutil import write_text_atomic
from ..models import resolve_dtype, resolve_model
from .engines import HFEngine, Sampling, VLLMEngine
from .teacher import resolve_score_engine, run_prompts


class TeacherActor:
    def __init__(self, config: dict, shards_dir: str, base_metadata: dict):
        self.cfg = GenerateConfig.model_validate(config)
        if self.cfg.dtype == "auto":  # run_generation resolves it; an actor built on its own does here
            self.cfg = self.cfg.model_copy(update={"dtype": resolve_dtype("auto", gpu=self.cfg.use_gpu)})
        self.cfg = self.cfg.model_copy(update={"score_engine": resolve_score_engine(self.cfg)})
        c = self.cfg
        if c.engine == "vllm":
            self.engine = VLLMEngine(
                resolve_model(c.model_name, c.dtype),
                dtype=c.dtype,
                max_model_len=c.max_model_len,
                tensor_parallel_size=c.tensor_parallel_size,
                seed=c.seed,
                enforce_eager=c.enforce_eager,
            )
        else:
            self.engine = HFEngine.load(c.model_name, c.dtype)
        self._scorer = self.engine if c.engine == "transformers" or c.score_engine == "vllm" else None
        self.shards_dir = Path(shards_dir)
        self.base_metadata = base_metadata
        self.sampling = Sampling(c.temperature, c.top_p, c.max_tokens, c.top_logprobs)
        self.q_sampling = Sampling(c.self_study.question_temperature, 1.0, c.self_study.question_max_tokens, 1)

    def scorer(self):
        """The engine that reads answers for another teacher's targets (score_engine): the answering engine, or
        the same model under transformers, loaded on first use (a shard without such answers never loads it)."""
        if self._scorer is None:
            self._scorer = HFEngine.load(self.cfg.model_name, self.cfg.dtype)
        return self._scorer

    def __call__(self, batch: dict) -> dict:
        out = {"shard": [], "rows": [], "rejected": [], "answer_tokens": [], "seconds": [], "problems": []}
        for shard, name, prompts_json in zip(batch["shard"], batch["name"], batch["prompts"]):
            t0 = time.perf_counter()
            records, problems = run_prompts(
                self.engine,
                json.loads(prompts_json),
                sampling=self.sampling,
                question_sampling=self.q_sampling,
                seed=self.cfg.seed,
                base_metadata=self.base_metadata,
                scorer=self.scorer,
            )
            rows, kept = [], []
            for rec in records:
                try:
                    rows.append(
                        convert_record(
                            rec,
                            self.engine.tokenizer,
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
            out["rows"].append(len(rows))
            out["rejected"].append(len(records) - len(rows) + sum(1 for p in problems if "no usable question" in p))
            out["answer_tokens"].append(sum(len(r["messages"][-1]["token_ids"]) for r in kept))
            out["seconds"].append(time.perf_counter() - t0)
            out["problems"].append(json.dumps(problems))
        return out
