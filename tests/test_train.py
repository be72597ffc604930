import json

import pytest
import torch
from helpers import FailOnceAt, small_train_config

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
            "output": {"local_dir": str(out), "export_tokasaurus": True},
            "kv_cache": {"method": "text", "num_tokens": 128, "init_text": memory.render()},
            "training": {"global_batch_size": 4, "lr": 2e-2, "max_steps": 36, "eval_every": 12, "save_every": 18},
            "wandb": {"mode": "offline", "project": "test"},
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

    # the best held-out cartridge so far is kept apart, with the step and loss it was chosen for
    best_eval = min(evals, key=lambda m: m["eval/loss"])
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == best_eval["step"] == summary["best"]["step"]
    assert best["eval/loss"] == pytest.approx(best_eval["eval/loss"], rel=1e-9)
    assert read_meta(out / "best").extra["step"] == best["step"]
    assert summary["workers"][0]["rank"] == 0

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
    runs = list((out / "wandb").glob("offline-run-*"))  # wandb offline: run files, no login asked
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
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

    # asked for, the Tokasaurus layout of the final cartridge lies inside the artifact (pushed with it)
    toka = out / "tokasaurus" / out.name
    assert summary["tokasaurus"] == str(toka)
    cfg_toka = __import__("yaml").safe_load((toka / "config.yaml").read_text())
    assert cfg_toka["kv_cache_initializer"]["max_tokens"] == 128
    theirs = torch.load(toka / "cartridge.pt", weights_only=True)
    assert torch.equal(theirs["trainable_keys"][0].float(), cache["trainable_keys"][0].to(torch.bfloat16).float())


_train_cfg = small_train_config


def test_global_batch_that_does_not_divide_is_a_clear_error(tmp_path, ray_cluster, teacher_jsonl, memory):
    from ray_cartridges.train import run_training

    with pytest.raises(Exception, match="global_batch_size=3 does not divide over scaling.num_workers=2"):
        run_training(_train_cfg(tmp_path, teacher_jsonl, memory, 2, "bad", global_batch_size=3))


def test_killed_worker_resumes_from_checkpoint_to_the_same_cartridge(
    tmp_path, ray_cluster, teacher_jsonl, memory, tiny_model_dir
):
    """A fault at step 3 (checkpoints every 2 steps): the run restarts from step 2 and ends where an
    uninterrupted run ends, with every step logged exactly once; a re-run of a finished run is a no-op.
    (Student: the tiny random Llama; Adam moves each cartridge entry ~lr a step whatever the model, so a resume
    that lost or repeated a step, or the optimizer state, ends elsewhere.)"""
    from functools import partial

    import helpers
    import ray.cloudpickle

    from ray_cartridges.cartridge import load_cache_pt
    from ray_cartridges.train import run_training

    ray.cloudpickle.register_pickle_by_value(helpers)  # the workers cannot import tests/
    _train_cfg = partial(small_train_config, model_name=tiny_model_dir)

    data = tmp_path / "teacher.jsonl"  # a copy: regenerated below at the same path
    data.write_text(teacher_jsonl.read_text())
    run_training(_train_cfg(tmp_path, data, memory, 1, "clean", max_steps=6, save_every=2))
    faulty = _train_cfg(tmp_path, teacher_jsonl, memory, 1, "faulty", max_steps=6, save_every=2)
    faulty = faulty.model_copy(update={"scaling": faulty.scaling.model_copy(update={"max_failures": 1})})
    run_training(faulty, callbacks=[FailOnceAt(3)])
    assert (tmp_path / "faulty" / ".fault_injected").read_text() == "3"
    a = load_cache_pt(tmp_path / "clean" / "cache-final.pt")
    b = load_cache_pt(tmp_path / "faulty" / "cache-final.pt")
    for ka, kb in zip(a["trainable_keys"] + a["trainable_values"], b["trainable_keys"] + b["trainable_values"]):
        assert torch.allclose(ka, kb, atol=1e-5, rtol=0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [
        s
        for s, line in zip(steps, (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines())
        if "train/loss" in line
    ]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # continuous, nothing repeated or skipped

    # a finished run, re-run with the same config, resumes at its end and changes nothing
    before = (tmp_path / "clean" / "cache-final.pt").read_bytes()
    summary = run_training(_train_cfg(tmp_path, data, memory, 1, "clean", max_steps=6, save_every=2))
    assert (tmp_path / "clean" / "cache-final.pt").read_bytes() == before and summary["steps"] == 6

    # teacher data regenerated at the same path is another run: trained afresh, not resumed from the old end
    lines = teacher_jsonl.read_text().splitlines()
    data.write_text("\n".join(lines[: len(lines) * 2 // 3]) + "\n")
    summary = run_training(_train_cfg(tmp_path, data, memory, 1, "clean", max_steps=6, save_every=2))
    assert summary["steps"] == 6 and (tmp_path / "clean" / "cache-final.pt").read_bytes() != before


def test_deepspeed_zero2_and_zero3_match_ddp(tmp_path, ray_cluster, teacher_jsonl, memory, tiny_model_dir, tokenizer):
    """The same loop under DeepSpeed ZeRO-2/3 (2 workers, gloo on CPU): same loss curve as DDP, and the
    cartridge it writes loads in the agent. (Student: the tiny random Llama.)"""
    from functools import partial

    from ray_cartridges.agent import KVArtifact, KVCacheMemoryConfig, KVMemoryAgent, KVMemoryAgentConfig
    from ray_cartridges.cartridge import load_cache_pt
    from ray_cartridges.models import load_model
    from ray_cartridges.train import run_training

    _train_cfg = partial(small_train_config, model_name=tiny_model_dir)
    model = load_model(str(tiny_model_dir))

    def losses(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["train/loss"] for x in lines if "train/loss" in x]

    run_training(_train_cfg(tmp_path, teacher_jsonl, memory, 2, "ddp"))
    ref = load_cache_pt(tmp_path / "ddp" / "cache-final.pt")
    for stage in (2, 3):
        name = f"zero{stage}"
        # ZeRO-2 also profiled: DeepSpeed's own timers give its gradient reduce; results must not change
        extra = {"profile": True} if stage == 2 else {}
        cfg = _train_cfg(tmp_path, teacher_jsonl, memory, 2, name, backend="deepspeed", zero_stage=stage, **extra)
        run_training(cfg)
        assert losses(name) == pytest.approx(losses("ddp"), abs=1e-4), name
        if stage == 2:
            lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
            comm = [json.loads(x)["time/comm_s"] for x in lines if "train/loss" in x]
            assert len(comm) == 4 and all(c > 0 for c in comm)
        got = load_cache_pt(tmp_path / name / "cache-final.pt")
        for a, b in zip(ref["trainable_keys"], got["trainable_keys"]):
            assert torch.allclose(a, b, atol=1e-4, rtol=0), name
        agent = KVMemoryAgent(
            KVMemoryAgentConfig(KVCacheMemoryConfig(KVArtifact(str(tmp_path / name)))), model=model, tokenizer=tokenizer
        )
        assert agent.memory.num_tokens == 32 and agent.chat([{"role": "user", "content": "Hello"}], max_tokens=4)
        if stage == 2:  # re-run: resumes at its end from DeepSpeed's checkpoint, read with weights_only=True
            before = (tmp_path / name / "cache-final.pt").read_bytes()
            assert run_training(cfg)["steps"] == 4 and (tmp_path / name / "cache-final.pt").read_bytes() == before


def test_deepspeed_checkpoint_files_are_read_as_tensors_only(tmp_path):
    import argparse

    from ray_cartridges.train.backends import _load_tensors_only

    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, tmp_path / "ok.pt")
    assert _load_tensors_only(str(tmp_path / "ok.pt"))["step"] == 3
    torch.save({"args": argparse.Namespace(cmd="anything")}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="refused to load a DeepSpeed checkpoint holding non-tensor objects"):
        _load_tensors_only(str(tmp_path / "bad.pt"))


def test_no_harm_term_keeps_general_text_close_to_the_bare_model(
    tmp_path, ray_cluster, teacher_jsonl, memory, model, tokenizer
):
    """training.no_harm_weight: the same run with the term ends with a cartridge that disturbs general text
    less (perplexity relative to the bare model) than without it, and logs the term."""
    from ray_cartridges.cartridge import layer_kv, load_cartridge
    from ray_cartridges.eval.evaluate import no_harm
    from ray_cartridges.fsutil import bundled_data
    from ray_cartridges.models import load_model
    from ray_cartridges.train import run_training
    from ray_cartridges.train.no_harm import no_harm_chunks

    general = bundled_data("general.txt").read_text()
    text = tokenizer.decode(no_harm_chunks(tokenizer, general, 128)[0])
    ratios = {}
    for name, weight in (("plain", 0.0), ("guarded", 2.0)):
        run_training(_train_cfg(tmp_path, teacher_jsonl, memory, 1, name, max_steps=8, lr=2e-2, no_harm_weight=weight))
        peft = load_cartridge(load_model("smollm2-135m-instruct"), tmp_path / name, tokenizer)
        kv = [(k.detach().clone(), v.detach().clone()) for k, v in layer_kv(peft)]
        ratios[name] = no_harm(model, tokenizer, kv, text)["ratio"]
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert any("train/no_harm_loss" in m for m in lines) == (weight > 0)
    assert ratios["guarded"] < ratios["plain"], ratios
