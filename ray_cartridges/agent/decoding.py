"""Batched decoding with an optional KV prefix (a cartridge) shared by every row of the batch.

The prefix is given per layer as (K, V) of shape [H, p, D] and stored once per agent; the decoding cache of
a batch holds B copies of it (transformers' DynamicCache materialises the rows), which for p = 128 is small
next to the conversations themselves. Prompts are left-padded; explicit position ids start every prompt at position p, as
in training, whatever its padding. Returns exact token ids and, on request, top-k logprobs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..contracts import SamplingParams


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    logprobs: list[dict] | None = None  # per token: {token_id, logprob, top: [(id, logprob)]}
    prompt_tokens: int = 0
    ttft_s: float = 0.0
    cartridge_tokens_loaded: int | None = None  # vLLM engine: placeholder tokens read from the cartridge file


def place_kv(model, prefix_kv):
    """The per-layer (K, V) on the model's device and in its dtype (a no-op where they already are)."""
    w = next(model.parameters())
    return [(k.to(w.device, w.dtype), v.to(w.device, w.dtype)) for k, v in prefix_kv]


def build_cache(model, prefix_kv, batch: int):
    from transformers import DynamicCache

    if prefix_kv is None:
        return None
    return DynamicCache(
        ddp_cache_data=[
            (k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1))
            for k, v in place_kv(model, prefix_kv)
        ],
        config=model.config,
    )


def sample_next(logits: torch.Tensor, sp: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if sp.logit_bias:
        logits = logits.clone()
        for t, b in sp.logit_bias.items():
            logits[:, t] += b
    if sp.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sp.temperature, -1)
    if sp.top_p < 1:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > sp.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)


def _left_padded(prompts: list[list[int]], pad: int, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask over prefix + prompt, position ids starting at ``p``) of left-padded rows."""
    B, T = len(prompts), max(map(len, prompts))
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, p + T), dtype=torch.long)
    mask[:, :p] = 1
    pos = torch.zeros((B, T), dtype=torch.long)
    for i, pr in enumerate(prompts):
        n = len(pr)
        ids[i, T - n :] = torch.tensor(pr)
        mask[i, p + T - n :] = 1
        pos[i, T - n :] = torch.arange(p, p + n)
    return ids, mask, pos


class _Rows:
    """What each row of a batch has produced so far, and whether (and why) it is done."""

    def __init__(self, tokenizer, sp: SamplingParams, n: int):
        self.tokenizer, self.sp = tokenizer, sp
        self.toks: list[list[int]] = [[] for _ in range(n)]
        self.lps: list[list[dict]] = [[] for _ in range(n)]
        self.done = [False] * n
        self.finish = ["length"] * n

    def add(self, i: int, t: int, logp: torch.Tensor | None, on_token) -> None:
        if t == self.tokenizer.eos_token_id:
            self.done[i], self.finish[i] = True, "stop"
            return
        self.toks[i].append(t)
        if logp is not None:
            top = torch.topk(logp[i], self.sp.top_logprobs)
            entry = {"token_id": t, "logprob": float(logp[i, t])}
            self.lps[i].append({**entry, "top": list(zip(top.indices.tolist(), top.values.tolist()))})
        if on_token is not None:
            on_token(i, t)
        if self.sp.stop:
            text = self.tokenizer.decode(self.toks[i], skip_special_tokens=True)
            if any(s in text for s in self.sp.stop):
                self.done[i], self.finish[i] = True, "stop"

    def completion(self, i: int, prompt_len: int, ttft: float) -> Completion:
        text = self.tokenizer.decode(self.toks[i], skip_special_tokens=True)
        for s in self.sp.stop:
            if s in text:
                text = text[: text.index(s)]
        lps = self.lps[i] if self.sp.top_logprobs else None
        return Completion(self.toks[i], text, self.finish[i], lps, prompt_len, ttft)


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[list[int]], sp: SamplingParams, prefix_kv=None, on_token=None
) -> list[Completion]:
    """Decode a batch of prompts (token ids) after an optional shared prefix.

    ``on_token(row, token_id)`` is called as tokens are produced (for streaming).
    """
    B = len(prompts)
    p = 0 if prefix_kv is None else prefix_kv[0][0].shape[1]
    dev = next(model.parameters()).device
    ids, mask, pos = (x.to(dev) for x in _left_padded(prompts, tokenizer.pad_token_id, p))
    cache = build_cache(model, prefix_kv, B)
    gen = torch.Generator(device=dev).manual_seed(sp.seed) if sp.seed is not None else None
    t0 = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    next_pos = pos[:, -1] + 1
    ttft = 0.0
    rows = _Rows(tokenizer, sp, B)
    for step in range(sp.max_tokens):
        nxt = sample_next(logits, sp, gen)
        if step == 0:
            ttft = time.perf_counter() - t0
        logp = torch.log_softmax(logits.float(), -1) if sp.top_logprobs else None
        for i in range(B):
            if not rows.done[i]:
                rows.add(i, int(nxt[i]), logp, on_token)
        if all(rows.done):
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long, device=dev)], 1)
        out = model(
            input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None], past_key_values=cache,
            use_cache=True,
        )  # fmt: skip
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    return [rows.completion(i, len(prompts[i]), ttft) for i in range(B)]
