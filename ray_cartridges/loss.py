"""Knowledge-distillation loss on sparse teacher top-k logprobs."""

from __future__ import annotations

import torch


def kd_loss_sum(
    student_logits: torch.Tensor,  # [P, V]: student logits predicting each supervised position
    topk_ids: torch.Tensor,  # [P, K] teacher token ids (padding: any valid id)
    topk_logprobs: torch.Tensor,  # [P, K] teacher logprobs (padding: -inf)
) -> torch.Tensor:
    """Sum over positions of ``-sum_k p_teacher(k) * log p_student(k)`` (a 0-dim tensor).

    The teacher's kept probabilities are not renormalised: with every token kept this is exactly the
    cross-entropy H(p_teacher, p_student) = KL(p_teacher || p_student) + H(p_teacher).
    Divide by the number of positions (over the whole global batch) to get the per-token mean.
    """
    log_q = torch.log_softmax(student_logits.float(), dim=-1)  # [P, V]
    p = topk_logprobs.float().exp()  # [P, K], exp(-inf) = 0 for padding
    return -(p * log_q.gather(-1, topk_ids.long())).sum()


def kd_loss(student_logits, topk_ids, topk_logprobs) -> torch.Tensor:
    """Per-token mean of :func:`kd_loss_sum`."""
    return kd_loss_sum(student_logits, topk_ids, topk_logprobs) / max(1, student_logits.shape[0])
