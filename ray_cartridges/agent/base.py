"""What both agents share: a frozen model, its tokenizer, chat formatting and batched decoding.

Decoding runs on one of two engines: a ``CartridgeLLM`` (vLLM; the cartridge, if any, is read through its KV
connector) or, as the reference, the transformers loop of ``decoding.generate`` on ``model``.
"""

from __future__ import annotations

from ..chat import chat_template_ids
from .decoding import Completion, SamplingParams, generate


def chat_prompt_ids(tokenizer, messages: list[dict], system_prompt: str | None) -> list[int]:
    """The conversation through the chat template, ``system_prompt`` first unless a system message is given."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return chat_template_ids(tokenizer, msgs)


class ChatModel:
    """A frozen model that answers chat messages, optionally after a cartridge."""

    def __init__(self, model, tokenizer, system_prompt: str | None = None, engine=None, cartridge=None, prefix_kv=None):
        self.model = model  # transformers model (reference engine); None on vLLM
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.engine = engine  # a CartridgeLLM, or None for the transformers reference
        self.cartridge = cartridge  # the engine's LoadedCartridge, or None
        self._prefix_kv = prefix_kv  # the transformers reference's cartridge: per layer (K, V) of [H, p, D]

    def prefix_kv(self):
        """What the transformers reference reads before the conversation (None: nothing)."""
        return self._prefix_kv

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, self.system_prompt)

    def complete(
        self, conversations: list[list[dict]], sampling: SamplingParams | None = None, on_token=None
    ) -> list[Completion]:
        """Answer several conversations in one batched forward pass (the prefix is shared, not copied)."""
        sampling = sampling or SamplingParams()
        prompts = [self.prompt_ids(c) for c in conversations]
        if self.engine is not None:
            if on_token is not None:
                raise ValueError("token callbacks are a transformers-engine feature; vLLM streams in the Serve app")
            return self.engine.generate([(self.cartridge, p) for p in prompts], sampling)
        return generate(self.model, self.tokenizer, prompts, sampling, prefix_kv=self.prefix_kv(), on_token=on_token)

    def chat(
        self, messages: list[dict], temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 256, stop=None
    ) -> str:
        sp = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=list(stop or []))
        return self.complete([messages], sp)[0].text

    def kv_bytes(self, prompt_tokens: int, answer_tokens: int) -> int:
        """KV-cache bytes one conversation holds: its own tokens (the shared prefix is counted apart)."""
        return kv_bytes_per_token(self) * (prompt_tokens + answer_tokens)


def kv_bytes_per_token(agent: ChatModel) -> int:
    """KV-cache bytes of one token of the agent's model (keys and values of every layer)."""
    if agent.engine is not None:
        cfg, size = agent.engine.hf_config, agent.engine.kv_element_size
    else:
        cfg, size = agent.model.config, next(agent.model.parameters()).element_size()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * size
