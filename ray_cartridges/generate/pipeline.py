"""Driver of teacher generation: checkpoint -> prompts -> Ray Data + TeacherActor -> shards -> dataset.

Outputs in ``output_dir``: ``shards/shard-NNNNN-<hash>.{jsonl,parquet}`` (written by the actors, atomically),
``dataset.jsonl`` (all shards, seed format), ``memory.txt`` (the rendered memory, for text init; with
``memory_context.json``, the memory as chat turns, where ``memory_layout`` puts it there),
``generation.json`` (config, counts, timings) and ``README.md`` (dataset card). Re-running the same config
keeps finished shards and generates only the missing ones; shards of a different config are removed. Within a
shard that must be written again, a prompt whose record an earlier shard in the same directory holds under the
same prompt key (``prompt_keys``: the prompt and every setting that shapes its answer) is not answered again: a
change to one strategy's settings regenerates that strategy's answers only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import GenerateConfig, dump_config
from ..contracts import strategy_family
from ..engine_env import engine_actor_env
from ..fsutil import atomic_writer, write_text_atomic
from ..memory import read_memory
from ..raycluster import check_fits
from .strategies import build_prompts, for_memory, render_context
from .teacher import fit_engine_context, resolved_config, scored_by_another

logger = logging.getLogger(__name__)


# settings that never change a shard's content: where files go, how work is spread, what training expects
_NOT_IN_SHARD_NAME = {
    "output_dir",
    "num_threads",
    "actor_num_cpus",
    "hf_repo_id",
    "hf_private",
    "training_top_k",
    "max_samples",
    "shard_size",
}
# nor what the teacher writes for a prompt: the conversion to parquet, done again from the record
_NOT_IN_PROMPT_KEY = _NOT_IN_SHARD_NAME | {"min_prob_mass", "student_system_prompt"}


_LATER_FIELDS = {
    "memory_layout": "system",
    "deterministic": False,
    "block_size": None,
    "recite.answers": "teacher",
    "quiz.answers": "teacher",
}


def _named_settings(cfg: GenerateConfig, exclude: set[str]) -> dict:
    """The settings a shard name or prompt key covers; a field at its default that predates it is left out,
    so that data written before the field existed keeps its names."""
    settings = cfg.model_dump(mode="json", exclude=exclude)
    for dotted, default in _LATER_FIELDS.items():
        *parents, key = dotted.split(".")
        where = settings
        for name in parents:
            where = where.get(name) or {}
        if where.get(key) == default:
            where.pop(key)
    if not cfg.quiz.enabled:  # (a later section) named only where it is on
        settings.pop("quiz", None)
    if isinstance(cfg.self_study.num_samples, int):  # the resolved count is named; how it was derived is not
        settings.get("self_study", {}).pop("per_unit", None)
    if isinstance(cfg.replay.window_k, int):  # likewise the resolved window
        settings.get("replay", {}).pop("window_tokens", None)
    return settings


def shard_names(prompts: list[list[dict]], cfg: GenerateConfig) -> list[str]:
    """Shard file stems; the hash covers everything that changes a shard's content."""
    settings = _named_settings(cfg, _NOT_IN_SHARD_NAME)
    if not cfg.enforce_eager:  # the field came later: shards written before it keep their names
        settings.pop("enforce_eager")
    score_engine = settings.pop("score_engine")  # (came later too) named only where a shard has rescored answers
    names = []
    for k, shard in enumerate(prompts):
        rescored = any(scored_by_another(p) for p in shard)
        mine = {**settings, "score_engine": score_engine} if rescored else settings
        h = hashlib.sha256(json.dumps([mine, shard], sort_keys=True).encode()).hexdigest()[:10]
        names.append(f"shard-{k:05d}-{h}")
    return names


_STRATEGY_FIELDS = ("replay", "self_study", "recite", "quiz", "general")


def prompt_keys(prompts: list[dict], cfg: GenerateConfig) -> list[str]:
    """One key per prompt for the record the teacher writes for it: the prompt itself, the settings of the
    answering teacher and of the prompt's own strategy only (a self-study setting does not touch a replay
    prompt's key), and the score engine only where another teacher reads the answer."""
    settings = _named_settings(cfg, _NOT_IN_PROMPT_KEY)
    strategies = {name: settings.pop(name, None) for name in _STRATEGY_FIELDS}
    score_engine = settings.pop("score_engine")
    keys = []
    for p in prompts:
        family = strategy_family(p["strategy"])
        mine = {**settings, "strategy_settings": strategies.get(family)}
        if scored_by_another(p):
            mine["score_engine"] = score_engine
        keys.append(hashlib.sha256(json.dumps([mine, p], sort_keys=True).encode()).hexdigest()[:16])
    return keys


_RESOURCE = {"num_cpus": "CPU", "num_gpus": "GPU"}  # Ray Data's actor options -> Ray resource names
_KEY_IN_LINE = re.compile(rb'"prompt_key": "([0-9a-f]{16})"')


def earlier_records(shards_dir: Path, wanted: set[str]) -> dict[str, tuple[str, int]]:
    """Where the shards in ``shards_dir`` hold a record under one of the ``wanted`` prompt keys: its file and
    the byte offset of its line. Only this index is kept (a large dataset's records would not fit the driver's
    memory); the actors read the records they reuse. Shards written before prompt keys existed hold none."""
    found: dict[str, tuple[str, int]] = {}
    if not wanted:
        return found
    for f in sorted(shards_dir.glob("shard-*.jsonl")):
        offset = 0
        with open(f, "rb") as fh:
            for line in fh:
                m = _KEY_IN_LINE.search(line)
                if m and (key := m.group(1).decode()) in wanted:
                    found[key] = (str(f), offset)
                offset += len(line)
    return found


def _is_done(shards_dir: Path, name: str) -> bool:
    return (shards_dir / f"{name}.jsonl").is_file() and (
        (shards_dir / f"{name}.parquet").is_file() or (shards_dir / f"{name}.empty").is_file()
    )


@dataclass
class ShardPlan:
    """What a run has to do: its prompts in shards, their names, the shards not yet written, and for those
    their prompt keys and where earlier shards already hold an answer ({prompt key: (file, byte offset)})."""

    shards: list[list[dict]]
    names: list[str]
    todo: list[int]
    keys: dict[int, list[str]]
    reusable: dict[int, dict[str, tuple[str, int]]]

    @classmethod
    def make(cls, prompts: list[dict], cfg: GenerateConfig, shards_dir: Path) -> ShardPlan:
        shards = [prompts[i : i + cfg.shard_size] for i in range(0, len(prompts), cfg.shard_size)]
        names = shard_names(shards, cfg)
        todo = [k for k, n in enumerate(names) if not _is_done(shards_dir, n)]
        keys = {k: prompt_keys(shards[k], cfg) for k in todo}  # finished shards are not read again
        earlier = earlier_records(shards_dir, {key for k in todo for key in keys[k]})
        reusable = {k: {key: earlier[key] for key in keys[k] if key in earlier} for k in todo}
        return cls(shards, names, todo, keys, reusable)


def run_generation(cfg: GenerateConfig, progress: bool = True) -> dict:
    """Generate the teacher data as configured; returns the run summary (also in ``generation.json``)."""
    cfg = resolved_config(cfg)
    logger.info("teacher dtype %s, score engine %s", cfg.dtype, cfg.score_engine)
    memory = read_memory(cfg.checkpoint_dir, strict=cfg.strict)
    auto_window = cfg.replay.window_k == "auto"
    cfg = for_memory(cfg, memory)
    if auto_window and cfg.replay.enabled and not memory.is_corpus:
        logger.info("replay windows: %d experiences (about %d tokens)", cfg.replay.window_k, cfg.replay.window_tokens)
    prompts = build_prompts(memory, cfg)
    cfg = fit_engine_context(cfg, prompts, memory.source)
    if cfg.training_top_k is not None and cfg.training_top_k != cfg.top_logprobs:
        logger.warning(
            "top_logprobs=%d differs from training_top_k=%d: training will refuse this data",
            cfg.top_logprobs,
            cfg.training_top_k,
        )
    out = Path(cfg.output_dir).resolve()
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    plan = ShardPlan.make(prompts, cfg, shards_dir)
    logger.info(
        "%d prompts in %d shards; %d shards already done; of the %d prompts in the others, %d answered before",
        len(prompts),
        len(plan.shards),
        len(plan.shards) - len(plan.todo),
        sum(len(plan.shards[k]) for k in plan.todo),
        sum(len(r) for r in plan.reusable.values()),
    )
    base_meta = {
        "checkpoint": memory.source,
        "episode": memory.episode,
        "teacher_model": cfg.model_name,
        "teacher_engine": cfg.engine,
        "teacher_dtype": cfg.dtype,
    }
    t0 = time.perf_counter()
    stats = _run_actors(cfg, plan, shards_dir, base_meta, progress) if plan.todo else _ShardStats()
    elapsed = time.perf_counter() - t0
    _remove_other_shards(shards_dir, set(plan.names))
    total_rows, total_tokens, answers = _assemble_dataset(out / "dataset.jsonl", shards_dir, plan.names)
    _write_memory_files(out, memory, cfg)
    summary = {
        "output_dir": str(out),
        "dataset_jsonl": str(out / "dataset.jsonl"),
        "parquet_shards": str(shards_dir),
        "rows": total_rows,
        "answer_tokens": total_tokens,
        "prompts": len(prompts),
        "shards": len(plan.shards),
        "shards_generated_now": len(plan.todo),
        "rows_generated_now": stats.rows - stats.reused,
        "rows_reused_now": stats.reused,  # in shards written now, answers taken from earlier shards
        "rejected_now": stats.rejected,
        "seconds_now": elapsed,
        "answer_tokens_per_s_now": stats.answer_tokens / elapsed if plan.todo and elapsed > 0 else None,
        "answer_tokens_now": stats.answer_tokens,
        "engine_seconds_now": stats.seconds,  # time inside engine calls (no Ray or engine start-up)
        "memory_entries": len(memory.entries),
        "memory_lines_skipped": memory.skipped_lines,
        **{f"{k}_answers_with_fact": fact_answer_share(answers, memory, k) for k, _, _ in _FACT_KINDS},
        "problems": stats.problems[:20],
    }
    write_text_atomic(
        out / "generation.json", json.dumps({"summary": summary, "config": cfg.model_dump(mode="json")}, indent=2)
    )
    write_text_atomic(out / "README.md", dataset_card(cfg, summary))
    if cfg.hf_repo_id:
        summary["hub_url"] = _push(out, cfg)
    return summary


@dataclass
class _ShardStats:
    """The actors' counts over the shards written in this run."""

    rows: int = 0
    reused: int = 0
    rejected: int = 0
    answer_tokens: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def add(self, row: dict) -> None:
        self.rows += int(row["rows"])
        self.reused += int(row["reused"])
        self.rejected += int(row["rejected"])
        self.answer_tokens += int(row["answer_tokens"])
        self.seconds += float(row["seconds"])
        self.problems += list(row["problems"])


def _run_actors(cfg: GenerateConfig, plan: ShardPlan, shards_dir: Path, base_meta: dict, progress: bool):
    """The shards still to write, one per task, through a pool of teacher actors (Ray Data)."""
    import ray.data
    from tqdm.auto import tqdm

    from ..models import BUNDLED_MODEL, ensure_bundled_model
    from ..raycluster import init_ray
    from .actor import TeacherActor

    if cfg.model_name == BUNDLED_MODEL:
        ensure_bundled_model(dtypes=(cfg.dtype,))
    init_ray(log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar over shards below
    # the prompts go to the object store once; a row names its shard and carries typed columns
    prompts = ray.put({k: plan.shards[k] for k in plan.todo})
    items = [
        {
            "shard": k,
            "name": plan.names[k],
            "keys": plan.keys[k],
            "earlier_keys": list(plan.reusable[k]),
            "earlier_files": [f for f, _ in plan.reusable[k].values()],
            "earlier_offsets": [o for _, o in plan.reusable[k].values()],
        }
        for k in plan.todo
    ]
    slots = {"num_gpus": cfg.tensor_parallel_size, "num_cpus": 1} if cfg.use_gpu else {"num_cpus": cfg.actor_num_cpus}
    actors = min(cfg.num_threads, len(plan.todo))
    # a fixed pool waits for all its actors: on a cluster that cannot hold them, it would wait forever
    check_fits({_RESOURCE[k]: v * actors for k, v in slots.items()}, f"generation with num_threads={actors}")
    ds = ray.data.from_items(items).map_batches(
        TeacherActor,
        fn_constructor_kwargs={
            "config": cfg.model_dump(mode="json"),
            "shards_dir": str(shards_dir),
            "base_metadata": base_meta,
            "prompts": prompts,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        runtime_env={"env_vars": engine_actor_env(cfg.use_gpu, in_process=cfg.engine_in_process)},
        **slots,
    )
    stats = _ShardStats()
    t0 = time.perf_counter()
    bar = tqdm(total=len(plan.todo), desc="teacher shards", unit="shard", disable=not progress)
    for row in ds.iter_rows():
        stats.add(row)
        bar.update(1)
        bar.set_postfix(rows=stats.rows, tok_s=f"{stats.answer_tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    return stats


def _remove_other_shards(shards_dir: Path, keep: set[str]) -> None:
    """Shards of other configs go: the dataset is this config's shards only."""
    for f in shards_dir.iterdir():
        if f.name.startswith("shard-") and f.name.rsplit(".", 1)[0] not in keep:
            f.unlink()


def _assemble_dataset(path: Path, shards_dir: Path, names: list[str]) -> tuple[int, int, list[dict]]:
    """``dataset.jsonl`` from the shards, in order, streamed one record at a time (a large dataset need not fit
    in memory); returns (rows, answer tokens, what the fact-answer share reads of each record)."""
    total_rows, total_tokens, answers = 0, 0, []
    with atomic_writer(path) as fh:
        for n in names:
            with open(shards_dir / f"{n}.jsonl", encoding="utf-8") as shard:
                for line in shard:
                    if not line.strip():
                        continue
                    fh.write(line if line.endswith("\n") else line + "\n")
                    rec = json.loads(line)
                    total_rows += 1
                    total_tokens += len(rec["messages"][-1]["token_ids"])
                    meta = rec.get("metadata", {})
                    answers.append(
                        {
                            "metadata": {k: meta.get(k) for k in ("strategy", "memory_entry")},
                            "messages": [{"content": rec["messages"][-1]["content"]}],
                        }
                    )
    return total_rows, total_tokens, answers


def _write_memory_files(out: Path, memory, cfg: GenerateConfig) -> None:
    """The whole memory as text (history_template / history_instructions applied): the text init and the
    in-context reference of `eval`; a memory laid out in turns also as those turns, which `eval` reads then."""
    write_text_atomic(out / "memory.txt", render_context(memory, cfg, layout="system"))
    turns = out / "memory_context.json"
    if cfg.memory_layout != "system":
        write_text_atomic(turns, json.dumps(render_context(memory, cfg), ensure_ascii=False, indent=1))
    elif turns.exists():
        turns.unlink()


_PUBLISHED = ["dataset.jsonl", "shards/*.parquet", "README.md", "generation.json", "memory.txt", "memory_context.json"]


def _push(out: Path, cfg: GenerateConfig) -> str:
    from ..hub import push_folder

    return push_folder(out, cfg.hf_repo_id, repo_type="dataset", private=cfg.hf_private, allow_patterns=_PUBLISHED)


def fact_answer_share(records: list[dict], memory, prefix: str = "replay/") -> dict | None:
    """How good the teacher's targets are: of the answers the teacher wrote (of strategies starting with
    ``prefix``: replay, recitals or the quiz) about a known fact, how many state it (the recall scoring of
    ``ray-cartridges eval``). The fact is the Feedback of the answer's experience, or for a quiz answer the
    sentence its question was written from. None where there are no such answers."""
    from ..memory import memory_questions
    from ..scoring import score_answer

    facts = {i: (q, ref) for i, q, ref in memory_questions(memory)}
    hits = []
    for r in records:
        meta = r.get("metadata", {})
        strategy = str(meta.get("strategy", ""))
        if not strategy.startswith(prefix) or strategy.endswith("/text"):  # (a given text states its fact)
            continue
        if "sentence" in meta:
            q, ref = r["messages"][-2]["content"], meta["sentence"]
        elif meta.get("memory_entry") in facts:
            q, ref = facts[meta["memory_entry"]]
        else:
            continue
        hits.append(score_answer(r["messages"][-1]["content"], ref, q)["correct"])
    return {"correct": sum(hits), "answers": len(hits), "share": sum(hits) / len(hits)} if hits else None


# the kinds of answer whose share of stated facts the summary reports: (strategy prefix, name, what they state)
_FACT_KINDS = (
    ("replay", "replay", "their experience's Feedback"),
    ("recite", "recital", "their experience's Feedback"),
    ("quiz", "quiz", "the sentence they ask about"),
)


def _reproducible(cfg: GenerateConfig) -> str:
    if cfg.engine_in_process:
        return "yes (the engine core in the actor's process)"
    if cfg.dtype == "fp32":
        return "likely (fp32 answers do not depend on rounding races); deterministic makes it certain"
    return "no: bf16 answers of two fresh runs may differ in a few tokens (set deterministic)"


def dataset_card(cfg: GenerateConfig, summary: dict) -> str:
    return (
        "---\ntags: [ray-cartridges, memory-distillation]\n---\n"
        f"# Memory distillation dataset\n\nTeacher `{cfg.model_name}` ({cfg.engine}, {cfg.dtype}) answering prompts "
        f"built from the agent memory at `{cfg.checkpoint_dir}`.\n\n"
        f"- conversations: {summary['rows']}\n- answer tokens: {summary['answer_tokens']}\n"
        f"- top logprobs per token: {cfg.top_logprobs}\n"
        f"- reproducible run to run: {_reproducible(cfg)}\n"
        + "".join(
            f"- {what} answers that state {stated}: {fact['correct']}/{fact['answers']}\n"
            for kind, what, stated in _FACT_KINDS
            if (fact := summary.get(f"{kind}_answers_with_fact"))
        )
        + "\n"
        "Files: `dataset.jsonl` (seed format with OpenAI-style logprobs and exact token ids), "
        "`shards/*.parquet` (flat top-k, ready for `ray-cartridges train` with `is_converted: true`).\n\n"
        "## Generation config\n\n```yaml\n" + dump_config(cfg) + "```\n"
    )


def format_summary(s: dict) -> str:
    lines = [
        "",
        "=== teacher generation finished ===",
        f"  conversations: {s['rows']} ({s['rows_generated_now']} generated now, {s.get('rows_reused_now', 0)} "
        f"reused from earlier shards, {s['rejected_now']} rejected)",
    ]
    if kept := s["shards"] - s["shards_generated_now"]:
        lines.append(f"  shards: {s['shards']}, of which {kept} were already written and are kept as they are")
    lines.append(f"  answer tokens: {s['answer_tokens']}")
    for kind, what, stated in _FACT_KINDS:
        if fact := s.get(f"{kind}_answers_with_fact"):
            lines.append(
                f"  {what} answers that state {stated}: {fact['correct']}/{fact['answers']} "
                f"({fact['share']:.0%}; the ceiling of what the cartridge can learn from them)"
            )
    if s.get("answer_tokens_per_s_now"):
        lines.append(
            f"  speed this run: {s['answer_tokens_per_s_now']:.1f} answer tokens/s over {s['seconds_now']:.0f} s"
        )
    lines += [
        f"  JSONL (seed format): {s['dataset_jsonl']}",
        f"  parquet shards (flat top-k): {s['parquet_shards']}",
    ]
    if s.get("hub_url"):
        lines.append(f"  pushed to: {s['hub_url']}")
    return "\n".join(lines)
