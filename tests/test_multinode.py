"""Data-parallel training across two (simulated) Ray nodes: the same cartridge as one worker with the whole batch.

Runs in its own pytest process (see the Makefile): it starts its own multi-node cluster with
``ray.cluster_utils.Cluster``, which must not meet the suite's session cluster in one process.
"""

import json

import pytest
import torch
from helpers import small_train_config

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a worker node, one CPU each: two one-CPU training workers can only land one per node."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("a Ray cluster is already connected in this process (run this file on its own)")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _cfg(tmp_path, teacher_jsonl, memory, workers: int, name: str, model_name, **training):
    return small_train_config(
        tmp_path,
        teacher_jsonl,
        memory,
        workers,
        name,
        scaling={"resources_per_worker": {"CPU": 1}},
        model_name=model_name,
        **training,
    )


def _metrics(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_on_two_nodes_match_one_worker_with_the_whole_batch(
    two_nodes, tmp_path, teacher_jsonl, memory, tiny_model_dir
):
    """DDP over gloo, 2 nodes x 1 worker x 2 rows == 1 worker x 4 rows, after 4 steps (same data and seed).

    Tolerance 1e-4 absolute on the cartridge and the losses: the two runs sum the same per-token losses
    in a different order (per worker, then all-reduce), so they agree to float32 rounding, not bit for bit.
    Student: the tiny random Llama (what is checked is that the two layouts agree).
    """
    from ray_cartridges.cartridge import load_cache_pt
    from ray_cartridges.train import run_training

    one = run_training(_cfg(tmp_path, teacher_jsonl, memory, 1, "one", tiny_model_dir, eval_every=2))
    two = run_training(_cfg(tmp_path, teacher_jsonl, memory, 2, "two", tiny_model_dir, eval_every=2, profile=True))

    # the two workers really ran on two different nodes of the cluster
    nodes = {n["NodeID"] for n in __import__("ray").nodes() if n["Alive"]}
    assert len(nodes) == 2
    assert [w["rank"] for w in two["workers"]] == [0, 1]
    assert {w["node_id"] for w in two["workers"]} == nodes
    assert len(one["workers"]) == 1

    a = load_cache_pt(tmp_path / "one" / "cache-final.pt")
    b = load_cache_pt(tmp_path / "two" / "cache-final.pt")
    for ka, kb in zip(a["trainable_keys"] + a["trainable_values"], b["trainable_keys"] + b["trainable_values"]):
        assert torch.allclose(ka, kb, atol=1e-4, rtol=0), float((ka - kb).abs().max())
    ma, mb = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    la = [m["train/loss"] for m in ma if "train/loss" in m]
    lb = [m["train/loss"] for m in mb if "train/loss" in m]
    assert len(la) == len(lb) == 4 and la == pytest.approx(lb, abs=1e-4)
    assert la[0] != pytest.approx(la[-1], abs=1e-3)  # it did train
    ea = [m["eval/loss"] for m in ma if "eval/loss" in m]
    eb = [m["eval/loss"] for m in mb if "eval/loss" in m]
    assert len(ea) == 3 and ea == pytest.approx(eb, abs=1e-4)  # held-out eval is sharded, then all-reduced

    # profiling: every phase timed, gradient all-reduce counted as communication, phases within the step time
    for m in (m for m in mb if "train/loss" in m):
        phases = [m[f"time/{k}_s"] for k in ("data", "forward", "backward", "optimizer", "comm")]
        assert all(x >= 0 for x in phases) and m["time/comm_s"] > 0 and m["time/forward_s"] > 0
        assert 0.5 * m["train/step_time_s"] <= sum(phases) <= m["train/step_time_s"] * 1.01
    assert not any(k.startswith("time/") for k in ma[1])  # off by default
