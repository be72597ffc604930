"""Knowledge-distillation loss on sparse teacher top-k logprobs."""

from __future__ import annotations

import torch


def kd_loss_sum(
    student_logits: torch.Tensor,  # [P, V]: student logits predicting each supervised position
    topk_ids: torch.Tensor,  # [P, K] teacher token ids (padding: any valid id)
    topk_logprobs: torch.Tensor,  # [P, K] teacher logprobs (padding: -inf)
    tail: bool = False,
) -> torch.Tensor:
    """Sum over positions of ``-sum_k p_teacher(k) * log p_student(k)`` (a 0-dim tensor).

    The teacher's kept probabilities are not renormalised: with every token kept this is exactly the
    cross-entropy H(p_teacher, p_student) = KL(p_teacher || p_student) + H(p_teacher). With only the top k
    kept, its minimum puts all of the student's mass on the kept tokens, a sharper distribution than the
    teacher's. ``tail``: add the mass the teacher left out, ``1 - sum_k p_teacher(k)``, as one more class
    matched against the student's mass outside the kept tokens; the minimum is then the teacher's
    probabilities on the kept tokens and its tail mass on the rest.
    Divide by the number of positions (over the whole global batch) to get the per-token mean.
    """
    log_q = torch.log_softmax(student_logits.float(), dim=-1)  # [P, V]
    p = topk_logprobs.float().exp()  # [P, K], exp(-inf) = 0 for padding
    log_q_top = log_q.gather(-1, topk_ids.long())
    loss = -(p * log_q_top).sum()
    if tail:
        kept = torch.isfinite(topk_logprobs)
        # 1 - (kept mass) as -expm1(log of the kept mass): exact where the kept mass is near 1
        p_tail = -torch.expm1(topk_logprobs.float().logsumexp(-1)) * kept.any(-1)  # [P]; 0 on padded positions
        p_tail = torch.where(p_tail > 1e-6, p_tail, 0.0)  # below that: rounding of a complete top-k
        # log of the student's mass on every token not kept, summed over those tokens (not 1 - the kept mass,
        # which cancels); kept tokens are masked with a large finite negative, not -inf: a row with every
        # token kept must stay finite
        ids = torch.where(kept, topk_ids.long(), topk_ids.long()[:, :1])  # padding entries repeat a kept id
        log_q_tail = log_q.scatter(-1, ids, -1e4).logsumexp(-1)
        loss = loss - (p_tail * log_q_tail).sum()
    return loss


def kd_loss(student_logits, topk_ids, topk_logprobs, tail: bool = False) -> torch.Tensor:
    """Per-token mean of :func:`kd_loss_sum`."""
    return kd_loss_sum(student_logits, topk_ids, topk_logprobs, tail) / max(1, student_logits.shape[0])
