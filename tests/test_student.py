import numpy as np
import pytest
import torch
from helpers import tiny_llama

from ray_cartridges.batching import collate, student_logits_at
from ray_cartridges.cartridge import create_cartridge, encoder
from ray_cartridges.loss import kd_loss_sum
from ray_cartridges.train.student import SharedPrefixStudent, shared_prefix_length


def _rows(prefix_len: int, lengths: list[int], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(5, 500, size=prefix_len)
    rows = []
    for i, n in enumerate(lengths):
        ids = np.concatenate([prefix, rng.integers(5, 500, size=n - prefix_len)])
        pos = np.repeat(np.arange(n - 4, n), 3)
        rows.append(
            {
                "row_id": i,
                "input_ids": ids,
                "topk_pos": pos,
                "topk_ids": rng.integers(5, 500, size=len(pos)),
                "topk_logprobs": np.log(np.tile([0.6, 0.3, 0.1], 4)).astype(np.float32),
            }
        )
    return rows


def test_shared_prefix_length_stops_at_the_first_difference_or_padding():
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 9, 5], [1, 2, 3, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert shared_prefix_length(ids, mask) == 3
    assert shared_prefix_length(ids[[0, 2]], mask[[0, 2]]) == 4  # the padded position is not shared
    assert shared_prefix_length(ids[:1], mask[:1]) == 5


@pytest.mark.parametrize("prefix_len,lengths", [(12, [20, 27, 16]), (3, [20, 20]), (12, [12 + 4, 30])])
def test_reading_the_shared_prefix_once_gives_the_same_logits_and_gradients(prefix_len, lengths):
    batch = collate(_rows(prefix_len, lengths), pad_id=0, top_k=3)
    got = {}
    for shared in (False, True):
        pm = create_cartridge(tiny_llama(vocab=512), num_tokens=6, num_frozen_tokens=1, method="random", seed=2)
        student = SharedPrefixStudent(pm, min_shared=2) if shared else pm
        logits = student_logits_at(student, batch)
        kd_loss_sum(logits, batch["topk_ids"], batch["topk_logprobs"], True).backward()
        got[shared] = (logits.detach(), encoder(pm).trainable_embedding.grad.clone())
    assert torch.allclose(got[True][0], got[False][0], atol=1e-5)
    assert torch.allclose(got[True][1], got[False][1], atol=1e-5, rtol=1e-4)
    assert got[True][1].abs().sum() > 0


def test_calls_without_kept_positions_are_the_peft_models_own():
    pm = create_cartridge(tiny_llama(vocab=512), num_tokens=6, num_frozen_tokens=1, method="random", seed=2)
    x = torch.randint(5, 500, (1, 9))
    with torch.no_grad():
        a = SharedPrefixStudent(pm)(input_ids=x, attention_mask=torch.ones_like(x)).logits
        b = pm(input_ids=x, attention_mask=torch.ones_like(x)).logits
    assert torch.equal(a, b)
