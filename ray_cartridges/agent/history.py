"""HistoryAgent: the in-context baseline, the whole memory in the system prompt (same interface)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..memory import read_memory
from ..models import load_model, load_tokenizer
from .base import ChatModel
from .kv_memory import EngineName, open_engine, pick_engine


@dataclass
class HistoryAgentConfig:
    checkpoint_dir: str
    model_name: str = "smollm2-135m-instruct"
    dtype: str = "fp32"
    lm_config: dict = field(default_factory=dict)
    engine: EngineName = "auto"  # vllm (auto, unless a model object is given; prefix caching on) or transformers
    engine_args: dict = field(default_factory=dict)  # CartridgeLLM options: max_model_len, block_size, ...


class HistoryAgent(ChatModel):
    """The in-context baseline. On vLLM the memory is a cached prompt prefix, prefilled once for all turns."""

    def __init__(self, config: HistoryAgentConfig, model=None, tokenizer=None, engine=None):
        self.memory = read_memory(config.checkpoint_dir)
        self.config = config
        if engine is not None or pick_engine(config.engine, model) == "vllm":
            engine = engine or open_engine(config.model_name, config.dtype, config.engine_args)
            super().__init__(None, engine.tokenizer, self.memory.render(), engine=engine)
            return
        super().__init__(
            model if model is not None else load_model(config.model_name, config.dtype),
            tokenizer or load_tokenizer(config.model_name),
            self.memory.render(),
        )

    def prompt_ids(self, messages):
        # the memory always leads: a caller's own system message is appended after it
        msgs = [m for m in messages if m["role"] != "system"]
        extra = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        system = self.system_prompt + ("\n\n" + extra if extra else "")
        out = self.tokenizer.apply_chat_template(
            [{"role": "system", "content": system}] + [{"role": m["role"], "content": m["content"]} for m in msgs],
            tokenize=True,
            add_generation_prompt=True,
            return_dict=False,
        )
        return list(out)
