"""Hub code paths offline: the real huggingface_hub calls against a hub-layout cache (HF_HUB_OFFLINE=1),
and a push that cannot reach the hub fails cleanly, leaving the local artifact intact."""

import shutil
from pathlib import Path

import pytest


def lay_out_hub_cache(cache: Path, repo_id: str, repo_type: str, src: Path, commit: str = "a" * 40) -> Path:
    """Put ``src`` into ``cache`` exactly where huggingface_hub's snapshot_download looks for it."""
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    shutil.copytree(src, snap)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def test_agent_pulls_a_hub_cartridge_from_the_cache(tmp_path, offline_hub, model, tokenizer):
    from ray_cartridges.agent import KVArtifact, KVCacheMemoryConfig, KVMemoryAgent, KVMemoryAgentConfig
    from ray_cartridges.cartridge import CartridgeMeta, ModelShape, create_cartridge, save_cartridge
    from ray_cartridges.models import tokenizer_fingerprint

    pm = create_cartridge(model, num_tokens=8, method="random", seed=5)
    meta = CartridgeMeta("smollm2-135m-instruct", ModelShape.of(model), 8, 1, tokenizer_fingerprint(tokenizer))
    save_cartridge(pm, tmp_path / "local", meta)
    lay_out_hub_cache(offline_hub, "acme/station-cartridge", "model", tmp_path / "local")

    msg = [{"role": "user", "content": "Hello"}]
    hub = KVMemoryAgent(
        KVMemoryAgentConfig(KVCacheMemoryConfig(KVArtifact("acme/station-cartridge", source="huggingface"))),
        model=model,
        tokenizer=tokenizer,
    )
    local = KVMemoryAgent(
        KVMemoryAgentConfig(KVCacheMemoryConfig(KVArtifact(str(tmp_path / "local")))), model=model, tokenizer=tokenizer
    )
    assert str(hub.memory.dir).startswith(str(offline_hub))
    assert hub.chat(msg, max_tokens=8) == local.chat(msg, max_tokens=8)

    from ray_cartridges.hub import HubError

    with pytest.raises(HubError, match="acme/missing"):
        KVMemoryAgent(
            KVMemoryAgentConfig(KVCacheMemoryConfig(KVArtifact("acme/missing", source="huggingface"))),
            model=model,
            tokenizer=tokenizer,
        )


def test_training_input_dataset_repo_id_resolves_from_the_cache(tmp_path, offline_hub):
    from ray_cartridges.config import TrainConfig, validate_config
    from ray_cartridges.flat_topk import write_flat_topk
    from ray_cartridges.train.driver import resolve_dataset

    src = tmp_path / "ds"
    row = {
        "row_id": "a",
        "input_ids": [1, 2, 3],
        "topk_pos": [1, 2],
        "topk_ids": [4, 5],
        "topk_logprobs": [-0.1, -0.2],
        "num_positions": 2,
        "split_key": "k",
        "metadata": "{}",
    }
    write_flat_topk([row], src / "shards" / "shard-00000-x.parquet")
    (src / "README.md").write_text("dataset card")
    lay_out_hub_cache(offline_hub, "acme/station-data", "dataset", src)
    cfg = validate_config(
        TrainConfig, {"input_dataset": {"repo_id": "acme/station-data"}, "output": {"local_dir": str(tmp_path / "o")}}
    )
    files = resolve_dataset(cfg)
    assert [f.name for f in files] == ["shard-00000-x.parquet"] and str(files[0]).startswith(str(offline_hub))


def test_failed_push_keeps_the_local_artifact_and_says_how_to_retry(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    from ray_cartridges.hub import HubError, push_folder

    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the push fails fast
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_token_for_test")
    art = tmp_path / "cartridge"
    art.mkdir()
    (art / "adapter_model.safetensors").write_bytes(b"weights")
    with pytest.raises(HubError) as e:
        push_folder(art, "acme/station-cartridge", repo_type="model")
    msg = str(e.value)
    assert "acme/station-cartridge" in msg and "retry" in msg and "huggingface-cli upload" in msg
    assert "hf_dummy_token_for_test" not in msg  # no secrets in errors
    assert (art / "adapter_model.safetensors").read_bytes() == b"weights"
