"""OpenAI chat-completions protocol: the request we accept, responses as the ``openai`` package's own types.

Accepted as the OpenAI API accepts them: ``content`` as a string or a list of text parts, the ``developer``
role (read as a system message). Refused with a 4xx: anything that is not valid UTF-8 text (a lone surrogate),
a seed outside 64 bits, options this server does not implement with a different value (``n`` > 1).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionTokenLogprob
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_message import ChatCompletionMessage
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64 = 2**63


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _utf8(cls, v):
        text = v if isinstance(v, str) else "".join(p.text for p in v)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"content is not valid UTF-8 text ({err.reason} at {err.start})") from None
        return v

    def as_dict(self) -> dict:
        """The message as the chat template reads it (developer messages are system messages)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI options are ignored, as OpenAI-compatible servers do
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int = Field(1, ge=1, le=1)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    logit_bias: dict[int, float] | None = Field(None, description="token id -> bias in [-100, 100]")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v and any(not -100 <= b <= 100 for b in v.values()):
            raise ValueError("logit_bias values must lie in [-100, 100]")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable-character table (GPT-2 and its descendants)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_decoder()


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The UTF-8 bytes a token stands for (a byte-level BPE piece may be part of one character)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is not None and piece not in tokenizer.all_special_tokens and all(ch in _BYTES for ch in piece):
        return [_BYTES[ch] for ch in piece]
    return list(tokenizer.decode([token_id]).encode("utf-8"))


def token_logprobs(tokenizer, entries: list[dict] | None) -> list[ChatCompletionTokenLogprob] | None:
    """Per answer token: its logprob and the top alternatives (entries as engine.to_completion makes them)."""
    if entries is None:
        return None

    def text(t: int) -> str:
        return tokenizer.decode([t])

    return [
        ChatCompletionTokenLogprob(
            token=text(e["token_id"]),
            logprob=e["logprob"],
            bytes=token_bytes(tokenizer, e["token_id"]),
            top_logprobs=[TopLogprob(token=text(t), logprob=lp, bytes=token_bytes(tokenizer, t)) for t, lp in e["top"]],
        )
        for e in entries
    ]


def completion_response(
    cid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int, logprobs=None
) -> ChatCompletion:
    return ChatCompletion(
        id=cid,
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[
            Choice(
                index=0,
                message=ChatCompletionMessage(role="assistant", content=text),
                finish_reason=finish,
                logprobs=ChoiceLogprobs(content=logprobs) if logprobs is not None else None,
            )
        ],
        usage=CompletionUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


def chunk(
    cid: str, model: str, content: str | None = None, finish: str | None = None, role: bool = False, logprobs=None
) -> ChatCompletionChunk:
    delta = ChoiceDelta(role="assistant" if role else None, content=content)
    return ChatCompletionChunk(
        id=cid,
        object="chat.completion.chunk",
        created=int(time.time()),
        model=model,
        choices=[
            ChunkChoice(
                index=0,
                delta=delta,
                finish_reason=finish,
                logprobs=ChunkLogprobs(content=logprobs) if logprobs else None,
            )
        ],
    )


def sse(event: BaseModel | dict) -> str:
    """One server-sent event of a stream."""
    import json

    body = event.model_dump_json(exclude_none=True) if isinstance(event, BaseModel) else json.dumps(event)
    return f"data: {body}\n\n"
