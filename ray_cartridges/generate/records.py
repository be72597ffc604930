"""Build seed-format conversation records (``type: memory_distillation``) from teacher outputs."""

from __future__ import annotations

from ..contracts import TeacherRecord


def logprob_entry(tokenizer, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict:
    """One OpenAI-style logprob entry that also carries exact token ids (never mapped back from strings)."""
    return {
        "token": tokenizer.convert_ids_to_tokens(int(token_id)),
        "token_id": int(token_id),
        "logprob": float(logprob),
        "top_logprobs": [
            {"token": tokenizer.convert_ids_to_tokens(int(t)), "token_id": int(t), "logprob": float(lp)}
            for t, lp in top
        ],
    }


def make_record(
    tokenizer,
    *,
    context: str | dict | None,
    user: str,
    answer_ids: list[int],
    entries: list[dict],
    metadata: dict,
) -> TeacherRecord:
    """``context``: what the teacher read before ``user`` (see :func:`.teacher.chat_ids`; None: no system message).
    A memory laid out in chat turns (not only a system prompt) is kept whole in ``teacher_messages``."""
    from ..memory import MemoryContext

    ctx = MemoryContext.from_json(context)
    system_prompt = ctx.system
    text = tokenizer.decode(answer_ids, skip_special_tokens=True)
    system = (
        []
        if system_prompt is None
        else [{"role": "system", "content": system_prompt, "token_ids": None, "logprobs": None}]
    )
    rec = {
        "messages": [
            *system,
            {"role": "user", "content": user, "token_ids": None, "logprobs": None},
            {
                "role": "assistant",
                "content": text,
                "token_ids": list(map(int, answer_ids)),
                "logprobs": {"content": entries},
            },
        ],
        "system_prompt": system_prompt,
        "metadata": metadata,
        "type": "memory_distillation",
    }
    if not isinstance(context, str | None):
        rec["teacher_messages"] = ctx.conversation(user)
    return rec
