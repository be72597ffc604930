"""Replica-side serving logic, independent of HTTP: cartridges on one shared frozen model, batched decoding."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from ..agent.base import ChatModel
from ..agent.decoding import Completion, SamplingParams, place_kv
from ..agent.kv_memory import KVArtifact, KVCacheMemory, KVCacheMemoryConfig
from ..cartridge import read_meta
from ..models import load_model, load_tokenizer
from .config import ServeConfig


class UnknownModel(KeyError):
    pass


class RequestTooLarge(ValueError):
    pass


def artifact_of(ref: str) -> KVArtifact:
    if ref.startswith("hf://"):
        return KVArtifact(ref[len("hf://") :], source="huggingface")
    return KVArtifact(ref, source="local")


class CartridgeEngine:
    """One frozen model per replica; cartridges are loaded on demand and kept in a bounded LRU."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        if not cfg.cartridges:
            raise ValueError("serve config: `cartridges` is empty")
        first = artifact_of(next(iter(cfg.cartridges.values()))).local_dir()
        base = cfg.base_model or read_meta(first).model_name
        self.device = cfg.device if cfg.device != "auto" else ("cuda" if cfg.num_gpus_per_replica > 0 else "cpu")
        self.model = load_model(base, cfg.dtype, self.device)
        self.tokenizer = load_tokenizer(base)
        self.base = base
        self._cache: OrderedDict[str, ChatModel] = OrderedDict()
        self._lock = threading.Lock()  # one forward pass at a time per replica (torch uses all cores)

    def models(self) -> list[str]:
        return list(self.cfg.cartridges)

    def load(self, name: str) -> ChatModel:
        if name not in self.cfg.cartridges:
            raise UnknownModel(name)
        if name in self._cache:  # Serve multiplexing keeps its own LRU above this one
            self._cache.move_to_end(name)
            return self._cache[name]
        mem = KVCacheMemory(
            KVCacheMemoryConfig(artifact_of(self.cfg.cartridges[name]), model_name=self.base, dtype=self.cfg.dtype),
            model=self.model,
            tokenizer=self.tokenizer,
        )
        kv = place_kv(self.model, mem.kv)  # once per cartridge, not per request

        class _Agent(ChatModel):
            def prefix_kv(self):
                return kv

        agent = _Agent(self.model, self.tokenizer, mem.meta.student_system_prompt)
        agent.cartridge_bytes = mem.nbytes()
        self._cache[name] = agent
        while len(self._cache) > self.cfg.max_cartridges_per_replica:
            self._cache.popitem(last=False)
        return agent

    def check_request(self, agent: ChatModel, messages: list[dict], max_tokens: int) -> list[int]:
        lim = self.cfg.limits
        if len(messages) > lim.max_messages:
            raise RequestTooLarge(f"{len(messages)} messages; at most {lim.max_messages} are accepted")
        if max_tokens > lim.max_tokens:
            raise RequestTooLarge(f"max_tokens={max_tokens} exceeds the limit of {lim.max_tokens}")
        ids = agent.prompt_ids(messages)
        if len(ids) + max_tokens > lim.max_context_tokens:
            raise RequestTooLarge(
                f"prompt of {len(ids)} tokens + max_tokens={max_tokens} exceeds the context limit of {lim.max_context_tokens}"
            )
        return ids

    def complete_many(
        self, agent: ChatModel, conversations: list[list[dict]], sampling: list[SamplingParams], on_token=None
    ) -> list[Completion]:
        """Decode several conversations of one cartridge; requests with equal sampling share one batch."""
        results: list[Completion | None] = [None] * len(conversations)
        groups: dict[tuple, list[int]] = {}
        for i, sp in enumerate(sampling):
            key = (sp.temperature, sp.top_p, tuple(sp.stop), sp.top_logprobs, sp.seed)
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            max_tok = max(sampling[i].max_tokens for i in idx)
            sp = sampling[idx[0]]
            sp = SamplingParams(sp.temperature, sp.top_p, max_tok, sp.stop, sp.top_logprobs, sp.seed)
            with self._lock:
                outs = agent.complete([conversations[i] for i in idx], sp, on_token=on_token)
            for i, o in zip(idx, outs):
                cap = sampling[i].max_tokens
                if len(o.token_ids) > cap:  # a shorter request batched with a longer one
                    o = Completion(
                        o.token_ids[:cap],
                        self.tokenizer.decode(o.token_ids[:cap], skip_special_tokens=True),
                        "length",
                        o.logprobs[:cap] if o.logprobs else o.logprobs,
                        o.prompt_tokens,
                        o.ttft_s,
                    )
                results[i] = o
        return results


def torch_threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(
        max(1, int(num_cpus)) if os.environ.get("OMP_NUM_THREADS", "1") == "1" else int(os.environ["OMP_NUM_THREADS"])
    )
