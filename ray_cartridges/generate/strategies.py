"""Prompt strategies: replay of the agent's own Observations, self-study questions, recitals of what each
experience taught, quiz questions about each sentence, and unrelated requests.

Each prompt is a :class:`~ray_cartridges.contracts.Prompt` (a JSON-serialisable dict, so it travels through Ray
Data unchanged). An unrelated request (``general/bare``) has no memory in ``context``: it is the student's own
system prompt (None where the student has none, and the teacher then gets no system message), so the teacher
reads exactly what the student reads.
"""

from __future__ import annotations

import hashlib
import random
import statistics

from ..config import GenerateConfig
from ..contracts import GENERAL_STRATEGY, Prompt, SplitKey
from ..fsutil import bundled_data
from ..memory import (
    DEFAULT_HISTORY_INSTRUCTIONS,
    DEFAULT_TEMPLATE,
    AgentMemory,
    section_title,
    unit_sentences,
    unit_text,
)

SEED_PROMPTS = {
    "structuring": [
        "Write one request asking to organise some of the facts above into a short list or table. Output only the request.",
        "Write one request asking to group related facts above by topic. Output only the request.",
    ],
    "summarization": [
        "Write one request asking for a brief summary of some of the experiences above. Output only the request.",
        "Write one request asking what was learned about one topic in the experiences above. Output only the request.",
    ],
    "question": [
        "Write one specific factual question that can be answered from the experiences above. Output only the question.",
        "Write one question about a name, number, place or time mentioned above. Output only the question.",
    ],
    "use_case": [
        "Imagine a colleague who needs one of the facts above to get a task done. Write the question they would ask. Output only the question.",
        "Write one practical question a newcomer would ask that the experiences above answer. Output only the question.",
    ],
    "creative": [
        "Write one creative request (a short poem, riddle or story) that must use a fact from above. Output only the request.",
    ],
}


# Replay sample s >= 1 of an Observation asks the same question in other words (sample 0 asks it verbatim), so
# several samples per Observation are distinct conversations even where the teacher context is the same.
# (A phrasing that claims forgetting, "I can't remember this one. {q}", made the bundled 135M teacher answer
# "You forgot to mention ..." instead of the fact: phrasings stay neutral.)
REPLAY_PHRASINGS = (
    "Quick question: {q}",
    "Could you tell me? {q}",
    "{q} Please answer in one sentence.",
    "Remind me, please: {q}",
    "From what you know: {q}",
)


def replay_user_turn(question: str, sample: int) -> str:
    """The user turn of replay sample ``sample`` of an Observation (0: the Observation itself)."""
    if sample == 0:
        return question
    return REPLAY_PHRASINGS[(sample - 1) % len(REPLAY_PHRASINGS)].format(q=question)


def _pid(*parts) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def render_context(memory: AgentMemory, cfg: GenerateConfig, groups=None, layout: str | None = None) -> str | dict:
    """The memory (or ``groups`` of it) as the teacher reads it: a system prompt string for the ``system``
    layout, else a :class:`MemoryContext` as JSON (see ``memory_layout``)."""
    entries = None if groups is None else [e for g in groups for e in g]
    ctx = memory.context(
        entries,
        layout=layout or cfg.memory_layout,
        template=cfg.history_template or DEFAULT_TEMPLATE,
        instructions=cfg.history_instructions or DEFAULT_HISTORY_INSTRUCTIONS,
    )
    return ctx.system if ctx.messages == (("system", ctx.system),) and not ctx.question_prefix else ctx.to_json()


def _window_around(i: int, k: int, n: int, rng: random.Random) -> tuple[int, int]:
    """[start, end) of a random window of min(k, n) consecutive experiences out of n that holds experience i."""
    k = min(k, n)
    start = rng.randint(max(0, i - k + 1), min(i, n - k))
    return start, start + k


def replay_prompts(memory: AgentMemory, cfg: GenerateConfig, rng: random.Random) -> list[Prompt]:
    rc = cfg.replay
    groups = memory.triples()
    full = render_context(memory, cfg)
    out = []
    for gi, group in enumerate(groups):
        obs = group[0]
        if memory.is_corpus or obs.type != "Observation":
            continue
        for s in range(rc.samples_per_observation):
            if rc.mode == "full_memory":
                ctx = full
            elif rc.mode == "exclude_current":
                ctx = render_context(memory, cfg, groups[:gi] + groups[gi + 1 :])
            elif rc.mode == "focused":  # window_k consecutive experiences, the current one among them
                start, end = _window_around(gi, rc.window_k, len(groups), rng)
                ctx = render_context(memory, cfg, groups[start:end])
            else:  # random_sampling: a random window of window_k other experiences
                others = [g for j, g in enumerate(groups) if j != gi]
                k = min(rc.window_k, len(others))
                start = rng.randrange(0, len(others) - k + 1)
                ctx = render_context(memory, cfg, others[start : start + k])
            out.append(
                {
                    "prompt_id": _pid("replay", rc.mode, gi, s, cfg.seed),
                    "strategy": f"replay/{rc.mode}",
                    "context": ctx,
                    "user": replay_user_turn(obs.content, s),
                    "split_key": str(
                        SplitKey("entry", str(gi))
                    ),  # every phrasing of one experience lands on the same side
                    "metadata": {"memory_entry": gi, "sample": s},
                }
            )
    return out


# Recital requests (recite.requests overrides), sample s of an experience asks request s: the phrasings after which
# the bundled teacher most often states the experience's Feedback (benchmarks/README.md, "Recital requests").
RECITE_REQUESTS = (
    "What did you find out in this experience? State the fact.",
    "What did you learn from this experience? State the facts in one sentence.",
    "What is the key fact you learned here? Answer in one sentence.",
)
# A corpus's sections are recited by name: {title} is the section's heading ("this passage" where it has none)
CORPUS_REQUESTS = (
    "What does the text say about {title}?",
    "Tell me the details of {title}: times, dates, numbers and names.",
    "What are the key facts about {title}?",
)


def recite_prompts(memory: AgentMemory, cfg: GenerateConfig, rng: random.Random) -> list[Prompt]:
    """For each experience (a corpus: each section): the teacher, reading it (in a window of recite.window_k
    units), says what it learned there (a corpus: what it says about the section, named by its heading). Unlike
    replay, this needs no question about the fact, so it covers every unit; its own split key kind
    (``recite-``) so the evaluation holds out a share of recitals independently of replay. With
    ``recite.answers: text`` the answer is the unit's own text, which the teacher reads rather than writes."""
    rc = cfg.recite
    requests = tuple(rc.requests or (CORPUS_REQUESTS if memory.is_corpus else RECITE_REQUESTS))
    groups = memory.triples()
    out = []
    for gi in range(len(groups)):
        for s in range(rc.samples_per_experience):
            start, end = _window_around(gi, rc.window_k, len(groups), rng)
            prompt: Prompt = {
                "prompt_id": _pid("recite", gi, s, rc.window_k, cfg.seed),
                "strategy": "recite/text" if rc.answers == "text" else "recite",
                "context": render_context(memory, cfg, groups[start:end]),
                "user": requests[s % len(requests)].replace("{title}", section_title(groups[gi])),
                "split_key": str(SplitKey("recite", str(gi))),
                "metadata": {"memory_entry": gi, "sample": s, "window": [start, end]},
            }
            if rc.answers == "text":
                prompt["answer"] = unit_text(groups[gi], memory.is_corpus)
            out.append(prompt)
    return out


# Worked examples the quiz's question writer continues: statements and a question, each asked in other words.
# (Kept apart from the development set's held-out phrasings: no "in charge of", "first opened", "dial", "begin".)
QUIZ_EXAMPLES = (
    ("The library opens at 9 am on weekdays.", "At what time does the library open on weekdays?"),
    ("Our landlord is called Peter Novak.", "Who is our landlord?"),
    ("Who cleans the kitchen on Fridays?", "On Fridays, whose job is it to clean the kitchen?"),
    ("The printer on the second floor uses toner cartridge TN-240.", "Which toner does the second-floor printer take?"),
)


def quiz_question_text(sentence: str) -> str:
    """The completion prompt the teacher continues with a question about ``sentence``."""
    shots = "".join(f"Sentence: {s}\nQuestion: {q}\n\n" for s, q in QUIZ_EXAMPLES)
    return f"{shots}Sentence: {sentence}\nQuestion:"


def quiz_prompts(memory: AgentMemory, cfg: GenerateConfig, rng: random.Random) -> list[Prompt]:
    """For each distinct sentence of the memory (the first unit that holds it): ``questions_per_sentence``
    questions the teacher writes by continuing :data:`QUIZ_EXAMPLES`, each answered by the teacher reading a
    random window of ``window_k`` units around that unit (``answers: text``: the sentence is the answer, which
    the teacher reads). Its own split key kind (``quiz-``), per unit."""
    qc = cfg.quiz
    groups = memory.triples()
    seen: set[str] = set()
    out = []
    for gi, group in enumerate(groups):
        for sentence in unit_sentences(group, memory.is_corpus, qc.min_chars):
            if sentence in seen:
                continue
            seen.add(sentence)
            for s in range(qc.questions_per_sentence):
                start, end = _window_around(gi, qc.window_k, len(groups), rng)
                out.append(
                    {
                        "prompt_id": _pid("quiz", sentence, s, qc.window_k, cfg.seed),
                        "strategy": "quiz/text" if qc.answers == "text" else "quiz/sentence",
                        "context": render_context(memory, cfg, groups[start:end]),
                        "user": None,
                        "question_text": quiz_question_text(sentence),
                        "question_temperature": qc.temperature,
                        "split_key": str(SplitKey("quiz", str(gi))),
                        "metadata": {"memory_entry": gi, "sentence": sentence, "sample": s, "window": [start, end]},
                    }
                )
                if qc.answers == "text":
                    out[-1]["answer"] = sentence
    return out


def self_study_prompts(memory: AgentMemory, cfg: GenerateConfig, rng: random.Random) -> list[Prompt]:
    sc = cfg.self_study
    groups = memory.triples()
    full = render_context(memory, cfg)
    out = []
    for i in range(sc.num_samples):
        family = sc.families[i % len(sc.families)]
        seed_prompt = rng.choice(SEED_PROMPTS[family])
        k = min(sc.chunk_experiences, len(groups))
        start = rng.randrange(0, len(groups) - k + 1)
        chunk_ctx = render_context(memory, cfg, groups[start : start + k])
        # the teacher writes the question reading the chunk in a system prompt, whatever the answers' layout
        question_ctx = render_context(memory, cfg, groups[start : start + k], layout="system")
        out.append(
            {
                "prompt_id": _pid("self_study", i, cfg.seed),
                "strategy": f"self_study/{family}",
                "context": chunk_ctx if sc.answer_context == "chunk" else full,
                "question_context": question_ctx,
                "seed_prompt": seed_prompt,
                "user": None,
                "split_key": str(SplitKey("chunk", f"{start}-{start + k}")),
                "metadata": {"family": family, "seed_prompt": seed_prompt, "chunk": [start, start + k]},
            }
        )
        if sc.answer_context == "chunk" and sc.targets == "full_memory":
            out[-1]["score_context"] = full
    return out


def general_requests(cfg: GenerateConfig) -> list[str]:
    """The unrelated requests (one per non-empty line of the configured or bundled file)."""
    from pathlib import Path

    path = Path(cfg.general.requests_file or bundled_data("general_requests.txt"))
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise ValueError(f"general.requests_file: cannot read {path}: {e}") from e
    if not lines:
        raise ValueError(f"general.requests_file: {path} has no requests (one per line)")
    return lines


def general_prompts(cfg: GenerateConfig) -> list[Prompt]:
    """Unrelated requests for the bare teacher: no memory, and the student's own system prompt (none by default),
    so the target is what the model says without any memory. Each request is its own split key."""
    if not cfg.general.num_samples:
        return []
    requests = general_requests(cfg)
    out = []
    for i in range(cfg.general.num_samples):
        j = i % len(requests)
        out.append(
            {
                "prompt_id": _pid("general", i, cfg.seed),
                "strategy": GENERAL_STRATEGY,
                "context": cfg.student_system_prompt or None,
                "user": requests[j],
                "split_key": str(SplitKey("general", str(j))),  # a request repeated lands on one side
                "metadata": {"request": j},
                **({"max_tokens": cfg.general.max_tokens} if cfg.general.max_tokens else {}),
            }
        )
    return out


def units_in_budget(memory: AgentMemory, tokens: int, tokenizer) -> int:
    """How many of the memory's units (experiences, corpus sections) hold about ``tokens`` tokens: the budget
    over the median unit's length in ``tokenizer``'s tokens, at least 1."""
    sizes = [len(tokenizer(unit_text(g, memory.is_corpus)).input_ids) for g in memory.triples()]
    return max(1, round(tokens / max(statistics.median(sizes), 1)))


def for_memory(cfg: GenerateConfig, memory: AgentMemory, tokenizer=None) -> GenerateConfig:
    """The config with the settings that follow the memory decided (``recite.enabled``, ``quiz.answers``: its kind;
    ``self_study.num_samples: auto``: its number of units; ``replay.window_k: auto``: its units' length in
    ``tokenizer``'s tokens, the teacher's by default), so that shard names see the concrete values."""
    update = {}
    if cfg.replay.window_k == "auto":
        if tokenizer is None:
            from ..models import load_tokenizer

            tokenizer = load_tokenizer(cfg.model_name)
        k = units_in_budget(memory, cfg.replay.window_tokens, tokenizer)
        update["replay"] = cfg.replay.model_copy(update={"window_k": k})
    if cfg.recite.enabled == "auto":
        update["recite"] = cfg.recite.model_copy(update={"enabled": memory.is_corpus})
    if cfg.quiz.answers == "auto":
        update["quiz"] = cfg.quiz.model_copy(update={"answers": "text" if memory.is_corpus else "teacher"})
    if cfg.self_study.num_samples == "auto":
        n = round(cfg.self_study.per_unit * len(memory.triples()))
        update["self_study"] = cfg.self_study.model_copy(update={"num_samples": n})
    return cfg.model_copy(update=update) if update else cfg


def build_prompts(memory: AgentMemory, cfg: GenerateConfig) -> list[Prompt]:
    """All prompts of a run, in a reproducible order (a function of the memory and the config)."""
    cfg = for_memory(cfg, memory)
    rng = random.Random(cfg.seed)
    prompts = []
    if cfg.replay.enabled:
        prompts += replay_prompts(memory, cfg, rng)
    if cfg.self_study.enabled:
        prompts += self_study_prompts(memory, cfg, rng)
    if cfg.recite.enabled:  # after the others: enabling it leaves their random windows and questions as they were
        prompts += recite_prompts(memory, cfg, rng)
    if cfg.quiz.enabled:
        prompts += quiz_prompts(memory, cfg, rng)
    prompts += general_prompts(cfg)
    random.Random(cfg.seed + 1).shuffle(prompts)
    if cfg.max_samples:
        prompts = prompts[: cfg.max_samples]
    if not prompts:
        raise ValueError(f"{memory.source}: the configured strategies produce no prompts")
    return prompts
