"""Cartridges on vLLM's engine: any number of cartridges per engine, requests of many in one continuous batch.

``CartridgeLLM`` wraps a synchronous ``vllm.LLM`` (batch use, evaluation, the agent); ``AsyncCartridgeEngine``
an ``AsyncLLM`` (the Serve app). Both register cartridge directories (checked against the model: layers, kv
heads, head_dim, vocab, tokenizer) and turn (cartridge, conversation ids) into a vLLM request whose prompt
is p placeholder ids + the conversation, whose ``cache_salt`` names the cartridge and its content hash (two
cartridges' identical placeholder blocks never meet in the prefix cache) and whose ``kv_transfer_params``
tell :mod:`.connector` which file to read. A placeholder prompt is built only together with its cartridge.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from ..agent.decoding import Completion, SamplingParams
from ..cartridge import CartridgeMeta, check_compatible, read_meta
from ..engine_env import vllm_engine_args
from ..fsutil import file_hash
from .connector import CartridgeParams, adapter_file, connector_config

PLACEHOLDER_ID = 0  # never embedded: the connector supplies these positions' K/V


class UnknownCartridge(KeyError):
    """A request named a cartridge the engine does not hold."""


@dataclass(frozen=True)
class LoadedCartridge:
    name: str
    dir: Path
    meta: CartridgeMeta
    params: CartridgeParams

    @property
    def num_tokens(self) -> int:
        return self.params.num_tokens

    @property
    def cache_salt(self) -> str:
        return f"cartridge:{self.name}:{self.params.sha256}"


@dataclass
class EngineStats:
    """What the tests and the benchmark read: how many requests loaded their cartridge from its file."""

    cartridge_requests: int = 0
    tokens_loaded: int = 0
    requests_fully_cached: int = 0  # cartridge requests whose p tokens were all in the prefix cache
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, loaded: int | None) -> None:
        if loaded is None:
            return
        with self.lock:
            self.cartridge_requests += 1
            self.tokens_loaded += loaded
            self.requests_fully_cached += loaded == 0


def engine_kwargs(model_path: str, *, max_resident_cartridges: int = 8, **kwargs) -> dict:
    """Engine arguments of a cartridge engine: the project's vLLM arguments with the cartridge connector
    registered; ``kwargs``: those of :func:`vllm_engine_args` and any other vLLM engine argument."""
    return vllm_engine_args(model_path, kv_transfer_config=connector_config(max_resident_cartridges), **kwargs)


class CartridgeSet:
    """Cartridges registered with one engine, each checked against the engine's model and tokenizer."""

    def __init__(self, hf_config, tokenizer):
        self._model = SimpleNamespace(config=hf_config)  # what check_compatible reads
        self.tokenizer = tokenizer
        self._by_name: dict[str, LoadedCartridge] = {}

    def add(self, name: str, cartridge_dir: str | Path) -> LoadedCartridge:
        d = Path(cartridge_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"cartridge {name!r}: directory not found: {d}")
        meta = read_meta(d)
        check_compatible(meta, self._model, self.tokenizer, source=str(d))
        weights = adapter_file(d)
        if not weights.is_file():
            raise FileNotFoundError(f"cartridge {name!r}: {weights} is missing")
        from .connector import read_cartridge_kv

        shape = meta.shape
        kv = read_cartridge_kv(str(weights), shape.num_layers, shape.num_kv_heads, shape.head_dim)  # fails early
        if kv[0].shape[1] != meta.num_tokens:
            raise ValueError(f"{weights}: {kv[0].shape[1]} tokens, {d / 'cartridge.json'} says {meta.num_tokens}")
        cart = LoadedCartridge(
            name, d, meta, CartridgeParams(str(weights.resolve()), file_hash(weights, 32), meta.num_tokens)
        )
        self._by_name[name] = cart
        return cart

    def get(self, name: str) -> LoadedCartridge:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownCartridge(name) from None

    def include(self, other: CartridgeSet) -> None:
        """Take over cartridges another set already checked against the same model."""
        self._by_name.update(other._by_name)

    def __iter__(self):
        return iter(self._by_name.values())

    def names(self) -> list[str]:
        return list(self._by_name)


def vllm_sampling(sp: SamplingParams, cart: LoadedCartridge | None):
    """vLLM's SamplingParams for ours, carrying the cartridge's transfer params."""
    from vllm import SamplingParams as VSP

    return VSP(
        temperature=sp.temperature,
        top_p=sp.top_p,
        max_tokens=sp.max_tokens,
        stop=list(sp.stop) or None,
        logprobs=sp.top_logprobs or None,
        seed=sp.seed,
        logit_bias=sp.logit_bias or None,
        extra_args={"kv_transfer_params": cart.params.to_dict()} if cart is not None else None,
    )


def vllm_prompt(cart: LoadedCartridge | None, ids: list[int]):
    """The prompt of one request: the cartridge's placeholders, then the conversation."""
    from vllm.inputs import TokensPrompt

    if cart is None:
        return TokensPrompt(prompt_token_ids=list(ids))
    return TokensPrompt(prompt_token_ids=[PLACEHOLDER_ID] * cart.num_tokens + list(ids), cache_salt=cart.cache_salt)


def engine_input(cart: LoadedCartridge | None, ids: list[int]):
    """:func:`vllm_prompt` as the engine's own token input, for ``AsyncLLM.generate``, which deprecates raw
    prompts (token ids need no rendering; vLLM still rejects one longer than ``max_model_len``)."""
    from vllm.inputs.engine import tokens_input

    prompt = vllm_prompt(cart, ids)
    return tokens_input(prompt["prompt_token_ids"], cache_salt=prompt.get("cache_salt"))


def logprob_entries(token_ids, logprobs, top_k: int) -> list[dict] | None:
    """Per position: the token's logprob and vLLM's top-k (rank <= k; the sampled token is added beside them
    when outside it) as ``{token_id, logprob, top: [(id, logprob)]}``."""
    if logprobs is None:
        return None
    return [
        {
            "token_id": t,
            "logprob": logprobs[j][t].logprob,
            "top": sorted(
                ((i, lp.logprob) for i, lp in logprobs[j].items() if lp.rank is not None and lp.rank <= top_k),
                key=lambda x: -x[1],
            ),
        }
        for j, t in enumerate(token_ids)
    ]


def strip_eos(ids: list[int], entries: list[dict] | None, eos_id: int):
    """The end-of-turn token is not part of the answer."""
    if ids and ids[-1] == eos_id:
        return ids[:-1], (entries[:-1] if entries else entries)
    return ids, entries


def finish_reason(output) -> str:
    """OpenAI's finish reason of a vLLM CompletionOutput: ``stop`` (end of turn or a stop string) or ``length``."""
    return "stop" if output.finish_reason == "stop" else "length"


def to_completion(output, prompt_tokens: int, eos_id: int, top_k: int, ttft: float) -> Completion:
    """Our Completion from a finished vLLM RequestOutput."""
    c = output.outputs[0]
    ids, lps = strip_eos(list(c.token_ids), logprob_entries(c.token_ids, c.logprobs, top_k), eos_id)
    finish = finish_reason(c)
    loaded = (output.kv_transfer_params or {}).get("cartridge_tokens_loaded")
    return Completion(ids, c.text, finish, lps, prompt_tokens, ttft, cartridge_tokens_loaded=loaded)


class _Engine:
    """What the sync and async engines share: the cartridges they hold, counters, model facts."""

    def _setup(self, model: str, vllm_config, tokenizer) -> None:
        self.model_name = model
        self.tokenizer = tokenizer
        self.hf_config = vllm_config.model_config.hf_config
        self.kv_element_size = vllm_config.model_config.dtype.itemsize
        self.block_size = vllm_config.cache_config.block_size
        self.cartridges = CartridgeSet(self.hf_config, tokenizer)
        self.stats = EngineStats()

    def add_cartridge(self, name: str, cartridge_dir: str | Path) -> LoadedCartridge:
        return self.cartridges.add(name, cartridge_dir)


class CartridgeLLM(_Engine):
    """A synchronous vLLM engine that reads cartridges (batch use, evaluation, the agent)."""

    def __init__(self, model: str, **kwargs):
        from vllm import LLM

        from ..models import resolve_model

        self.llm = LLM(**engine_kwargs(resolve_model(model, kwargs.get("dtype", "fp32")), **kwargs))
        self._setup(model, self.llm.llm_engine.vllm_config, self.llm.get_tokenizer())

    def shutdown(self) -> None:
        """End the engine's processes now (otherwise they end when this process exits)."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(
        self, requests: list[tuple[LoadedCartridge | None, list[int]]], sampling: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        """Answer each (cartridge or None, conversation ids) request; all in one continuous batch."""
        sps = sampling if isinstance(sampling, list) else [sampling] * len(requests)
        prompts = [vllm_prompt(c, ids) for c, ids in requests]
        params = [vllm_sampling(sp, c) for sp, (c, _) in zip(sps, requests)]
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        eos = self.tokenizer.eos_token_id
        done = [to_completion(o, len(ids), eos, sp.top_logprobs, wall) for o, sp, (_, ids) in zip(outs, sps, requests)]
        for d in done:
            self.stats.record(d.cartridge_tokens_loaded)
        return done


class AsyncCartridgeEngine(_Engine):
    """An ``AsyncLLM`` that reads cartridges: requests join the running batch as they come (the Serve app)."""

    def __init__(self, model: str, **kwargs):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from ..models import resolve_model

        args = AsyncEngineArgs(**engine_kwargs(resolve_model(model, kwargs.get("dtype", "fp32")), **kwargs))
        args.disable_log_stats = True
        self.llm = AsyncLLM.from_engine_args(args)
        self._setup(model, self.llm.vllm_config, self.llm.tokenizer)

    async def stream(self, cartridge: LoadedCartridge | None, ids: list[int], sp: SamplingParams):
        """vLLM's outputs of one request as they come, each holding only what is new (DELTA). Closing the
        generator (a client that went away) aborts the request in the engine."""
        from vllm.sampling_params import RequestOutputKind

        params = vllm_sampling(sp, cartridge)
        params.output_kind = RequestOutputKind.DELTA
        async for out in self.llm.generate(engine_input(cartridge, ids), params, request_id=uuid.uuid4().hex):
            if out.finished and cartridge is not None:
                self.stats.record((out.kv_transfer_params or {}).get("cartridge_tokens_loaded"))
            yield out

    async def complete(self, cartridge: LoadedCartridge | None, ids: list[int], sp: SamplingParams) -> Completion:
        """One whole answer (the same fields as CartridgeLLM.generate's)."""
        from vllm.sampling_params import RequestOutputKind

        params = vllm_sampling(sp, cartridge)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        t0, last = time.perf_counter(), None
        async for out in self.llm.generate(engine_input(cartridge, ids), params, request_id=uuid.uuid4().hex):
            last = out
        comp = to_completion(last, len(ids), self.tokenizer.eos_token_id, sp.top_logprobs, time.perf_counter() - t0)
        self.stats.record(comp.cartridge_tokens_loaded)
        return comp

    def shutdown(self) -> None:
        self.llm.shutdown()
