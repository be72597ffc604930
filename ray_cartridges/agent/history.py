"""HistoryAgent: the in-context baseline, the whole memory in the prompt (same interface as the KV agent)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..memory import MemoryContext, read_memory
from ..models import load_model, load_tokenizer
from .base import ChatModel, chat_prompt_ids
from .kv_memory import EngineName, open_engine, pick_engine


@dataclass
class HistoryAgentConfig:
    checkpoint_dir: str
    model_name: str = "smollm2-135m-instruct"
    dtype: str = "fp32"
    lm_config: dict = field(default_factory=dict)
    engine: EngineName = "auto"  # vllm (auto, unless a model object is given; prefix caching on) or transformers
    engine_args: dict = field(default_factory=dict)  # CartridgeLLM options: max_model_len, block_size, ...
    # how the memory is laid out (memory.MEMORY_LAYOUTS): this project's system prompt, or the research
    # workflow's HistoryAgent prompts (history_lines, history_chat)
    memory_layout: str = "system"


class HistoryAgent(ChatModel):
    """The in-context baseline. On vLLM the memory is a cached prompt prefix, prefilled once for all turns."""

    def __init__(self, config: HistoryAgentConfig, model=None, tokenizer=None, engine=None):
        self.memory = read_memory(config.checkpoint_dir)
        self.config = config
        self.context: MemoryContext = self.memory.context(layout=config.memory_layout)
        if engine is not None or pick_engine(config.engine, model) == "vllm":
            engine = engine or open_engine(config.model_name, config.dtype, config.engine_args)
            super().__init__(None, engine.tokenizer, self.context.system, engine=engine)
            return
        super().__init__(
            model if model is not None else load_model(config.model_name, config.dtype),
            tokenizer or load_tokenizer(config.model_name),
            self.context.system,
        )

    def prompt_ids(self, messages):
        # the memory always leads: a caller's own system message is appended to the memory's system prompt
        lead = [{"role": r, "content": c} for r, c in self.context.messages]
        extra = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        if extra and lead and lead[0]["role"] == "system":
            lead[0] = {"role": "system", "content": lead[0]["content"] + "\n\n" + extra}
        elif extra:
            lead.insert(0, {"role": "system", "content": extra})
        turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        if turns and self.context.question_prefix:  # the first question shares its turn with the memory
            turns[0] = {**turns[0], "content": self.context.question_prefix + turns[0]["content"]}
        return chat_prompt_ids(self.tokenizer, lead + turns, None)
