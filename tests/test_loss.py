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


def test_tail_class_makes_the_teacher_the_minimum_where_plain_top_k_sharpens():
    """With top-k kept, the plain loss is lowest for a student with all its mass on the kept tokens; with the
    tail class the teacher's own distribution is the minimum (zero gradient there)."""
    torch.manual_seed(2)
    P, V, K = 4, 30, 5
    teacher_logits = torch.randn(P, V) * 2
    top_lp, top_ids = torch.log_softmax(teacher_logits, -1).topk(K, -1)
    grads = {}
    for tail in (False, True):
        x = teacher_logits.clone().requires_grad_(True)
        kd_loss_sum(x, top_ids, top_lp, tail).backward()
        grads[tail] = x.grad
    assert grads[True].abs().max() < 1e-5
    assert grads[False].abs().max() > 1e-2
    # value: the kept tokens' cross-entropy plus the left-out mass against the student's mass elsewhere
    student = torch.randn(P, V)
    log_q = torch.log_softmax(student, -1)
    p = top_lp.exp()
    q_rest = 1 - log_q.gather(-1, top_ids).exp().sum(-1)
    expected = -(p * log_q.gather(-1, top_ids)).sum() - ((1 - p.sum(-1)) * q_rest.log()).sum()
    assert torch.allclose(kd_loss_sum(student, top_ids, top_lp, tail=True), expected, atol=1e-5)
    # every token kept: no tail mass, the same loss as without the class
    ids = torch.arange(V).expand(P, V)
    lp = torch.log_softmax(teacher_logits, -1)
    assert torch.allclose(kd_loss_sum(student, ids, lp, tail=True), kd_loss_sum(student, ids, lp), atol=1e-4)
    x = student.clone().requires_grad_(True)
    kd_loss_sum(x, ids, lp, tail=True).backward()
    assert torch.isfinite(x.grad).all()
    # a kept mass near 1: the tail is summed over the other tokens, not taken as 1 - (kept mass), which in float32
    # keeps a few significant digits of it
    sharp = torch.full((1, V), -12.0)
    sharp[0, 0] = 0.0
    lp_sharp, ids_sharp = torch.log_softmax(sharp, -1).topk(1, -1)
    exact = torch.log_softmax(sharp.double(), -1)
    p_rest = -torch.expm1(lp_sharp[0, 0].double())  # the teacher's left-out mass, from the data as given
    want = -p_rest * exact[0, 1:].logsumexp(0)  # the tail class's term
    tail_term = kd_loss_sum(sharp, ids_sharp, lp_sharp, tail=True) - kd_loss_sum(sharp, ids_sharp, lp_sharp)
    assert p_rest > 1e-4
    assert torch.allclose(tail_term.double(), want, rtol=1e-5, atol=0)
    # padded positions (no kept entry) and padded entries add nothing
    pad_ids = torch.cat([top_ids, torch.zeros(1, K, dtype=torch.long)])
    pad_lp = torch.cat([top_lp, torch.full((1, K), float("-inf"))])
    pad_student = torch.cat([student, torch.randn(1, V)])
    assert torch.allclose(kd_loss_sum(pad_student, pad_ids, pad_lp, tail=True), expected, atol=1e-5)
    short_lp = top_lp.clone()
    short_lp[:, -1] = float("-inf")  # the last kept entry is padding: its mass joins the tail
    q_rest4 = 1 - log_q.gather(-1, top_ids[:, :-1]).exp().sum(-1)
    p4 = p[:, :-1]
    expected4 = -(p4 * log_q.gather(-1, top_ids[:, :-1])).sum() - ((1 - p4.sum(-1)) * q_rest4.log()).sum()
    assert torch.allclose(kd_loss_sum(student, top_ids, short_lp, tail=True), expected4, atol=1e-5)
