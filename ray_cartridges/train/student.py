"""The student that training runs: the cartridge-reading model, with a micro-batch's common prefix read once.

Every training row opens with the same chat-template tokens (the system prompt and the user turn's header). The
student reads them once, after the cartridge, and repeats their keys and values over the rows before it reads the
rest: the logits and gradients are those of reading each row whole, for fewer tokens.
"""

from __future__ import annotations

import torch


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many leading tokens every row of ``input_ids`` [B, T] has in common (all of them unpadded)."""
    same = (input_ids == input_ids[:1]).all(dim=0) & (attention_mask == 1).all(dim=0)
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else input_ids.shape[1]


class SharedPrefixStudent(torch.nn.Module):
    """Wraps the PEFT cartridge model (so DDP and DeepSpeed wrap this module and its parameters are the same).

    A call with ``logits_to_keep`` as a tensor of positions (``batching.student_logits_at``) reads the rows'
    common prefix once when it is at least ``min_shared`` tokens and ends before the first kept position;
    any other call is the PEFT model's own forward.
    """

    def __init__(self, peft_model, min_shared: int = 8):
        super().__init__()
        self.student = peft_model
        self.min_shared = min_shared

    def forward(self, input_ids, attention_mask, logits_to_keep=0, use_cache=False, **kwargs):
        shared = 0
        if isinstance(logits_to_keep, torch.Tensor) and input_ids.shape[0] > 1:
            shared = min(shared_prefix_length(input_ids, attention_mask), int(logits_to_keep.min()))
        if shared < self.min_shared:
            return self.student(
                input_ids=input_ids,
                attention_mask=attention_mask,
                logits_to_keep=logits_to_keep,
                use_cache=use_cache,
                **kwargs,
            )
        rows, p = input_ids.shape[0], self.student.active_peft_config.num_virtual_tokens
        cache = self.student.get_prompt(1, max_cache_len=p + input_ids.shape[1])
        model = self.student.get_base_model()
        ones = attention_mask.new_ones
        # the decoder alone: the prefix's logits are never needed; it appends the prefix's K/V to the cache
        model.get_decoder()(
            input_ids=input_ids[:1, :shared], attention_mask=ones(1, p + shared), past_key_values=cache, use_cache=True
        )
        cache.batch_repeat_interleave(rows)  # the cartridge and the prefix, once per row
        return model(
            input_ids=input_ids[:, shared:],
            attention_mask=torch.cat([ones(rows, p + shared), attention_mask[:, shared:]], dim=1),
            past_key_values=cache,
            logits_to_keep=logits_to_keep - shared,
            use_cache=use_cache,
            **kwargs,
        )
