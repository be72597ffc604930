import numpy as np
import pytest
import torch

from ray_cartridges.batching import collate, global_batches, heldout_keys, split_rows, student_logits_at, worker_slice


def test_plan_is_deterministic_and_covers_each_epoch_once():
    lengths = list(np.random.default_rng(0).integers(10, 400, size=103))
    a = global_batches(lengths, 8, epochs=2, seed=5)
    assert a == global_batches(lengths, 8, epochs=2, seed=5)
    assert a != global_batches(lengths, 8, epochs=2, seed=6)
    per_epoch = 103 // 8
    assert len(a) == 2 * per_epoch and all(len(b) == 8 for b in a)
    first = [i for b in a[:per_epoch] for i in b]
    assert len(set(first)) == len(first)  # no row twice within an epoch


def test_bucketing_reduces_padding():
    lengths = list(np.random.default_rng(1).integers(10, 1000, size=512))
    plan = global_batches(lengths, 8, epochs=1, seed=0)
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plan)
    rng = np.random.default_rng(0)
    order = rng.permutation(512)
    naive = [order[i : i + 8] for i in range(0, 512, 8)]
    pad_naive = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in naive)
    assert pad < 0.2 * pad_naive


def test_worker_slices_partition_the_global_batch():
    batch = list(range(12))
    parts = [worker_slice(batch, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == batch and all(len(p) == 4 for p in parts)


def test_global_batch_larger_than_data_is_an_error():
    with pytest.raises(ValueError, match="global_batch_size=16"):
        global_batches([5] * 10, 16, 1, 0)


def test_split_groups_by_key_and_is_stable():
    rows = [{"split_key": f"entry-{i % 20}", "row_id": str(i)} for i in range(200)]
    rows += [{"split_key": f"chunk-{i % 8}-{i % 8 + 3}", "row_id": f"c{i}"} for i in range(40)]
    train, evl = split_rows(rows, 0.25, seed=0)
    tk = {r["split_key"] for r in train}
    ek = {r["split_key"] for r in evl}
    assert tk.isdisjoint(ek) and len(train) + len(evl) == len(rows)
    # an exact share of each kind of key: 5 of 20 experiences, 2 of 8 chunks
    assert sorted(k.split("-")[0] for k in ek) == ["chunk"] * 2 + ["entry"] * 5
    # stable: the same keys in another order, or again, give the same split; another seed another one
    assert heldout_keys(reversed([r["split_key"] for r in rows]), 0.25, 0) == ek
    assert heldout_keys([r["split_key"] for r in rows], 0.25, 1) != ek
    assert heldout_keys(["entry-1", "entry-2"], 0.0, 0) == set()


def test_collate_positions_and_padding():
    rows = [
        {
            "input_ids": [5, 6, 7, 8],
            "topk_pos": [2, 2, 3],
            "topk_ids": [9, 10, 11],
            "topk_logprobs": [-0.1, -2.0, -0.5],
        },
        {"input_ids": [1, 2], "topk_pos": [1], "topk_ids": [3], "topk_logprobs": [-0.3]},
    ]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [1, 2, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["pred_b"].tolist() == [0, 0, 1] and b["pred_t"].tolist() == [1, 2, 0]
    assert b["topk_ids"].tolist() == [[9, 10], [11, 0], [3, 0]]
    assert torch.isinf(b["topk_logprobs"][1, 1]) and b["topk_logprobs"][0, 1] == pytest.approx(-2.0)


@pytest.mark.parametrize("pad_short_row", [False, True])
def test_eager_and_sdpa_attention_train_the_cartridge_alike(pad_short_row):
    """training.attn_implementation picks a kernel, not a different model: same logits, same gradients."""
    from helpers import tiny_llama

    from ray_cartridges.cartridge import create_cartridge, encoder
    from ray_cartridges.loss import kd_loss_sum
    from ray_cartridges.models import resolve_attention

    assert resolve_attention("auto", gpu=False) == "eager" and resolve_attention("auto", gpu=True) == "sdpa"
    assert resolve_attention("sdpa", gpu=False) == "sdpa" and resolve_attention("eager", gpu=True) == "eager"
    rng = np.random.default_rng(0)
    lengths = [19, 11 if pad_short_row else 19]
    rows = []
    for i, n in enumerate(lengths):
        pos = np.repeat(np.arange(n - 5, n), 3)
        rows.append(
            {
                "row_id": i,
                "input_ids": rng.integers(5, 500, size=n),
                "topk_pos": pos,
                "topk_ids": rng.integers(5, 500, size=len(pos)),
                "topk_logprobs": np.log(np.tile([0.6, 0.3, 0.1], 5)).astype(np.float32),
            }
        )
    batch = collate(rows, pad_id=0, top_k=3)
    results = {}
    for attn in ("eager", "sdpa"):
        pm = create_cartridge(
            tiny_llama(vocab=512, attn=attn), num_tokens=6, num_frozen_tokens=1, method="random", seed=2
        )
        logits = student_logits_at(pm, batch)
        kd_loss_sum(logits, batch["topk_ids"], batch["topk_logprobs"], True).backward()
        results[attn] = (logits.detach(), encoder(pm).trainable_embedding.grad.clone())
    assert torch.allclose(results["eager"][0], results["sdpa"][0], atol=1e-5)
    assert torch.allclose(results["eager"][1], results["sdpa"][1], atol=1e-5, rtol=1e-4)
    assert results["eager"][1].abs().sum() > 0
