"""Reference teacher engine on transformers (the fallback and parity reference; vLLM is the production engine).

Answers with the top-k logprobs of every answer token, in the seed record format. The memory-bearing
system prompt is the shared prefix of every prompt: it is prefilled once and its KV cache reused.
"""

from __future__ import annotations

import copy

import torch

from .records import logprob_entry, make_record


class HFTeacher:
    def __init__(
        self, model, tokenizer, *, top_logprobs: int = 20, max_tokens: int = 64, temperature: float = 0.0, seed: int = 0
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.top_logprobs = top_logprobs
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.gen = torch.Generator().manual_seed(seed)
        self.stop_ids = {tokenizer.eos_token_id}
        self._prefix: tuple[list[int], object] | None = None

    def prompt_ids(self, system_prompt: str, user: str) -> list[int]:
        msgs = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
        return list(
            self.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
        )

    def _cached_prefix(self, ids: list[int], system_prompt: str):
        """(n, cache) for the longest cached prefix of ``ids``: the system message, computed once."""
        sys_ids = list(
            self.tokenizer.apply_chat_template(
                [{"role": "system", "content": system_prompt}], tokenize=True, return_dict=False
            )
        )
        n = len(sys_ids) if ids[: len(sys_ids)] == sys_ids else 0
        if n == 0:
            return 0, None
        if self._prefix is None or self._prefix[0] != sys_ids:
            out = self.model(input_ids=torch.tensor([sys_ids]), use_cache=True)
            self._prefix = (sys_ids, out.past_key_values)
        return n, copy.deepcopy(self._prefix[1])

    @torch.no_grad()
    def answer(self, system_prompt: str, user: str) -> tuple[list[int], list[dict]]:
        """Decode one answer; returns (answer token ids incl. the stop token, logprob entries)."""
        ids = self.prompt_ids(system_prompt, user)
        n, cache = self._cached_prefix(ids, system_prompt)
        out = self.model(input_ids=torch.tensor([ids[n:]]), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[0, -1]
        answer, entries = [], []
        for _ in range(self.max_tokens):
            lp = torch.log_softmax(logits.float(), dim=-1)  # [V]
            if self.temperature > 0:
                tok = int(torch.multinomial((lp / self.temperature).softmax(-1), 1, generator=self.gen))
            else:
                tok = int(lp.argmax())
            top = torch.topk(lp, self.top_logprobs)
            entries.append(
                logprob_entry(self.tokenizer, tok, float(lp[tok]), list(zip(top.indices.tolist(), top.values.tolist())))
            )
            answer.append(tok)
            if tok in self.stop_ids:
                break
            out = self.model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[0, -1]
        return answer, entries

    def records(self, system_prompt: str, prompts: list[tuple[str, dict]]) -> list[dict]:
        """Answer each (user prompt, metadata) with ``system_prompt`` as context; seed-format records."""
        out = []
        for user, meta in prompts:
            answer, entries = self.answer(system_prompt, user)
            meta = copy.deepcopy(meta)
            meta.setdefault("teacher_engine", "transformers")
            meta.setdefault("sampling", {"temperature": self.temperature, "max_tokens": self.max_tokens})
            out.append(
                make_record(
                    self.tokenizer,
                    system_prompt=system_prompt,
                    user=user,
                    answer_ids=answer,
                    entries=entries,
                    metadata=meta,
                )
            )
        return out
