import json

import pytest
import torch

from ray_cartridges.config import TrainConfig, validate_config

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]


def test_text_init_cartridge_learns_from_teacher_data(tmp_path, ray_cluster, teacher_jsonl, memory, tokenizer):
    from peft import PeftModel

    from ray_cartridges.cartridge import encoder, load_cache_pt, load_cartridge, read_meta
    from ray_cartridges.models import load_model
    from ray_cartridges.train import run_training

    out = tmp_path / "cartridge"
    cfg = validate_config(
        TrainConfig,
        {
            "input_dataset": {"local_path": str(teacher_jsonl), "is_converted": False, "eval_fraction": 0.2},
            "output": {"local_dir": str(out)},
            "kv_cache": {"method": "text", "num_tokens": 128, "init_text": memory.render()},
            "training": {"global_batch_size": 4, "lr": 2e-2, "max_steps": 36, "eval_every": 12, "save_every": 18},
        },
    )
    summary = run_training(cfg)
    assert summary["steps"] == 36
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 12, 24, 36]
    first, last = evals[0]["eval/loss"], evals[-1]["eval/loss"]
    assert last < 0.9 * first, f"held-out KD loss {first:.3f} -> {last:.3f}"
    train_steps = [m["step"] for m in metrics if "train/loss" in m]
    assert train_steps == list(range(1, 37))

    # artifacts: PEFT adapter, exports at the save step and the end, resolved config, plot
    for name in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "cartridge.json",
        "cache-final.pt",
        "cache-step18.pt",
        "distillation_config.yaml",
        "loss.png",
    ]:
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = read_meta(out)
    assert meta.num_tokens == 128 and meta.extra["step"] == 36
    assert validate_config(TrainConfig, __import__("yaml").safe_load((out / "distillation_config.yaml").read_text()))

    # the saved cartridge is the trained one: loaders agree and it differs from its init
    ours = load_cartridge(load_model("smollm2-135m-instruct"), out, tokenizer)
    peft = PeftModel.from_pretrained(load_model("smollm2-135m-instruct"), str(out))
    assert torch.equal(encoder(ours).weight, encoder(peft).weight)
    cache = load_cache_pt(out / "cache-final.pt")
    step18 = load_cache_pt(out / "cache-step18.pt")
    assert not torch.equal(cache["trainable_keys"][0], step18["trainable_keys"][0])
    assert torch.equal(cache["frozen_keys"][0], step18["frozen_keys"][0])  # frozen tokens never move
