"""Teacher engines behind one interface: prompt token ids in, answer token ids + logprob entries out.

``VLLMEngine`` is the production engine (vLLM's CPU build here, CUDA on GPUs; prefix caching on).
``HFEngine`` is the transformers reference (parity tests, fallback). Both return exact token ids
from the engine, never strings mapped back.
"""

from __future__ import annotations

import copy
import hashlib

import torch

from ..agent.decoding import sample_next
from ..contracts import SamplingParams
from ..engine_env import vllm_engine_args
from .records import logprob_entry


def request_seed(base_seed: int, key: str) -> int:
    """Per-request seed: sampled outputs do not depend on how requests are batched (resume-safe)."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{key}".encode()).digest()[:4], "big")


def _vllm_entry(tokenizer, token_id: int, logprobs: dict, k: int) -> dict:
    """The entry of one position from vLLM's {token_id: Logprob} (its top-k plus the token there)."""
    top = sorted(((t, lp.logprob) for t, lp in logprobs.items()), key=lambda x: -x[1])[:k]
    return logprob_entry(tokenizer, token_id, logprobs[token_id].logprob, top)


def _torch_entry(tokenizer, token_id: int, logprobs: torch.Tensor, k: int) -> dict:
    """The entry of one position from a [V] log-softmax row."""
    top = torch.topk(logprobs, k)
    return logprob_entry(
        tokenizer, token_id, float(logprobs[token_id]), list(zip(top.indices.tolist(), top.values.tolist()))
    )


class VLLMEngine:
    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "bf16",
        max_model_len: int = 4096,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        enforce_eager: bool = False,
        block_size: int | None = None,
    ):
        from vllm import LLM

        self.llm = LLM(
            **vllm_engine_args(
                model_path,
                dtype=dtype,
                max_model_len=max_model_len,
                seed=seed,
                enforce_eager=enforce_eager,
                block_size=block_size,
                tensor_parallel_size=tensor_parallel_size,
            )
        )
        self.tokenizer = self.llm.get_tokenizer()

    def complete(
        self, prompts: list[list[int]], sampling: SamplingParams, seeds: list[int]
    ) -> list[tuple[list[int], list[dict]]]:
        import vllm
        from vllm.inputs import TokensPrompt

        params = [
            vllm.SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                logprobs=sampling.top_logprobs,
                seed=s,
            )
            for s in seeds
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            # c.logprobs[j]: {token_id: Logprob}, the top-k plus the sampled token
            entries = [
                _vllm_entry(self.tokenizer, tid, c.logprobs[j], sampling.top_logprobs)
                for j, tid in enumerate(c.token_ids)
            ]
            results.append((list(c.token_ids), entries))
        return results

    def score(self, prompts: list[list[int]], answers: list[list[int]], top_logprobs: int) -> list[list[dict]]:
        """Logprob entries of each answer read after its prompt (teacher forcing): the top ``top_logprobs`` and
        the answer's own token at every answer position, from vLLM's prompt logprobs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=top_logprobs)
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p) + list(a)) for p, a in zip(prompts, answers)],
            params,
            use_tqdm=False,
        )
        # o.prompt_logprobs[i]: {token_id: Logprob} at prompt position i, the top-k plus the token read there
        return [
            [_vllm_entry(self.tokenizer, tid, o.prompt_logprobs[len(p) + j], top_logprobs) for j, tid in enumerate(a)]
            for o, p, a in zip(outs, prompts, answers)
        ]


class HFEngine:
    """transformers reference: one request at a time, KV of the longest shared prompt prefix reused."""

    def __init__(self, model, tokenizer, min_shared_prefix: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = {tokenizer.eos_token_id}
        self.min_shared_prefix = min_shared_prefix
        self._cached: tuple[list[int], object] | None = None

    @classmethod
    def load(cls, model_name: str, dtype: str = "fp32"):
        from ..models import load_model, load_tokenizer

        return cls(load_model(model_name, dtype), load_tokenizer(model_name))

    def _prefill(self, ids: list[int], reuse_at_most: int | None = None):
        """The model's output on ``ids``, reusing the KV of the longest prefix shared with the last call (at most
        ``reuse_at_most`` tokens); returns (output over the tokens not reused, number reused)."""
        n = 0
        limit = len(ids) - 1 if reuse_at_most is None else min(len(ids) - 1, reuse_at_most)
        if self._cached is not None:
            prev = self._cached[0]
            while n < min(len(prev), limit) and prev[n] == ids[n]:
                n += 1
        if n >= self.min_shared_prefix:
            cache = copy.deepcopy(self._cached[1])
            cache.crop(n - cache.get_seq_length())  # a negative count: remove that many tokens from the end
        else:
            n, cache = 0, None
        out = self.model(input_ids=torch.tensor([ids[n:]]), past_key_values=cache, use_cache=True)
        # kept uncopied: a caller that decodes on appends to it, which leaves its first len(ids) positions as they are
        self._cached = (list(ids), out.past_key_values)
        return out, n

    @torch.no_grad()
    def complete_one(self, ids: list[int], sampling: SamplingParams, seed: int) -> tuple[list[int], list[dict]]:
        gen = torch.Generator().manual_seed(seed)
        rule = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p)
        out, _ = self._prefill(ids)
        cache, logits = out.past_key_values, out.logits[0, -1]
        answer, entries = [], []
        for _ in range(sampling.max_tokens):
            lp = torch.log_softmax(logits.float(), dim=-1)  # [V]
            tok = int(sample_next(lp[None], rule, gen)[0])  # the agent's sampling rule, one implementation
            entries.append(_torch_entry(self.tokenizer, tok, lp, sampling.top_logprobs))
            answer.append(tok)
            if tok in self.stop_ids:
                break
            out = self.model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[0, -1]
        return answer, entries

    def complete(
        self, prompts: list[list[int]], sampling: SamplingParams, seeds: list[int]
    ) -> list[tuple[list[int], list[dict]]]:
        return [self.complete_one(p, sampling, s) for p, s in zip(prompts, seeds)]

    @torch.no_grad()
    def score(self, prompts: list[list[int]], answers: list[list[int]], top_logprobs: int) -> list[list[dict]]:
        """As :meth:`VLLMEngine.score`: each answer read after its prompt, its logprob entries."""
        results = []
        for p, a in zip(prompts, answers):
            out, n = self._prefill(list(p) + list(a), reuse_at_most=len(p) - 1)
            lp = torch.log_softmax(out.logits[0, len(p) - 1 - n : len(p) + len(a) - 1 - n].float(), dim=-1)
            results.append([_torch_entry(self.tokenizer, t, lp[j], top_logprobs) for j, t in enumerate(a)])
        return results
