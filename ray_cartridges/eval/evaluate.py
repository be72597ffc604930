"""Evaluate a cartridge on held-out material: fidelity (KL to the in-context teacher) and recall.

- fidelity: on held-out conversations, per-token KL(teacher with the memory in context || student) over
  the full vocabulary at the answer positions, for the student with no memory and with the cartridge;
  share of the ICL gap closed = 1 - KL_cartridge / KL_no_memory.
- recall: for memory facts with known answers (an Observation's Feedback), answer accuracy of no memory,
  ICL (HistoryAgent) and the cartridge (KVMemoryAgent), greedy.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..agent.base import ChatModel
from ..agent.decoding import SamplingParams
from ..agent.kv_memory import KVCacheMemory
from ..batching import heldout_keys
from ..chat import chat_template_ids
from ..contracts import GENERAL_STRATEGY, SplitKey, strategy_family
from ..fsutil import bundled_data
from ..memory import AgentMemory, MemoryContext, memory_questions, read_facts
from ..models import fit_context
from ..scoring import score_answer
from .metrics import kl_per_token

logger = logging.getLogger(__name__)


def _logits_after(model, ids: torch.Tensor, kv=None) -> torch.Tensor:
    """Logits [T, V] of the single row ``ids`` [1, T] read after an optional cartridge prefix (positions from p)."""
    from ..agent.decoding import build_cache

    p = 0 if kv is None else kv[0][0].shape[1]
    pos = torch.arange(p, p + ids.shape[1])[None]
    mask = torch.ones((1, p + ids.shape[1]), dtype=torch.long)
    return model(ids, attention_mask=mask, position_ids=pos, past_key_values=build_cache(model, kv, 1)).logits[0]


@dataclass(frozen=True)
class ReadPrefix:
    """Tokens read once, kept as their per-layer (K, V) in a cartridge's layout: a reading that starts with these
    tokens continues from them (:func:`_logits_after`) instead of reading them again. The evaluation's long
    memory-in-context readings (the fidelity teacher, the no-harm ICL references) all start with the memory."""

    ids: tuple[int, ...]
    kv: list

    @classmethod
    @torch.no_grad()
    def of(cls, model, ids) -> ReadPrefix:
        cache = model(torch.tensor([list(ids)]), use_cache=True).past_key_values
        return cls(tuple(ids), [(layer.keys[0], layer.values[0]) for layer in cache.layers])


def _read_after(model, ids: list[int], read: ReadPrefix | None) -> tuple[torch.Tensor, int]:
    """Logits [T - n, V] of the row ``ids`` from position n on: n = len(read.ids) where ``ids`` start with the
    tokens ``read`` holds (those come from its KV), else 0 (the whole row is read)."""
    n = len(read.ids) if read is not None else 0
    if n == 0 or len(ids) <= n or tuple(ids[:n]) != read.ids:
        return _logits_after(model, torch.tensor([ids])), 0
    return _logits_after(model, torch.tensor([ids[n:]]), read.kv), n


def _system_prefix(model, tok, system: str, store: dict) -> ReadPrefix:
    """The chat template's system turn holding ``system``, read once per ``store``."""
    return _lead_prefix(model, tok, MemoryContext.from_json(system), store)


def _lead_prefix(model, tok, ctx: MemoryContext, store: dict) -> ReadPrefix:
    """The messages of ``ctx`` before the question, through the chat template, read once per ``store``."""
    key = ("lead_prefix", ctx)
    if key not in store:
        store[key] = ReadPrefix.of(
            model, chat_template_ids(tok, [{"role": r, "content": c} for r, c in ctx.messages], False)
        )
    return store[key]


def _teacher_conversation(rec: dict, user: str, teacher_context: MemoryContext | None) -> list[dict]:
    """What the teacher of ``rec`` read before its answer: the whole memory (``teacher_context``) or the
    record's own (its ``teacher_messages`` where the memory was laid out in turns, else its system message)."""
    if teacher_context is not None:
        return teacher_context.conversation(user)
    if rec.get("teacher_messages"):
        return [{"role": m["role"], "content": m["content"]} for m in rec["teacher_messages"]]
    return [{"role": "system", "content": rec["messages"][0]["content"]}, {"role": "user", "content": user}]


@torch.no_grad()
def fidelity(
    model,
    tok,
    kv,
    records: list[dict],
    student_system_prompt: str | None = None,
    cache: dict | None = None,
    teacher_context: MemoryContext | str | None = None,
) -> dict:
    """Mean per-token KL over the answers of ``records`` for no memory and for the cartridge; where the records
    are of several strategies, also per strategy family (``by_strategy``).

    ``teacher_context``: the whole memory as the teacher reads it (a :class:`MemoryContext` or a system prompt);
    None reads each record's own (what the generating teacher read, which for focused replay or chunk-answered
    self-study is only part of the memory).
    ``cache``: a dict kept across calls on the same base model (a sweep over cartridges): what does not depend on
    the cartridge (the teacher's logits with the memory in context, the no-memory KL) is computed once."""
    per: dict[str, _KLSums] = {}  # by strategy family
    store = {} if cache is None else cache
    if isinstance(teacher_context, str):
        teacher_context = MemoryContext.from_json(teacher_context)
    read = None if teacher_context is None else _lead_prefix(model, tok, teacher_context, store)
    for rec in records:
        user, answer = rec["messages"][-2], rec["messages"][-1]
        a_ids = answer["token_ids"]
        t_prompt = chat_template_ids(tok, _teacher_conversation(rec, user["content"], teacher_context))
        s_msgs = ([{"role": "system", "content": student_system_prompt}] if student_system_prompt else []) + [
            {"role": "user", "content": user["content"]}
        ]
        s_prompt = chat_template_ids(tok, s_msgs)
        s_ids = torch.tensor([s_prompt + a_ids])
        s_slice = slice(len(s_prompt) - 1, len(s_prompt) + len(a_ids) - 1)
        key = ("fidelity", tuple(t_prompt), tuple(s_prompt), tuple(a_ids))
        if cache is None or key not in cache:
            t_all, k = _read_after(model, t_prompt + a_ids, read)
            t_logits = t_all[len(t_prompt) - 1 - k : len(t_prompt) + len(a_ids) - 1 - k]
            kl_plain = float(kl_per_token(t_logits, model(s_ids).logits[0, s_slice]).sum())
            if cache is not None:
                cache[key] = (t_logits, kl_plain)
        else:
            t_logits, kl_plain = cache[key]
        cart = _logits_after(model, s_ids, kv)[s_slice]
        family = strategy_family((rec.get("metadata") or {}).get("strategy", "")) or "unknown"
        per.setdefault(family, _KLSums()).add(kl_plain, float(kl_per_token(t_logits, cart).sum()), len(a_ids))
    total = _KLSums()
    for sums in per.values():
        total.add(sums.no_memory, sums.cartridge, sums.tokens, sums.conversations)
    out = total.reading()
    if len(per) > 1:  # a mix (replay, self-study, recitals): each kind's share too, to compare runs that differ in it
        out["by_strategy"] = {family: sums.reading() for family, sums in sorted(per.items())}
    return out


@dataclass
class _KLSums:
    """KL sums over the answer tokens of some records: no memory and cartridge, against the in-context teacher."""

    no_memory: float = 0.0
    cartridge: float = 0.0
    tokens: int = 0
    conversations: int = 0

    def add(self, no_memory: float, cartridge: float, tokens: int, conversations: int = 1) -> None:
        self.no_memory += no_memory
        self.cartridge += cartridge
        self.tokens += tokens
        self.conversations += conversations

    def reading(self) -> dict:
        """Mean per-token KLs and the share of the ICL gap closed."""
        out = {
            "kl_no_memory": self.no_memory / max(self.tokens, 1),
            "kl_cartridge": self.cartridge / max(self.tokens, 1),
        }
        out["icl_gap_closed"] = 1 - out["kl_cartridge"] / out["kl_no_memory"] if out["kl_no_memory"] > 0 else None
        out.update(tokens=self.tokens, conversations=self.conversations)
        return out


@torch.no_grad()
def perplexity(model, tok, text: str, kv=None) -> float:
    """Perplexity of ``text`` (plain tokens) read after an optional cartridge prefix."""
    ids = torch.tensor([tok(text).input_ids])
    logits = _logits_after(model, ids, kv)[:-1]
    nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:])
    return float(torch.exp(nll))


@torch.no_grad()
def perplexity_after_text(model, tok, prefix: str, text: str) -> float:
    """Perplexity of ``text`` read right after ``prefix`` in context (the ICL reference of no harm).

    Scores the same tokens as :func:`perplexity` (the text's second token onwards), so the two compare."""
    p_ids, t_ids = tok(prefix).input_ids, tok(text).input_ids
    ids = torch.tensor([p_ids + t_ids])
    logits = model(ids).logits[0, len(p_ids) : -1]
    return float(torch.exp(torch.nn.functional.cross_entropy(logits.float(), ids[0, len(p_ids) + 1 :])))


@torch.no_grad()
def perplexity_chat(
    model,
    tok,
    text: str,
    kv=None,
    system: str | None = None,
    request: str | None = None,
    read: ReadPrefix | None = None,
) -> float:
    """Perplexity of ``text`` as the assistant's answer to an unrelated ``request``, in the chat template, after
    an optional cartridge prefix and an optional system prompt: how the agent reads its cartridge.

    Scores the answer's tokens and the end-of-turn marker after them. ``read`` (without a cartridge): the
    system turn read once (:func:`_system_prefix`), continued from instead of read again."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": request or CHAT_REQUEST})
    pre = chat_template_ids(tok, msgs)
    full = chat_template_ids(tok, msgs + [{"role": "assistant", "content": text}], False)
    if kv is not None and read is not None:
        raise ValueError("perplexity_chat reads either a cartridge or a prefix read once, not both")
    logits, n = _read_after(model, full, read) if kv is None else (_logits_after(model, torch.tensor([full]), kv), 0)
    scored = slice(len(pre) - 1 - n, len(full) - 1 - n)
    return float(torch.exp(torch.nn.functional.cross_entropy(logits[scored].float(), torch.tensor(full[len(pre) :]))))


CHAT_REQUEST = "Tell me about something you find interesting."


def no_harm(
    model,
    tok,
    kv,
    text: str,
    memory_text: str | None = None,
    system_prompt: str | None = None,
    cache: dict | None = None,
) -> dict:
    """Perplexity on text unrelated to the memory, bare model against the model with the cartridge, read two ways:
    as plain text right after the prefix (top-level keys) and as the assistant's turn of an unrelated chat
    (``chat``), the way the agent reads its cartridge. ``memory_text`` adds the ICL reference of each: the memory
    itself in context (before the text; as the system prompt of the chat), read once and continued from.
    ``paragraphs``: the same readings of each paragraph of ``text`` read alone, the mean of each ratio over them
    (a short answer is mostly the first tokens after the prefix, where a cartridge moves predictions most); None
    for a text of one paragraph. ``cache``: as in :func:`fidelity`."""
    store = {} if cache is None else cache

    def once(name, t, fn, *args, **kw):  # the readings that do not depend on the cartridge
        key = ("no_harm", name, t, memory_text, system_prompt)
        if key not in store:
            store[key] = fn(*args, **kw)
        return store[key]

    memory, memory_chat = None, None
    if memory_text:
        memory = once("memory", "", ReadPrefix.of, model, tok(memory_text).input_ids)
        memory_chat = _system_prefix(model, tok, memory_text, store)

    def read(t: str) -> dict:
        base = once("base", t, perplexity, model, tok, t)
        cart = perplexity(model, tok, t, kv)
        out = {"ppl_base": base, "ppl_cartridge": cart, "ratio": cart / base}
        if memory:  # the same tokens scored as perplexity_after_text(memory_text, t) scores them
            icl = once("icl", t, perplexity, model, tok, t, memory.kv)
            out.update({"ppl_icl": icl, "ratio_icl": icl / base})
        chat_base = once("chat_base", t, perplexity_chat, model, tok, t, system=system_prompt)
        chat_cart = perplexity_chat(model, tok, t, kv, system=system_prompt)
        chat = {"ppl_base": chat_base, "ppl_cartridge": chat_cart, "ratio": chat_cart / chat_base}
        if memory_chat:
            chat_icl = once("chat_icl", t, perplexity_chat, model, tok, t, system=memory_text, read=memory_chat)
            chat.update({"ppl_icl": chat_icl, "ratio_icl": chat_icl / chat_base})
        out["chat"] = chat
        return out

    out = read(text)
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    out["paragraphs"] = None
    if len(paras) > 1:
        each = [read(p) for p in paras]
        out["paragraphs"] = {"count": len(paras)}
        for name, part in (("raw", lambda r: r), ("chat", lambda r: r["chat"])):
            keys = ("ratio", "ratio_icl") if memory_text else ("ratio",)
            out["paragraphs"][name] = {k: sum(part(r)[k] for r in each) / len(each) for k in keys}
    return out


class RecallQuestion(NamedTuple):
    """A question recall asks, and the fact its answer is scored against."""

    entry: int
    question: str
    reference: str
    value: str | None = None  # the part of ``reference`` the question asks for (``Fact.value``)


def recall_scores(answers: list[dict]) -> dict:
    """Accuracy, key-term recall and exact share over scored answers (each with ``score_answer``'s fields)."""
    n = max(len(answers), 1)
    return {
        k: sum(a[f] for a in answers) / n
        for k, f in (("accuracy", "correct"), ("key_recall", "key_recall"), ("exact", "exact"))
    }


def heldout_accuracy(answers: list[dict], held_entries) -> float | None:
    """Accuracy over the answers about experiences held out of training (None where none are)."""
    held = [a["correct"] for a in answers if a["entry"] in held_entries]
    return sum(held) / len(held) if held else None


def recall(agents: dict[str, ChatModel], questions, max_tokens: int = 40, batch: int = 8) -> dict:
    """Each agent's answers to ``questions`` (:class:`RecallQuestion` or its fields as a tuple), scored by
    :func:`~ray_cartridges.scoring.score_answer` (on the fact's value where a fact has one)."""
    questions = [RecallQuestion(*q) for q in questions]
    out = {}
    for name, agent in agents.items():
        answers = []
        for s in range(0, len(questions), batch):
            chunk = questions[s : s + batch]
            comps = agent.complete(
                [[{"role": "user", "content": q.question}] for q in chunk], SamplingParams(max_tokens=max_tokens)
            )
            for q, c in zip(chunk, comps):
                sc = score_answer(c.text, q.reference, q.question, value=q.value)
                answers.append({**q._asdict(), "answer": c.text, **sc})
        out[name] = {**recall_scores(answers), "answers": answers}
    return out


def evaluate_cartridge(
    cartridge_dir: str | Path,
    dataset_jsonl: str | Path,
    memory: AgentMemory,
    *,
    eval_fraction: float,
    split_seed: int,
    max_questions: int = 30,
    max_tokens: int = 40,
    dtype: str = "fp32",
    unrelated_text: str | None = None,
    baselines: tuple[str, ...] = ("no_memory", "icl"),
    cache: dict | None = None,
    memory_context: MemoryContext | str | None = None,
    engine: str = "vllm",
    enforce_eager: bool = False,
) -> dict:
    """Fidelity on the held-out split of ``dataset_jsonl`` and recall on the memory's facts.

    ``memory_context``: the whole memory as the teacher and the ICL agent read it; by default what `generate`
    wrote beside the dataset (``memory_context.json`` for a memory laid out in turns, else ``memory.txt``, both
    in its ``memory_layout``, ``history_template`` and ``history_instructions``), else ``memory`` rendered with
    the default template. The no-harm ICL reference reads the memory's text (``memory.txt``) in both cases.
    ``baselines``: which of the no-memory and in-context (ICL) agents answer the recall questions beside the
    cartridge (a sweep over cartridges measures them once, not per cartridge). ``cache``: a dict shared by the
    evaluations of one sweep, so the readings that do not depend on the cartridge are made once.
    ``engine``: what answers the recall questions: ``vllm`` (the cartridge through vLLM's KV connector, the
    memory in context as a cached prefix) or the ``transformers`` reference (``enforce_eager``: vLLM without
    torch.compile). The KL figures are read by the
    transformers reference in both cases (vLLM's prompt logprobs do not read a cartridge's external KV).
    """
    mem = KVCacheMemory.from_dir(cartridge_dir, dtype=dtype)
    model, tok = mem.model, mem.tokenizer
    records = [json.loads(line) for line in Path(dataset_jsonl).read_text().splitlines() if line.strip()]
    memory_context, memory_text, context_source = _memory_context(Path(dataset_jsonl).parent, memory, memory_context)
    held_keys = heldout_keys([r["metadata"].get("split_key", "") for r in records], eval_fraction, split_seed)
    held = [r for r in records if r["metadata"].get("split_key", "") in held_keys]
    # the ICL gap is measured where the teacher had the memory: not on unrelated requests it answered bare
    held_mem = [r for r in held if r["metadata"].get("strategy") != GENERAL_STRATEGY]
    # against the teacher with the whole memory in context (the ICL agent's prompt), whatever part of it the
    # generating teacher read
    logger.info("evaluation 1/3: KL to the in-context teacher on %d held-out conversations", len(held_mem[:64]))
    fid = (
        fidelity(model, tok, mem.kv, held_mem[:64], mem.meta.student_system_prompt, cache, memory_context)
        if held_mem
        else {}
    )
    qs, reworded = _recall_questions(memory, max_questions)
    held_entries = {
        int(key.index)
        for key in (SplitKey.parse(r["metadata"].get("split_key", "")) for r in held)
        if key.kind == "entry"
    }
    names = [k for k in ("no_memory", "icl", "cartridge") if k in baselines or k == "cartridge"]
    logger.info(
        "evaluation 2/3: recall, %d + %d questions to %d agents (%s)", len(qs), len(reworded), len(names), engine
    )
    own = {} if cache is None else cache
    makers = _recall_agents(mem, memory, memory_context, engine, own, enforce_eager)
    rec, rec_reworded = _recall_both({k: makers[k]() for k in names}, qs, reworded, held_entries, engine, max_tokens)
    if cache is None and "vllm_engine" in own:  # this evaluation's own engine: ended here, not at exit
        own.pop("vllm_engine").shutdown()
    if unrelated_text is None:
        unrelated_text = bundled_data("unrelated.txt").read_text()
    logger.info("evaluation 3/3: perplexity of unrelated text with and without the cartridge (no harm)")
    harm = no_harm(model, tok, mem.kv, unrelated_text, memory_text, mem.meta.student_system_prompt, cache)
    return {
        "fidelity": fid,
        "recall": rec,
        "recall_heldout_phrasing": rec_reworded,
        "heldout_phrasing_questions": len(reworded) if rec_reworded else 0,
        "no_harm": harm,
        "heldout_entries": sorted(held_entries),
        "questions": len(qs),
        "memory_context": context_source,
    }


def _recall_questions(memory: AgentMemory, max_questions: int) -> tuple[list[RecallQuestion], list[RecallQuestion]]:
    """(the questions in the memory's own words, the held-out phrasings of its facts): where the memory has a
    facts file, its facts' questions and first held-out phrasings; otherwise the questions read from the memory,
    and no held-out phrasing."""
    facts = read_facts(memory.source)
    if facts is None:
        return memory_questions(memory)[:max_questions], []
    seen = [RecallQuestion(f.entry, f.question, f.answer, f.value) for f in facts if f.question]
    reworded = [RecallQuestion(f.entry, f.heldout[0], f.answer, f.value) for f in facts if f.heldout]
    return seen[:max_questions], reworded[:max_questions]


def _recall_both(agents: dict, qs, reworded, held_entries: set[int], engine: str, max_tokens: int):
    """(recall on the memory's own questions, each agent's also on the held-out entries' questions alone;
    recall on the held-out phrasings, or None without them). vLLM answers a question set in one batch."""
    batch = max(len(qs), 1) if engine == "vllm" else 8
    rec = recall(agents, qs, max_tokens=max_tokens, batch=batch) if qs else {}
    for name in rec:
        rec[name]["heldout_accuracy"] = heldout_accuracy(rec[name]["answers"], held_entries)
    return rec, (recall(agents, reworded, max_tokens=max_tokens, batch=batch) if reworded else None)


def _memory_context(
    data_dir: Path, memory: AgentMemory, given: MemoryContext | str | None
) -> tuple[MemoryContext, str, str]:
    """(the memory as the teacher read it, its text, where it came from): see :func:`evaluate_cartridge`."""
    text_file, turns_file = data_dir / "memory.txt", data_dir / "memory_context.json"
    text = text_file.read_text(encoding="utf-8") if text_file.is_file() else memory.render()
    if given is not None:
        ctx = MemoryContext.from_json(given) if isinstance(given, str) else given
        return ctx, ctx.system if isinstance(given, str) else text, "given"
    if turns_file.is_file():
        return MemoryContext.from_json(json.loads(turns_file.read_text(encoding="utf-8"))), text, str(turns_file)
    source = str(text_file) if text_file.is_file() else "the memory, default template"
    return MemoryContext.from_json(text), text, source


def _context_length(mem: KVCacheMemory, memory_context: MemoryContext, room: int = 512) -> int:
    """The engine context for the recall agents: the memory in context plus ``room`` for a question and its
    answer (at least 4096), within what the model was trained for."""
    need = len(chat_template_ids(mem.tokenizer, memory_context.conversation(""))) + room
    limit = getattr(mem.model.config, "max_position_embeddings", None) or need
    if need > limit:
        raise ValueError(
            f"the memory in context takes {need - room} tokens; with room for a question and answer that passes "
            f"the model's context of {limit} tokens: the in-context baseline cannot be measured with this model"
        )
    return fit_context(need, limit)


def _recall_agents(
    mem: KVCacheMemory,
    memory: AgentMemory,
    memory_context: MemoryContext,
    engine: str,
    cache: dict,
    enforce_eager: bool = False,
) -> dict:
    """Makers of the no-memory, in-context (the memory as the teacher read it) and cartridge agents."""
    from ..agent.history import HistoryAgent, HistoryAgentConfig

    model, tok, system = mem.model, mem.tokenizer, mem.meta.student_system_prompt

    def icl(**kw):
        agent = HistoryAgent(HistoryAgentConfig(checkpoint_dir=memory.source), **kw)
        agent.context = memory_context
        agent.system_prompt = memory_context.system
        return agent

    if engine == "transformers":
        return {
            "no_memory": lambda: ChatModel(model, tok, system),
            "icl": lambda: icl(model=model, tokenizer=tok),
            "cartridge": lambda: ChatModel(model, tok, system, prefix_kv=mem.kv),
        }
    if engine != "vllm":
        raise ValueError(f"engine must be 'vllm' or 'transformers', got {engine!r}")
    from ..vllm_cartridges import CartridgeLLM

    if "vllm_engine" not in cache:  # one engine for a whole sweep
        length = _context_length(mem, memory_context)
        cache["vllm_engine"] = CartridgeLLM(
            mem.meta.model_name, dtype=mem.config.dtype, max_model_len=length, enforce_eager=enforce_eager
        )
    eng = cache["vllm_engine"]
    cart = eng.add_cartridge(str(mem.dir), mem.dir)
    return {
        "no_memory": lambda: ChatModel(None, tok, system, engine=eng),
        "icl": lambda: icl(engine=eng),
        "cartridge": lambda: ChatModel(None, tok, system, engine=eng, cartridge=cart),
    }
