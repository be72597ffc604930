"""The CUDA paths: NCCL DDP, DeepSpeed ZeRO on GPU, bf16 training, the agent on a GPU, cartridges in vLLM CUDA.

Skipped where torch sees no CUDA GPU (CI has none). Each test compares the GPU result with the same work done
on the CPU or under another backend, so a wrong device placement, a lost gradient or a broken cache fails it.
"""

import json

import pytest
import torch
from helpers import small_train_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _losses(path):
    lines = (path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["train/loss"] for x in lines if "train/loss" in x]


def _cfg(tmp_path, teacher_jsonl, memory, name, gpu=True, **training):
    return small_train_config(tmp_path, teacher_jsonl, memory, 1, name, scaling={"use_gpu": gpu}, **training)


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 matmuls in full precision on the GPU (no TF32), so CPU and GPU runs compare closely."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_nccl_ddp_on_gpu_matches_the_cpu_run(tmp_path, ray_cluster, teacher_jsonl, memory):
    """One GPU worker (nccl process group, the model and the cartridge on cuda) trains the same cartridge as
    one CPU worker from the same data and seed."""
    from ray_cartridges.cartridge import load_cache_pt
    from ray_cartridges.train import run_training

    gpu = run_training(_cfg(tmp_path, teacher_jsonl, memory, "gpu"))
    run_training(_cfg(tmp_path, teacher_jsonl, memory, "cpu", gpu=False))
    assert gpu["workers"][0]["device"].startswith("cuda"), gpu["workers"]
    assert _losses(tmp_path / "gpu") == pytest.approx(_losses(tmp_path / "cpu"), rel=1e-3)
    a = load_cache_pt(tmp_path / "gpu" / "cache-final.pt")["trainable_keys"]
    b = load_cache_pt(tmp_path / "cpu" / "cache-final.pt")["trainable_keys"]
    # written from the GPU, the export still loads on a machine without one (plain torch.load, no map_location)
    raw = torch.load(tmp_path / "gpu" / "cache-final.pt", weights_only=True)
    assert all(x.device.type == "cpu" for x in raw["trainable_keys"] + raw["frozen_values"])
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-3, rtol=0)


def test_deepspeed_zero2_and_zero3_on_gpu_match_ddp(tmp_path, ray_cluster, teacher_jsonl, memory):
    from ray_cartridges.cartridge import load_cache_pt
    from ray_cartridges.train import run_training

    run_training(_cfg(tmp_path, teacher_jsonl, memory, "ddp"))
    ref = load_cache_pt(tmp_path / "ddp" / "cache-final.pt")["trainable_keys"]
    for stage in (2, 3):
        name = f"zero{stage}"
        run_training(_cfg(tmp_path, teacher_jsonl, memory, name, backend="deepspeed", zero_stage=stage))
        assert _losses(tmp_path / name) == pytest.approx(_losses(tmp_path / "ddp"), abs=1e-4), name
        got = load_cache_pt(tmp_path / name / "cache-final.pt")["trainable_keys"]
        for x, y in zip(ref, got):
            assert torch.allclose(x, y, atol=1e-4, rtol=0), name


def test_bf16_model_on_gpu_learns(tmp_path, ray_cluster, teacher_jsonl, memory):
    """bf16 frozen weights on the GPU (fp32 cartridge, bf16 autocast): the held-out KD loss falls, and follows
    the fp32 run of the same data and seed within bf16 rounding, so the cast loses no learning signal."""
    from ray_cartridges.train import run_training

    curves = {}
    for dtype in ("bf16", "fp32"):
        cfg = _cfg(tmp_path, teacher_jsonl, memory, dtype, max_steps=24, eval_every=12)
        run_training(cfg.model_copy(update={"model_dtype": dtype}))
        lines = [json.loads(x) for x in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
        curves[dtype] = [m["eval/loss"] for m in lines if "eval/loss" in m]
    bf16, fp32 = curves["bf16"], curves["fp32"]
    assert len(bf16) == 3 and bf16[-1] < bf16[1] < bf16[0], curves
    # what bf16 learned is most of what fp32 learned, and its losses stay close to fp32's
    assert bf16[0] - bf16[-1] > 0.7 * (fp32[0] - fp32[-1]), curves
    assert bf16 == pytest.approx(fp32, rel=0.03), curves


def test_agent_on_gpu_answers_like_the_cpu_agent(tmp_path, ray_cluster, teacher_jsonl, memory, tokenizer):
    """KVMemoryAgent with device=cuda: the same greedy tokens and logprobs (within float noise) as on the CPU;
    the two may only part ways where the two best tokens are a near tie."""
    from ray_cartridges.agent import KVArtifact, KVCacheMemoryConfig, KVMemoryAgent, KVMemoryAgentConfig
    from ray_cartridges.agent.decoding import SamplingParams
    from ray_cartridges.train import run_training

    run_training(_cfg(tmp_path, teacher_jsonl, memory, "cart"))
    convs = [[{"role": "user", "content": g[0].content}] for g in memory.triples()[:3]]
    sp = SamplingParams(max_tokens=12, top_logprobs=5)
    out = {}
    for dev in ("cpu", "cuda"):
        mc = KVCacheMemoryConfig(KVArtifact(str(tmp_path / "cart")), device=dev)
        agent = KVMemoryAgent(KVMemoryAgentConfig(mc, engine="transformers"))
        assert next(agent.model.parameters()).device.type == dev
        assert all(k.device.type == dev for k, _ in agent.prefix_kv())
        out[dev] = agent.complete(convs, sp)
    _same_greedy(out["cpu"], out["cuda"])

    # the cartridge inside vLLM's CUDA engine (KV connector) answers as the transformers reference does
    from ray_cartridges.vllm_cartridges import CartridgeLLM

    engine = CartridgeLLM("smollm2-135m-instruct", dtype="fp32", max_model_len=2048, gpu_memory_utilization=0.3)
    vllm_agent = KVMemoryAgent(
        KVMemoryAgentConfig(KVCacheMemoryConfig(KVArtifact(str(tmp_path / "cart")))), engine=engine
    )
    first = vllm_agent.complete(convs, sp)
    _same_greedy(out["cuda"], first)
    assert all(c.cartridge_tokens_loaded is not None for c in first)


def _same_greedy(first, second):
    """Greedy completions that agree token for token, logprobs within float noise, except that they may part
    ways where the two best tokens are a near tie."""
    for c, g in zip(first, second):
        n = min(len(c.token_ids), len(g.token_ids))
        assert n > 0
        same = 0
        while same < n and c.token_ids[same] == g.token_ids[same]:
            same += 1
        for a, b in zip(c.logprobs[:same], g.logprobs[:same]):
            assert abs(a["logprob"] - b["logprob"]) < 1e-2
        if same < n:
            top = c.logprobs[same]["top"]
            assert top[0][1] - top[1][1] < 1e-2, (same, c.text, g.text)
