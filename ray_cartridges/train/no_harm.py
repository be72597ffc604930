"""The no-harm term: on general text, the cartridge-reading model is taught by the bare model (adapter off),
so the cartridge does not change answers to requests that have nothing to do with the memory."""

from __future__ import annotations

import torch

from ..chat import chat_template_ids

# user turns of the chat-formatted no-harm chunks: requests that have nothing to do with any memory
GENERAL_REQUESTS = (
    "Tell me about something you find interesting.",
    "Write a short paragraph on any topic.",
    "Explain something from science or history.",
    "Can you describe how something works?",
)


def no_harm_chunks(
    tok, text: str | None, n: int, fmt: str = "raw", system_prompt: str | None = None
) -> list[list[int]]:
    """The general text cut into chunks of ``n`` tokens (the last partial chunk is dropped).

    ``fmt``: ``raw`` the chunks as they are; ``chat`` each chunk as the assistant's answer to an unrelated
    request, in the chat template the agent uses; ``both`` a raw and a chat version of every chunk, alternating.
    """
    if not text:
        return []
    ids = tok(text).input_ids
    raw = [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)]
    if fmt == "raw":
        return raw
    chat = []
    for i, chunk in enumerate(raw):
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        msgs += [
            {"role": "user", "content": GENERAL_REQUESTS[i % len(GENERAL_REQUESTS)]},
            {"role": "assistant", "content": tok.decode(chunk)},
        ]
        chat.append(chat_template_ids(tok, msgs, add_generation_prompt=False))
    return chat if fmt == "chat" else [c for pair in zip(raw, chat) for c in pair]


class NoHarmTargets:
    """(input ids, teacher top-k ids, teacher top-k logprobs) of each no-harm chunk, the teacher being the bare
    model (the adapter disabled); each chunk's computed when first asked for and kept (the model is frozen and
    the text fixed, so they never change)."""

    def __init__(self, peft_model, chunks: list[list[int]], device, top_k: int, autocast):
        self.model, self.chunks, self.device, self.top_k, self.autocast = peft_model, chunks, device, top_k, autocast
        self.cache: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.chunks)

    @torch.no_grad()
    def get(self, i: int) -> tuple:
        if i not in self.cache:
            x = torch.tensor([self.chunks[i]], device=self.device)
            with self.model.disable_adapter(), self.autocast():
                base = torch.log_softmax(self.model(input_ids=x, use_cache=False).logits[0, :-1].float(), -1)
            top_lp, top_ids = base.topk(self.top_k, dim=-1)
            self.cache[i] = (x, top_ids, top_lp)
        return self.cache[i]

    def compute_all(self) -> None:
        for i in range(len(self.chunks)):
            self.get(i)
