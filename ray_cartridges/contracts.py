"""The records that pass between stages, in one module that knows no engine: prompts, teacher records, split
keys, sampling settings and why a prompt produced no row.

A split key groups the rows that must land on the same side of the train/held-out split (every phrasing of one
experience, every answer of one self-study chunk). It is written into each record's metadata as
``<kind>-<index>``; the split holds out a share of each kind separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired, TypedDict

# the strategy of rows the teacher answered with no memory (evaluation leaves them out of the ICL gap)
GENERAL_STRATEGY = "general/bare"


def strategy_family(strategy: str) -> str:
    """The family of a ``family/variant`` strategy name (``replay/focused`` -> ``replay``)."""
    return strategy.split("/", 1)[0]


@dataclass(frozen=True)
class SplitKey:
    """``kind``: entry (a replayed experience), recite, quiz, chunk (a self-study chunk) or general;
    ``index``: which one of that kind (a chunk's is its ``start-end``)."""

    kind: str
    index: str

    def __str__(self) -> str:
        return f"{self.kind}-{self.index}"

    @classmethod
    def parse(cls, text: str) -> SplitKey:
        kind, _, index = text.partition("-")
        return cls(kind, index)


@dataclass
class SamplingParams:
    """How one engine call samples (the teacher's answers and questions, the agents' and the server's replies)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0  # logprobs kept per generated token (the teacher's top-k)
    seed: int | None = None
    logit_bias: dict[int, float] | None = None  # added to the logits before sampling (OpenAI's logit_bias)


class Prompt(TypedDict):
    """One prompt for the teacher, as the strategies build it (JSON-serialisable: it travels through Ray)."""

    prompt_id: str
    strategy: str  # family/variant, e.g. replay/focused, self_study/fact, recite, general/bare
    context: str | dict | None  # the teacher's memory: a system prompt, a MemoryContext as JSON, or none
    user: str | None  # the question; None where self-study has the teacher write it first
    split_key: str  # str(SplitKey): the rows that land on one side of the held-out split together
    metadata: dict[str, Any]
    question_context: NotRequired[str]  # self-study: what the question writer reads
    seed_prompt: NotRequired[str]  # self-study: the instruction the question is written from
    question_text: NotRequired[str]  # quiz: a plain-text prompt (no chat template) the question continues
    question_temperature: NotRequired[float]  # this prompt's own question sampling temperature
    score_context: NotRequired[str]  # where another teacher (the whole memory) reads the answer's targets
    max_tokens: NotRequired[int]  # this prompt's own answer length
    answer: NotRequired[str]  # a given answer the teacher reads (teacher forcing) instead of writing one


class TeacherMessage(TypedDict):
    role: str
    content: str
    token_ids: list[int] | None  # the answer's exact ids (the assistant turn; None elsewhere)
    logprobs: dict | None  # the answer's OpenAI-style {"content": [{token, logprob, top_logprobs}, ...]}


class TeacherRecord(TypedDict):
    """One answered prompt, in the seed workflow's JSONL format (``dataset.jsonl`` and the shards' ``.jsonl``)."""

    messages: list[TeacherMessage]  # system (the memory, where the layout puts it there), question, answer
    metadata: dict[str, Any]  # prompt_id, strategy, split_key, sampling, prompt_key, and the checkpoint's names
    teacher_messages: NotRequired[list[dict]]  # the teacher's whole prompt where its memory was laid out in turns


@dataclass(frozen=True)
class Rejection:
    """A prompt that produced no training row, and why: ``no_question`` (self-study: the teacher wrote no
    usable question) or ``conversion`` (the record could not become a flat top-k row)."""

    prompt_id: str
    reason: Literal["no_question", "conversion"]
    detail: str

    def __str__(self) -> str:
        return f"prompt {self.prompt_id}: {self.detail}"
