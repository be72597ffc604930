"""Deterministic, length-bucketed batching of flat top-k rows and collation into tensors.

Every worker computes the same global batch plan from the same rows and seed, then takes its own slice
of each global batch. That makes the data a worker sees a pure function of (seed, step, rank): a run
resumes at any step without repeating or skipping data, and N workers x b see the same global batches
as 1 worker x N*b.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .contracts import SplitKey


def _key_rank(split_key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{split_key}".encode()).digest()[:8], "big")


def heldout_keys(keys, eval_fraction: float, seed: int) -> set[str]:
    """The split keys held out for evaluation: an exact share of the keys of each kind.

    A key's kind is the text before its first ``-`` (``entry`` for replay of one experience, ``chunk`` for
    self-study of a chunk, ...). Within each kind the keys are ordered by a seeded hash and the first
    ``round(eval_fraction * n)`` (at least one where the kind has two or more keys) are held out, so every kind
    is represented and the held-out share does not swing with hash luck. All rows of a key fall on one side.
    """
    if eval_fraction <= 0:
        return set()
    kinds: dict[str, list[str]] = {}
    for k in set(keys):
        kinds.setdefault(SplitKey.parse(k).kind, []).append(k)
    held: set[str] = set()
    for group in kinds.values():
        n = round(eval_fraction * len(group))
        n = max(n, 1 if len(group) > 1 else 0)
        held.update(sorted(group, key=lambda k: (_key_rank(k, seed), k))[:n])
    return held


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows, split by ``split_key`` (see :func:`heldout_keys`), order kept."""
    held = heldout_keys([r["split_key"] for r in rows], eval_fraction, seed)
    train = [r for r in rows if r["split_key"] not in held]
    evl = [r for r in rows if r["split_key"] in held]
    if eval_fraction > 0 and not evl and len(train) > 1:
        evl.append(train.pop())  # a single key: keep at least one held-out row
    return train, evl


def global_batches(
    lengths: list[int], global_batch_size: int, epochs: int, seed: int, bucket: int = 16
) -> list[list[int]]:
    """Row indices of every global batch of every epoch, length-bucketed, in training order.

    Per epoch: shuffle, cut into pools of ``bucket`` global batches, sort each pool by length (so a batch
    holds similar lengths and padding stays small), cut into batches, shuffle the batch order.
    The last incomplete batch of an epoch is dropped.
    """
    if len(lengths) < global_batch_size:
        raise ValueError(f"training.global_batch_size={global_batch_size} exceeds the {len(lengths)} training rows")
    lengths_arr = np.asarray(lengths)
    plan: list[list[int]] = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(lengths))
        pool = global_batch_size * bucket
        batches = []
        for s in range(0, len(order), pool):
            chunk = order[s : s + pool]
            chunk = chunk[np.argsort(lengths_arr[chunk], kind="stable")]
            batches += [chunk[i : i + global_batch_size].tolist() for i in range(0, len(chunk), global_batch_size)]
        batches = [b for b in batches if len(b) == global_batch_size]
        plan += [batches[i] for i in rng.permutation(len(batches))]
    return plan


def worker_slice(batch: list[int], rank: int, world: int) -> list[int]:
    return batch[rank::world]


def collate(rows: list[dict], pad_id: int, top_k: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of rows into model inputs plus the supervised positions and their teacher top-k.

    Returns input_ids/attention_mask [B, T]; pred_b/pred_t [P] (row and logit position predicting each
    supervised token, i.e. its position - 1); topk_ids/topk_logprobs [P, K] (padding: id 0, logprob -inf).
    """
    B = len(rows)
    T = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    pb, pt, groups = [], [], []
    for b, r in enumerate(rows):
        ids = np.asarray(r["input_ids"])
        input_ids[b, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
        mask[b, : len(ids)] = 1
        pos = np.asarray(r["topk_pos"])
        uniq, start, counts = np.unique(pos, return_index=True, return_counts=True)
        tids = np.asarray(r["topk_ids"])
        tlps = np.asarray(r["topk_logprobs"], dtype=np.float32)
        for u, s, c in zip(uniq, start, counts):
            pb.append(b)
            pt.append(int(u) - 1)
            groups.append((tids[s : s + c], tlps[s : s + c]))
    K = max(len(g[0]) for g in groups)
    if top_k is not None:
        K = min(K, top_k)
    P = len(groups)
    topk_ids = torch.zeros((P, K), dtype=torch.long)
    topk_lp = torch.full((P, K), float("-inf"), dtype=torch.float32)
    for i, (t, lp) in enumerate(groups):
        n = min(len(t), K)
        topk_ids[i, :n] = torch.from_numpy(t[:n].astype(np.int64))
        topk_lp[i, :n] = torch.from_numpy(lp[:n])
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pred_b": torch.tensor(pb, dtype=torch.long),
        "pred_t": torch.tensor(pt, dtype=torch.long),
        "topk_ids": topk_ids,
        "topk_logprobs": topk_lp,
    }


def student_logits_at(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the student and return logits only at the supervised positions: [P, V].

    Only the union of needed sequence positions goes through the LM head (``logits_to_keep``), which
    saves most of the [B, T, V] logits memory and compute.
    """
    keep = torch.unique(batch["pred_t"])  # sorted
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=keep,
        use_cache=False,
    )
    col = torch.searchsorted(keep, batch["pred_t"])
    return out.logits[batch["pred_b"], col]  # [P, V]
