"""KVMemoryAgent: a frozen model that reads a cartridge instead of its memory (the seed's names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..cartridge import CartridgeMeta, check_compatible, layer_kv, load_cartridge, read_meta
from ..models import load_model, load_tokenizer
from .base import ChatModel
from .decoding import place_kv


@dataclass
class KVArtifact:
    id: str  # local cartridge directory or hub model id
    source: Literal["huggingface", "local"] = "local"
    force_redownload: bool = False
    revision: str | None = None

    def local_dir(self) -> Path:
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


@dataclass
class KVMemoryAgentConfig:
    memory_config: KVCacheMemoryConfig
    system_prompt: str | None = None  # default: the student system prompt the cartridge was trained with
    lm_config: dict = field(default_factory=dict)  # {"model": ..., "temperature": ..., "max_tokens": ...}


class KVMemoryAgent(ChatModel):
    """Chats with the cartridge as its memory: p cached tokens instead of the whole memory in the prompt."""

    def __init__(self, config: KVMemoryAgentConfig, model=None, tokenizer=None):
        mc = config.memory_config
        if config.lm_config.get("model") and not mc.model_name:
            mc.model_name = config.lm_config["model"]
        self.memory = KVCacheMemory(mc, model=model, tokenizer=tokenizer)
        system = config.system_prompt if config.system_prompt is not None else self.memory.meta.student_system_prompt
        super().__init__(self.memory.model, self.memory.tokenizer, system)
        self.config = config
        self.defaults = {k: v for k, v in config.lm_config.items() if k in ("temperature", "top_p", "max_tokens")}
        self._kv = place_kv(self.model, self.memory.kv)  # once, so that decoding finds it in place

    def prefix_kv(self):
        return self._kv

    def chat(self, messages, temperature=None, top_p=None, max_tokens=None, stop=None) -> str:
        d = self.defaults
        return super().chat(
            messages,
            temperature=d.get("temperature", 0.0) if temperature is None else temperature,
            top_p=d.get("top_p", 1.0) if top_p is None else top_p,
            max_tokens=d.get("max_tokens", 256) if max_tokens is None else max_tokens,
            stop=stop,
        )
