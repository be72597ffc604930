"""Per-token KL between next-token distributions (the fidelity figure)."""

from __future__ import annotations

import torch


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position: [P, V] x [P, V] -> [P] (nats)."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1)
