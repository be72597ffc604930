import json

import pytest
import torch
from helpers import FailOnceAt, small_train_config

from ray_cartridges.config import TrainConfig, validate_config

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]


def _text_init_cfg(out, teacher_jsonl, memory, artifacts: bool = True, **training):
    """The bundled student, a 128-token cartridge initialised from the memory's text, 12 steps. ``artifacts``:
    also evaluate every 4 steps, save at step 6, export the Tokasaurus layout and log to wandb offline (which a
    run that only compares the final cartridge does not need)."""
    extra = {"eval_every": 4, "save_every": 6} if artifacts else {"eval_every": 12}
    return validate_config(
        TrainConfig,
        {
            "input_dataset": {"local_path": str(teacher_jsonl), "is_converted": False, "eval_fraction": 0.2},
            "output": {"local_dir": str(out), "export_tokasaurus": artifacts},
            "kv_cache": {"method": "text", "num_tokens": 128, "init_text": memory.render()},
            "training": {"global_batch_size": 4, "lr": 2e-2, "max_steps": 12, **extra} | training,
            "wandb": {"mode": "offline" if artifacts else "disabled", "project": "test"},
        },
    )


@pytest.fixture(scope="module")
def text_init_run(tmp_path_factory, ray_cluster, teacher_jsonl, memory):
    from ray_cartridges.train import run_training

    out = tmp_path_factory.mktemp("text_init") / "cartridge"
    return out, run_training(_text_init_cfg(out, teacher_jsonl, memory))


def test_text_init_cartridge_learns_from_teacher_data(text_init_run, tokenizer):
    from peft import PeftModel

    from ray_cartridges.cartridge import encoder, load_cache_pt, load_cartridge, read_meta
    from ray_cartridges.models import load_model

    out, summary = text_init_run
    assert summary["steps"] == 12
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 4, 8, 12]
    first, last = evals[0]["eval/loss"], evals[-1]["eval/loss"]
    assert last < 0.9 * first, f"held-out KD loss {first:.3f} -> {last:.3f}"
    train_steps = [m["step"] for m in metrics if "train/loss" in m]
    assert train_steps == list(range(1, 13))

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
        "cache-step6.pt",
        "distillation_config.yaml",
        "loss.png",
    ]:
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = list((out / "wandb").glob("offline-run-*"))  # wandb offline: run files, no login asked
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    meta = read_meta(out)
    assert meta.num_tokens == 128 and meta.extra["step"] == 12
    assert validate_config(TrainConfig, __import__("yaml").safe_load((out / "distillation_config.yaml").read_text()))

    # the saved cartridge is the trained one: loaders agree and it differs from its init
    ours = load_cartridge(load_model("smollm2-135m-instruct"), out, tokenizer)
    peft = PeftModel.from_pretrained(load_model("smollm2-135m-instruct"), str(out))
    assert torch.equal(encoder(ours).weight, encoder(peft).weight)
    cache = load_cache_pt(out / "cache-final.pt")
    step6 = load_cache_pt(out / "cache-step6.pt")
    assert not torch.equal(cache["trainable_keys"][0], step6["trainable_keys"][0])
    assert torch.equal(cache["frozen_keys"][0], step6["frozen_keys"][0])  # frozen tokens never move

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


def test_more_workers_than_a_local_cluster_holds_is_a_clear_error_not_a_wait(
    tmp_path, ray_cluster, teacher_jsonl, memory, monkeypatch, caplog
):
    """Ray Train waits for resources that a cluster started here (2 CPUs) will never have: the driver says so
    before any worker starts. On a cluster it joined, an autoscaler may add nodes: a warning, and it waits."""
    from ray_cartridges import raycluster
    from ray_cartridges.train import run_training

    with pytest.raises(ValueError, match=r"num_workers=4 needs CPU 4 \(the cluster has 2\), and this local Ray"):
        run_training(_train_cfg(tmp_path, teacher_jsonl, memory, 4, "big", global_batch_size=4))
    assert not (tmp_path / "big" / "ray_results").exists()  # refused before Ray Train started
    with pytest.raises(ValueError, match=r"needs GPU 1 \(the cluster has 0\)"):
        raycluster.check_fits({"CPU": 1.0, "GPU": 1.0}, "a GPU run")
    raycluster.check_fits({"CPU": 2.0}, "a run that fits")  # nothing to say
    monkeypatch.setattr(raycluster, "started_here", lambda: False)
    with caplog.at_level("WARNING", logger="ray_cartridges.raycluster"):
        raycluster.check_fits({"CPU": 4.0}, "a big run")
    assert "a big run needs CPU 4 (the cluster has 2): waiting for the cluster's autoscaler" in caplog.text


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, ray_cluster, teacher_jsonl, memory, tiny_model_dir):
    """The reference run of the mechanics tests: DeepSpeed ZeRO-3 over 2 workers, uninterrupted, the tiny random
    Llama, two passes over the 32 training rows in batches of 16 (4 steps), checkpoints every 2. The DDP and
    ZeRO-2 runs of the tests below are killed at step 3 and must end where it ends (Adam moves each cartridge
    entry ~lr a step whatever the model, so a resume that lost or repeated a step, or the optimizer state, or a
    backend's different update, ends elsewhere)."""
    from ray_cartridges.train import run_training

    root = tmp_path_factory.mktemp("reference")
    ds = {"backend": "deepspeed", "zero_stage": 3}
    summary = run_training(_mechanics_cfg(root, teacher_jsonl, memory, tiny_model_dir, "zero3", **ds))
    return root / "zero3", summary


MECHANICS_EPOCHS, MECHANICS_BATCH = 2, 16


def _mechanics_cfg(root, data, memory, student, name, max_failures=0, **training):
    """Sized by passes over the data (no max_steps): a re-run of a finished run must find its length itself."""
    scaling = {"max_failures": max_failures}
    sizing = {"max_steps": None, "epochs": MECHANICS_EPOCHS, "global_batch_size": MECHANICS_BATCH, "save_every": 2}
    return small_train_config(root, data, memory, 2, name, scaling, model_name=student, **sizing, **training)


def _sized_by_epochs(summary) -> bool:
    """The run's steps are its passes times the full batches of its training rows."""
    steps = MECHANICS_EPOCHS * (summary["train_rows"] // MECHANICS_BATCH)
    return summary["steps"] == steps >= 1 and summary["epochs"] == MECHANICS_EPOCHS


def _train_losses(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["step"] for m in lines if "train/loss" in m], [m["train/loss"] for m in lines if "train/loss" in m]


def _assert_ends_as(ref_dir, out_dir):
    """A killed and resumed run logged every step once, with the reference run's losses, and ended with its
    cartridge (1e-4: the backends sum the same terms in another order)."""
    from ray_cartridges.cartridge import load_cache_pt

    steps, losses = _train_losses(out_dir)
    assert steps == [1, 2, 3, 4]  # continuous, nothing repeated or skipped
    assert losses == pytest.approx(_train_losses(ref_dir)[1], abs=1e-4)
    a, b = load_cache_pt(ref_dir / "cache-final.pt"), load_cache_pt(out_dir / "cache-final.pt")
    for x, y in zip(a["trainable_keys"] + a["trainable_values"], b["trainable_keys"] + b["trainable_values"]):
        assert torch.allclose(x, y, atol=1e-4, rtol=0), float((x - y).abs().max())


def test_killed_worker_resumes_from_checkpoint_to_the_same_cartridge(
    tmp_path, reference_run, teacher_jsonl, memory, tiny_model_dir
):
    """A DDP run with a fault at step 3 (checkpoints every 2 steps): it restarts from step 2 and ends where the
    uninterrupted reference run ends, with its losses and every step logged exactly once; a re-run of a finished
    run (sized by passes, so its length comes from its own summary) is a no-op; teacher data regenerated at the
    same path is another run."""
    import helpers
    import ray.cloudpickle

    from ray_cartridges.train import run_training
    from ray_cartridges.train.driver import prepare_config, resolve_dataset, resume_point

    ref_out, ref_summary = reference_run
    assert _sized_by_epochs(ref_summary) and ref_summary["steps"] == 4
    ray.cloudpickle.register_pickle_by_value(helpers)  # the workers cannot import tests/
    data = tmp_path / "teacher.jsonl"  # a copy: regenerated below at the same path
    data.write_text(teacher_jsonl.read_text())
    faulty = _mechanics_cfg(tmp_path, data, memory, tiny_model_dir, "faulty", max_failures=1)
    first = run_training(faulty, callbacks=[FailOnceAt(3)])
    out = tmp_path / "faulty"
    assert (out / ".fault_injected").read_text() == "3"
    _assert_ends_as(ref_out, out)
    assert _sized_by_epochs(first)

    # a finished run, re-run with the same config, returns its summary and changes nothing
    before = [(out / f).read_bytes() for f in ("cache-final.pt", "metrics.jsonl")]
    summary = run_training(faulty)
    assert [(out / f).read_bytes() for f in ("cache-final.pt", "metrics.jsonl")] == before
    assert summary["steps"] == 4 and summary["run_hash"] == first["run_hash"]

    # teacher data regenerated at the same path is another run: neither a checkpoint nor the finished summary of
    # the old one counts for it (so it trains from step 0, as every fresh run here does)
    cfg, no_harm_text = prepare_config(faulty)
    finished = resume_point(cfg, resolve_dataset(cfg), no_harm_text)
    assert finished.run_hash == first["run_hash"] and finished.finished
    assert finished.checkpoint[0] == finished.finished_steps == 4
    # how often it checkpoints and logs does not make it another run
    other = cfg.model_copy(update={"training": cfg.training.model_copy(update={"save_every": 3, "log_every": 2})})
    assert resume_point(other, resolve_dataset(cfg), no_harm_text).run_hash == first["run_hash"]
    lines = teacher_jsonl.read_text().splitlines()
    data.write_text("\n".join(lines[: len(lines) * 2 // 3]) + "\n")
    point = resume_point(cfg, resolve_dataset(cfg), no_harm_text)
    assert point.run_hash != finished.run_hash and point.run_name != finished.run_name
    assert point.checkpoint is None and point.finished_steps is None and not point.finished


def test_deepspeed_zero2_resumed_and_zero3_give_one_cartridge_that_the_agent_loads(
    tmp_path, reference_run, teacher_jsonl, memory, tiny_model_dir, tokenizer
):
    """The same loop under DeepSpeed ZeRO-2 (2 workers, gloo on CPU), profiled (DeepSpeed's own timers give its
    gradient reduce) and killed at step 3: it resumes from DeepSpeed's checkpoint (read with weights_only=True)
    to the loss curve and the cartridge of the ZeRO-3 reference run (which the DDP run matches too), and both
    cartridges load in the agent."""
    import helpers
    import ray.cloudpickle

    from ray_cartridges.agent import KVArtifact, KVCacheMemoryConfig, KVMemoryAgent, KVMemoryAgentConfig
    from ray_cartridges.models import load_model
    from ray_cartridges.train import run_training

    ray.cloudpickle.register_pickle_by_value(helpers)
    ref_out = reference_run[0]
    ds = {"backend": "deepspeed", "zero_stage": 2}
    cfg = _mechanics_cfg(tmp_path, teacher_jsonl, memory, tiny_model_dir, "zero2", 1, profile=True, **ds)
    run_training(cfg, callbacks=[FailOnceAt(3)])
    out = tmp_path / "zero2"
    assert (out / ".fault_injected").read_text() == "3"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    comm = [json.loads(x)["time/comm_s"] for x in lines if "train/loss" in x]
    assert len(comm) == 4 and all(c > 0 for c in comm)
    _assert_ends_as(ref_out, out)
    model = load_model(str(tiny_model_dir))
    for d in (out, ref_out):
        agent = KVMemoryAgent(
            KVMemoryAgentConfig(KVCacheMemoryConfig(KVArtifact(str(d)))), model=model, tokenizer=tokenizer
        )
        assert agent.memory.num_tokens == 32 and agent.chat([{"role": "user", "content": "Hello"}], max_tokens=4), d


def test_deepspeed_checkpoint_files_are_read_as_tensors_only(tmp_path):
    import argparse

    from ray_cartridges.train.backends import _load_tensors_only

    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, tmp_path / "ok.pt")
    assert _load_tensors_only(str(tmp_path / "ok.pt"))["step"] == 3
    torch.save({"args": argparse.Namespace(cmd="anything")}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: refused to load a DeepSpeed checkpoint: it holds argparse.Namespace"):
        _load_tensors_only(str(tmp_path / "bad.pt"))


def test_no_harm_term_keeps_general_text_close_to_the_bare_model(
    tmp_path, text_init_run, teacher_jsonl, memory, model, tokenizer
):
    """training.no_harm_weight: the text-init run again with the term ends with a cartridge that disturbs general
    text less (perplexity relative to the bare model) than without it, and logs the term."""
    from ray_cartridges.cartridge import layer_kv, load_cartridge
    from ray_cartridges.eval.evaluate import no_harm
    from ray_cartridges.fsutil import bundled_data
    from ray_cartridges.models import load_model
    from ray_cartridges.train import run_training
    from ray_cartridges.train.no_harm import no_harm_chunks

    general = bundled_data("general.txt").read_text()
    text = tokenizer.decode(no_harm_chunks(tokenizer, general, 128)[0])
    plain = text_init_run[0]
    run_training(_text_init_cfg(tmp_path / "guarded", teacher_jsonl, memory, artifacts=False, no_harm_weight=2.0))
    ratios = {}
    for name, out in (("plain", plain), ("guarded", tmp_path / "guarded")):
        peft = load_cartridge(load_model("smollm2-135m-instruct"), out, tokenizer)
        kv = [(k.detach().clone(), v.detach().clone()) for k, v in layer_kv(peft)]
        ratios[name] = no_harm(model, tokenizer, kv, text)["ratio"]
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("train/no_harm_loss" in m for m in lines) == (name == "guarded")
    assert ratios["guarded"] < ratios["plain"], ratios
