"""KVMemoryAgent: a frozen model that reads a cartridge instead of its memory (the seed's names)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..cartridge import CartridgeMeta, check_compatible, layer_kv, load_cartridge, read_meta
from ..models import load_model, load_tokenizer
from .base import ChatModel
from .decoding import place_kv

logger = logging.getLogger(__name__)


@dataclass
class KVArtifact:
    id: str  # local cartridge directory or hub model id
    source: Literal["huggingface", "local", "wandb"] = "local"  # wandb: the research workflow's; refused
    force_redownload: bool = False
    revision: str | None = None

    def local_dir(self) -> Path:
        if self.source == "wandb":
            raise ValueError(
                f"KVArtifact(source='wandb', id={self.id!r}): wandb artifacts are not supported; download it "
                "(`wandb artifact get ...`) and use source='local' with its directory, or push it to the hub"
            )
        if self.source == "local":
            path = Path(self.id)
            if not path.is_dir():
                raise FileNotFoundError(f"cartridge directory not found: {path}")
            return path
        if self.source != "huggingface":
            raise ValueError(f"KVArtifact.source must be 'huggingface' or 'local', got {self.source!r}")
        from ..hub import pull_snapshot

        return pull_snapshot(self.id, repo_type="model", revision=self.revision, force=self.force_redownload)


@dataclass
class KVCacheMemoryConfig:
    artifact: KVArtifact
    tokenizer_name: str | None = None  # default: the cartridge's model
    model_name: str | None = None  # default: the cartridge's model
    dtype: str = "fp32"
    device: str = "cpu"  # where the model runs when it is loaded here: cpu, cuda, cuda:N or auto


class KVCacheMemory:
    """A loaded cartridge: per-layer K/V [H, p, D], checked against the model it will be read by."""

    def __init__(self, config: KVCacheMemoryConfig, model=None, tokenizer=None):
        self.config = config
        self.dir = config.artifact.local_dir()
        self.meta: CartridgeMeta = read_meta(self.dir)
        name = config.model_name or self.meta.model_name
        self.tokenizer = tokenizer or load_tokenizer(config.tokenizer_name or name)
        self.model = model if model is not None else load_model(name, config.dtype, config.device)
        peft = load_cartridge(self.model, self.dir, self.tokenizer)  # checks layers, heads, head_dim, vocab, tokenizer
        # PEFT's prompt-learning wrapper leaves the frozen model untouched: keep the K/V, drop the wrapper
        self.kv = [(k.detach().clone(), v.detach().clone()) for k, v in layer_kv(peft)]
        self.num_tokens = self.meta.num_tokens

    @classmethod
    def from_dir(
        cls, path: str | Path, model=None, tokenizer=None, dtype: str = "fp32", device: str = "cpu"
    ) -> KVCacheMemory:
        cfg = KVCacheMemoryConfig(KVArtifact(str(path)), dtype=dtype, device=device)
        return cls(cfg, model=model, tokenizer=tokenizer)

    def check(self, model, tokenizer=None) -> None:
        check_compatible(self.meta, model, tokenizer, source=str(self.dir))

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)


EngineName = Literal["auto", "vllm", "transformers"]


def pick_engine(engine: EngineName, model=None) -> str:
    """``auto``: vLLM, unless a transformers model object was handed in (then the transformers reference)."""
    if engine not in ("auto", "vllm", "transformers"):
        raise ValueError(f"engine must be 'auto', 'vllm' or 'transformers', got {engine!r}")
    if engine == "auto":
        return "transformers" if model is not None else "vllm"
    if engine == "vllm" and model is not None:
        raise ValueError("engine='vllm' reads the model itself: pass engine=CartridgeLLM(...) instead of model=")
    return engine


def open_engine(model_name: str, dtype: str, engine_args: dict):
    """A new CartridgeLLM for ``model_name`` (vLLM; prefix caching and the cartridge connector on)."""
    from ..vllm_cartridges import CartridgeLLM

    return CartridgeLLM(model_name, dtype=dtype, **engine_args)


@dataclass
class KVMemoryAgentConfig:
    memory_config: KVCacheMemoryConfig
    system_prompt: str | None = None  # default: the student system prompt the cartridge was trained with
    lm_config: dict = field(default_factory=dict)  # {"model": ..., "temperature": ..., "max_tokens": ...}
    engine: EngineName = "auto"  # vllm (auto, unless a model object is given) or the transformers reference
    engine_args: dict = field(default_factory=dict)  # CartridgeLLM options: max_model_len, block_size, ...
    history_k: int | None = None  # the research workflow's; a cartridge has no history window (unused)
    verbose: bool = False  # log each prompt and answer


class KVMemoryAgent(ChatModel):
    """Chats with the cartridge as its memory: p cached tokens instead of the whole memory in the prompt.

    On vLLM (the default) the cartridge is read through the engine's KV connector; ``engine=`` shares one
    CartridgeLLM between agents (their cartridges then decode in one continuous batch). With a transformers
    ``model`` the reference loop decodes.
    """

    def __init__(self, config: KVMemoryAgentConfig, model=None, tokenizer=None, engine=None):
        mc = config.memory_config
        if config.lm_config.get("model") and not mc.model_name:
            mc.model_name = config.lm_config["model"]
        self.config = config
        self.defaults = {k: v for k, v in config.lm_config.items() if k in ("temperature", "top_p", "max_tokens")}
        if engine is not None or pick_engine(config.engine, model) == "vllm":
            directory = mc.artifact.local_dir()
            self.meta = read_meta(directory)
            engine = engine or open_engine(mc.model_name or self.meta.model_name, mc.dtype, config.engine_args)
            cartridge = engine.add_cartridge(mc.artifact.id, directory)  # checks the fit, names each mismatch
            self.memory = None
            super().__init__(None, engine.tokenizer, self._system(config), engine=engine, cartridge=cartridge)
            self._kv = None
        else:
            self.memory = KVCacheMemory(mc, model=model, tokenizer=tokenizer)
            self.meta = self.memory.meta
            super().__init__(self.memory.model, self.memory.tokenizer, self._system(config))
            self._kv = place_kv(self.model, self.memory.kv)  # once, so that decoding finds it in place

    def _system(self, config: KVMemoryAgentConfig) -> str | None:
        return config.system_prompt if config.system_prompt is not None else self.meta.student_system_prompt

    @property
    def num_tokens(self) -> int:
        return self.meta.num_tokens

    def prefix_kv(self):
        return self._kv

    def chat(self, messages, temperature=None, top_p=None, max_tokens=None, stop=None) -> str:
        d = self.defaults
        reply = super().chat(
            messages,
            temperature=d.get("temperature", 0.0) if temperature is None else temperature,
            top_p=d.get("top_p", 1.0) if top_p is None else top_p,
            max_tokens=d.get("max_tokens", 256) if max_tokens is None else max_tokens,
            stop=stop,
        )
        if self.config.verbose:
            logger.info("KVMemoryAgent: %s -> %s", messages[-1]["content"] if messages else "", reply)
        return reply
