"""Turn prompt specs (see :mod:`.strategies`) into seed-format records with any teacher engine."""

from __future__ import annotations

import json
import re
from dataclasses import replace

from ..chat import chat_template_ids
from ..config import GenerateConfig
from ..config.generate import CPU_BLOCK
from ..contracts import Prompt, Rejection, SamplingParams, TeacherRecord
from ..memory import MemoryContext
from .engines import request_seed
from .records import make_record


def chat_ids(tokenizer, context: str | dict | None, user: str) -> list[int]:
    """The teacher's prompt: the memory ``context`` (a system prompt string, a :class:`MemoryContext` as JSON,
    or None: no system message, the model's template default) and then the question ``user``."""
    msgs = MemoryContext.from_json(context).conversation(user)
    return chat_template_ids(tokenizer, msgs)


_PREFIX = re.compile(r"^(question|request|q)\s*[:\-]\s*", re.IGNORECASE)


def clean_question(text: str) -> str | None:
    """The first non-empty line of a generated question, without quotes or a 'Question:' label."""
    for line in text.splitlines():
        line = _PREFIX.sub("", line.strip()).strip().strip('"').strip()
        if len(line) >= 8:
            return line
    return None


def scored_by_another(prompt: dict) -> bool:
    """Whether the prompt's targets come from another teacher than the one that writes its answer."""
    return prompt.get("score_context") not in (None, prompt["context"])


def longest_request(tokenizer, prompts: list[Prompt], cfg: GenerateConfig) -> tuple[int, str]:
    """The tokens of the longest engine request the prompts make (a prompt and its answer: a self-study question
    counted at its longest, a rescored answer read after the whole memory), and that prompt's id."""
    ctx_len: dict[str, int] = {}

    def size(context, user: str | None, extra: int) -> int:
        key = json.dumps(context, sort_keys=True)
        if key not in ctx_len:
            ctx_len[key] = len(chat_ids(tokenizer, context, ""))
        user_len = len(tokenizer.encode(user, add_special_tokens=False)) if user else 0
        return ctx_len[key] + user_len + extra + 8  # + 8: what the template adds around a non-empty turn

    q = cfg.self_study.question_max_tokens
    best = (0, "")
    for p in prompts:
        if p.get("answer") is not None:
            extra = len(tokenizer.encode(p["answer"], add_special_tokens=False)) + 1
        else:
            extra = (p.get("max_tokens") or cfg.max_tokens) + (q if p.get("user") is None else 0)
        sizes = [size(p["context"], p.get("user"), extra)]
        if scored_by_another(p):
            sizes.append(size(p["score_context"], p.get("user"), extra))
        if p.get("question_text") is not None:
            sizes.append(len(tokenizer.encode(p["question_text"])) + q)
        elif p.get("user") is None:
            sizes.append(size(p["question_context"], p["seed_prompt"], q))
        best = max(best, (max(sizes), p["prompt_id"]))
    return best


def fit_engine_context(cfg: GenerateConfig, prompts: list[Prompt], source: str) -> GenerateConfig:
    """The config with ``max_model_len`` fitted to the prompts (unset) or checked against them (set): a prompt
    that cannot fit is a clear error here, before any engine starts."""
    from ..config import ConfigError
    from ..models import context_limit, fit_context, load_tokenizer

    need, prompt_id = longest_request(load_tokenizer(cfg.model_name), prompts, cfg)
    limit = context_limit(cfg.model_name, cfg.dtype)
    if limit and need > limit:
        raise ConfigError(
            f"{source}: the teacher's longest request (prompt {prompt_id}: the memory, the question and "
            f"max_tokens={cfg.max_tokens}) takes {need} tokens, more than {cfg.model_name}'s context of {limit}; "
            "use a model with a longer context, or a shorter memory (e.g. fewer episodes)"
        )
    if cfg.max_model_len is not None:
        if need > cfg.max_model_len:
            raise ConfigError(
                f"{source}: the teacher's longest request (prompt {prompt_id}) takes {need} tokens, more than "
                f"generate.max_model_len={cfg.max_model_len}; raise it, or leave it unset to fit the prompts"
            )
        return cfg
    return cfg.model_copy(update={"max_model_len": fit_context(need, limit)})


def resolve_score_engine(cfg) -> str:
    """score_engine auto: transformers where the teacher is the transformers engine or runs on CPU (vLLM re-reads
    the whole memory for every scored answer there), vLLM on GPUs."""
    if cfg.score_engine != "auto":
        return cfg.score_engine
    return "vllm" if cfg.engine == "vllm" and cfg.use_gpu else "transformers"


def resolved_config(cfg: GenerateConfig) -> GenerateConfig:
    """The config with its ``auto`` settings (``dtype``, ``score_engine``, ``block_size``) decided: the driver does
    it once, so that shard names, actors and metadata all see the concrete values."""
    from ..models import resolve_dtype

    if cfg.dtype == "auto":
        cfg = cfg.model_copy(update={"dtype": resolve_dtype(cfg.dtype, gpu=cfg.use_gpu)})
    if cfg.score_engine == "auto":
        cfg = cfg.model_copy(update={"score_engine": resolve_score_engine(cfg)})
    if cfg.block_size == "auto":
        cfg = cfg.model_copy(update={"block_size": CPU_BLOCK if cfg.vllm_on_cpu else None})
    return cfg


def run_prompts(
    engine,
    prompts: list[Prompt],
    *,
    sampling: SamplingParams,
    question_sampling: SamplingParams | None = None,
    seed: int = 0,
    base_metadata: dict | None = None,
    scorer=None,
) -> tuple[list[TeacherRecord], list[Rejection]]:
    """Answer every prompt (writing self-study questions first); returns (records, rejected prompts).
    ``scorer``: what reads answers whose targets come from another teacher (a callable returning an engine;
    default ``engine``)."""
    todo = [dict(p) for p in prompts]
    qs = question_sampling or SamplingParams(temperature=0.8, max_tokens=64, top_logprobs=1)
    rejected = _write_questions(engine, [p for p in todo if p.get("user") is None], qs, seed)
    todo = [p for p in todo if p.get("user")]
    given = [i for i, p in enumerate(todo) if p.get("answer") is not None]
    outs = _answer(engine, [p for p in todo if p.get("answer") is None], sampling, seed)
    for i, ids in zip(given, _read_given(engine, [todo[i] for i in given], sampling.top_logprobs)):
        outs.insert(i, ids)  # ascending indices: each lands where its prompt is
    # targets read by another teacher than the one that wrote the answer (``score_context``: the whole memory
    # re-reading an answer written from a chunk), by teacher forcing the answer's tokens
    rescore = [i for i, p in enumerate(todo) if scored_by_another(p)]
    if rescore:
        scored = (scorer() if scorer is not None else engine).score(
            [chat_ids(engine.tokenizer, todo[i]["score_context"], todo[i]["user"]) for i in rescore],
            [outs[i][0] for i in rescore],
            sampling.top_logprobs,
        )
        for i, entries in zip(rescore, scored):
            outs[i] = (outs[i][0], entries)
    records = [
        _record(engine.tokenizer, p, ids, entries, sampling, base_metadata) for p, (ids, entries) in zip(todo, outs)
    ]
    return records, rejected


def _question_ids(tok, p: dict) -> list[int]:
    """What the question writer reads: a plain-text prompt it continues (quiz), or a chat of the memory chunk
    and the seed prompt (self-study)."""
    if p.get("question_text") is not None:
        return tok.encode(p["question_text"])
    return chat_ids(tok, p["question_context"], p["seed_prompt"])


def _write_questions(engine, prompts: list[dict], sampling: SamplingParams, seed: int) -> list[Rejection]:
    """The teacher writes each prompt's question (``user``), one engine call per question temperature (a prompt
    may carry its own); those it wrote no usable question for are returned."""
    tok = engine.tokenizer
    by_temp: dict[float, list[dict]] = {}
    for p in prompts:
        by_temp.setdefault(p.get("question_temperature", sampling.temperature), []).append(p)
    rejected = []
    for temperature, group in by_temp.items():
        outs = engine.complete(
            [_question_ids(tok, p) for p in group],
            replace(sampling, temperature=temperature),
            [request_seed(seed, "q:" + p["prompt_id"]) for p in group],
        )
        for p, (ids, _) in zip(group, outs):
            p["user"] = clean_question(tok.decode(ids, skip_special_tokens=True))
            if p["user"] is None:
                rejected.append(Rejection(p["prompt_id"], "no_question", "the teacher wrote no usable question"))
    return rejected


def _read_given(engine, prompts: list[dict], top_logprobs: int) -> list:
    """(answer ids, logprob entries) of prompts that carry their answer: its tokens and the end of the turn, read
    by the teacher after the prompt (teacher forcing)."""
    if not prompts:
        return []
    tok = engine.tokenizer
    end = [] if tok.eos_token_id is None else [tok.eos_token_id]
    answers = [tok.encode(p["answer"], add_special_tokens=False) + end for p in prompts]
    scored = engine.score([chat_ids(tok, p["context"], p["user"]) for p in prompts], answers, top_logprobs)
    return list(zip(answers, scored))


def _answer(engine, prompts: list[dict], sampling: SamplingParams, seed: int) -> list:
    """(answer ids, logprob entries) per prompt, in prompt order. A prompt may carry its own answer length
    (unrelated requests: longer answers than the memory's): one engine call per length."""
    outs: list = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(p.get("max_tokens") or sampling.max_tokens, []).append(i)
    for n, idx in by_len.items():
        got = engine.complete(
            [chat_ids(engine.tokenizer, prompts[i]["context"], prompts[i]["user"]) for i in idx],
            replace(sampling, max_tokens=n),
            [request_seed(seed, prompts[i]["prompt_id"]) for i in idx],
        )
        for i, o in zip(idx, got):
            outs[i] = o
    return outs


def _record(tok, p: dict, ids: list[int], entries: list[dict], sampling, base_metadata) -> TeacherRecord:
    rescored = scored_by_another(p)
    meta = {
        **(base_metadata or {}),
        **p.get("metadata", {}),
        "prompt_id": p["prompt_id"],
        "strategy": p["strategy"],
        "split_key": p["split_key"],
        "sampling": {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": p.get("max_tokens") or sampling.max_tokens,
            "top_logprobs": sampling.top_logprobs,
        },
    }
    if rescored:  # the system message is the teacher of the targets; the answer was written from this
        meta["answer_context"] = p["context"]
    context = p["score_context"] if rescored else p["context"]
    return make_record(tok, context=context, user=p["user"], answer_ids=ids, entries=entries, metadata=meta)
