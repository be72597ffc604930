"""The one way this package turns chat messages into token ids."""

from __future__ import annotations


def chat_template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template (a plain list, whatever the tokenizer's
    version returns)."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)
