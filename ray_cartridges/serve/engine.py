"""Replica-side serving logic, independent of HTTP: every configured cartridge on one vLLM engine.

All cartridges are registered when the replica starts, so one that cannot be read (missing directory,
truncated weights, another model's shapes) fails the deployment then, naming the file and the reason,
instead of a healthy replica that answers 503. Requests of every cartridge join vLLM's running batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..agent.base import chat_prompt_ids
from ..agent.decoding import SamplingParams
from ..cartridge import read_meta
from ..config.serve import ServeConfig
from ..hub import pull_snapshot
from ..vllm_cartridges.engine import AsyncCartridgeEngine, CartridgeSet, LoadedCartridge, UnknownCartridge


class RequestTooLarge(ValueError):
    pass


def cartridge_dir(ref: str):
    """A configured cartridge: a local directory, or ``hf://org/repo`` fetched from the hub."""
    from pathlib import Path

    if ref.startswith("hf://"):
        return pull_snapshot(ref[len("hf://") :], repo_type="model")
    path = Path(ref)
    if not path.is_dir():
        raise FileNotFoundError(f"cartridge directory not found: {path}")
    return path


def preflight(cfg: ServeConfig) -> tuple[str, CartridgeSet]:
    """(base model, its cartridges), every cartridge found and checked against the base model before any
    engine starts: a bad one fails in seconds, named, where `serve` runs and in the replica."""
    if not cfg.cartridges:
        raise ValueError("serve config: `cartridges` is empty")
    dirs = {}
    for name, ref in cfg.cartridges.items():
        try:
            dirs[name] = cartridge_dir(ref)
        except Exception as err:
            raise ValueError(f"cartridge {name!r} ({ref}): {err}") from None
    base = cfg.base_model or read_meta(next(iter(dirs.values()))).model_name
    return base, check_cartridges(base, dirs)


def check_cartridges(base: str, dirs: dict) -> CartridgeSet:
    """Every cartridge read and checked against ``base`` (shapes, tokenizer, weights), naming the first bad one."""
    from transformers import AutoConfig

    from ..models import load_tokenizer, resolve_model

    carts = CartridgeSet(AutoConfig.from_pretrained(resolve_model(base)), load_tokenizer(base))
    for name, d in dirs.items():
        try:
            carts.add(name, d)
        except Exception as err:
            raise ValueError(f"cartridge {name!r} ({d}) cannot be served: {err}") from None
    return carts


@dataclass
class Prepared:
    """A checked request: the cartridge, the conversation's token ids (without placeholders), sampling."""

    cartridge: LoadedCartridge
    ids: list[int]
    sampling: SamplingParams


class ServeEngine:
    """One AsyncCartridgeEngine per replica and the cartridges it serves."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.base, checked = preflight(cfg)
        self.engine = AsyncCartridgeEngine(
            self.base,
            dtype=cfg.dtype,
            max_model_len=cfg.limits.max_context_tokens + max(c.num_tokens for c in checked),
            max_resident_cartridges=cfg.max_cartridges_per_replica,
            block_size=cfg.block_size,
            enforce_eager=cfg.enforce_eager,
            max_num_seqs=cfg.max_num_seqs,
        )
        self.tokenizer = self.engine.tokenizer
        self.engine.cartridges.include(checked)  # read and checked once, above

    def running(self) -> int:
        """Requests the engine is working on (a dropped stream leaves this count)."""
        return self.engine.llm.output_processor.get_num_unfinished_requests()

    def models(self) -> list[str]:
        return self.engine.cartridges.names()

    def prompt_ids(self, cart: LoadedCartridge, messages: list[dict]) -> list[int]:
        """The conversation through the chat template, with the cartridge's system prompt unless one is given."""
        return chat_prompt_ids(self.tokenizer, messages, cart.meta.student_system_prompt)

    def prepare(self, model: str, messages: list[dict], sampling: SamplingParams) -> Prepared:
        """Check a request against the limits (raises RequestTooLarge, UnknownCartridge)."""
        cart = self.engine.cartridges.get(model)
        lim = self.cfg.limits
        if len(messages) > lim.max_messages:
            raise RequestTooLarge(f"{len(messages)} messages; at most {lim.max_messages} are accepted")
        if sampling.max_tokens > lim.max_tokens:
            raise RequestTooLarge(f"max_tokens={sampling.max_tokens} exceeds the limit of {lim.max_tokens}")
        ids = self.prompt_ids(cart, messages)
        if len(ids) + sampling.max_tokens > lim.max_context_tokens:
            raise RequestTooLarge(
                f"prompt of {len(ids)} tokens + max_tokens={sampling.max_tokens} exceeds the context limit of "
                f"{lim.max_context_tokens}"
            )
        return Prepared(cart, ids, sampling)


__all__ = ["Prepared", "RequestTooLarge", "ServeEngine", "UnknownCartridge"]
