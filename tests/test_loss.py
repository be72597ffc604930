import torch

from ray_cartridges.loss import kd_loss, kd_loss_sum


def test_full_vocab_kd_equals_cross_entropy_and_kl_plus_entropy():
    torch.manual_seed(0)
    P, V = 7, 50
    student = torch.randn(P, V)
    teacher_lp = torch.log_softmax(torch.randn(P, V) * 2, -1)
    ids = torch.arange(V).expand(P, V)  # everything kept
    loss = kd_loss(student, ids, teacher_lp)
    p = teacher_lp.exp()
    log_q = torch.log_softmax(student, -1)
    ce = -(p * log_q).sum(-1).mean()
    kl = torch.nn.functional.kl_div(log_q, teacher_lp, log_target=True, reduction="batchmean")
    entropy = -(p * teacher_lp).sum(-1).mean()
    assert torch.allclose(loss, ce, atol=1e-5)
    assert torch.allclose(loss, kl + entropy, atol=1e-5)
    # order of the kept entries does not matter
    perm = torch.randperm(V)
    assert torch.allclose(kd_loss(student, ids[:, perm], teacher_lp[:, perm]), loss, atol=1e-5)


def test_padding_entries_contribute_nothing_and_top_k_is_partial_mass():
    torch.manual_seed(1)
    student = torch.randn(3, 20)
    ids = torch.tensor([[1, 2, 0], [4, 0, 0], [5, 6, 7]])
    lp = torch.tensor([[-0.1, -2.5, float("-inf")], [-0.01, float("-inf"), float("-inf")], [-1.0, -1.2, -1.5]])
    log_q = torch.log_softmax(student, -1)
    expected = 0.0
    for r in range(3):
        for k in range(3):
            if lp[r, k] > float("-inf"):
                expected -= lp[r, k].exp() * log_q[r, ids[r, k]]
    assert torch.allclose(kd_loss_sum(student, ids, lp), expected, atol=1e-6)
    assert torch.isfinite(kd_loss_sum(student, ids, lp))


def test_loss_is_minimised_by_the_teacher_distribution():
    V = 10
    teacher_lp = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.5] + [-2.0] * 7]), -1)
    ids = torch.arange(V)[None]
    logits = torch.zeros(1, V, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        kd_loss(logits, ids, teacher_lp).backward()
        opt.step()
    assert torch.allclose(torch.log_softmax(logits, -1), teacher_lp, atol=1e-3)
