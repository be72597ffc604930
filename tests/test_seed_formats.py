"""The research workflow's files, laid out as its own code writes them (fixtures written by hand from its field
lists): checkpoints with only latest.json {"path": ...}, {file:} system prompts, memory_snapshot_path."""

import json
import shutil

import pytest
import torch
from helpers import EXAMPLE_CHECKPOINT

from ray_cartridges.memory import CheckpointError, read_memory


def _their_checkpoint(tmp_path, system_prompt="You help.", snapshot="memory_3.jsonl"):
    """A HistoryAgent checkpoint as the research workflow writes one, without the `latest` symlink."""
    root = tmp_path / "run"
    ep = root / "checkpoints" / "ep_000003"
    ep.mkdir(parents=True)
    lines = [
        {"type": "Observation", "content": "Where is the spare key?"},
        {"type": "Action", "content": "I do not know."},
        {"type": "Feedback", "content": {"message": "The spare key is in the blue tin.", "score": 0}},
    ]
    (ep / "memory_3.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (ep / "agent.json").write_text(
        json.dumps(
            {
                "agent_type": "HistoryAgent",
                "agent_config": {"system_prompt": system_prompt, "history_k": 10},
                "memory_type": "HistoryList",
                "memory_snapshot_path": snapshot,
            }
        )
    )
    (ep / "runtime.json").write_text(
        json.dumps(
            {
                "timestamp": "2025-09-01T12:00:00",
                "episode_index": 3,
                "train_steps_total": 9,
                "agent_type": "HistoryAgent",
                "memory_snapshot_path": snapshot,
            }
        )
    )
    (root / "checkpoints" / "latest.json").write_text(json.dumps({"path": "ep_000003"}))
    return root


def test_a_checkpoint_with_only_latest_json_path_is_read(tmp_path):
    mem = read_memory(_their_checkpoint(tmp_path))
    assert len(mem.entries) == 3 and "blue tin" in mem.render()
    # a snapshot path written on another machine is found by its name in the episode directory
    mem = read_memory(_their_checkpoint(tmp_path / "b", snapshot="/home/someone/run/ep_000003/memory_3.jsonl"))
    assert "blue tin" in mem.render()
    with pytest.raises(CheckpointError, match="memory_snapshot_path 'memory_9.jsonl' is not a file"):
        read_memory(_their_checkpoint(tmp_path / "c", snapshot="memory_9.jsonl"))
    # ours is laid out the same way and still reads without its symlink
    ours = tmp_path / "ours"
    shutil.copytree(EXAMPLE_CHECKPOINT, ours, symlinks=True)
    (ours / "checkpoints" / "latest").unlink()
    assert json.loads((ours / "checkpoints" / "latest.json").read_text()) == {"path": "ep_000030"}
    assert len(read_memory(ours).entries) == len(read_memory(EXAMPLE_CHECKPOINT).entries)


def test_file_system_prompts_are_read_from_the_checkpoint(tmp_path):
    root = _their_checkpoint(tmp_path, system_prompt="{file:prompts/agent.txt}")
    (root / "prompts").mkdir()
    (root / "prompts" / "agent.txt").write_text("You are the key keeper.")
    mem = read_memory(root)
    assert mem.system_prompt == "You are the key keeper." and "{file:" not in mem.render()
    missing = _their_checkpoint(tmp_path / "m", system_prompt="{file:prompts/none.txt}")
    with pytest.raises(CheckpointError, match=r"system_prompt '\{file:prompts/none.txt\}' names a file that is not"):
        read_memory(missing)


def test_their_agent_config_keys_are_accepted_and_wandb_artifacts_refused_clearly():
    from ray_cartridges.agent import KVArtifact, KVCacheMemoryConfig, KVMemoryAgentConfig

    cfg = KVMemoryAgentConfig(KVCacheMemoryConfig(KVArtifact("x")), history_k=30, verbose=True)
    assert cfg.history_k == 30 and cfg.verbose
    with pytest.raises(ValueError, match="wandb artifacts are not supported"):
        KVArtifact("team/project/cartridge:v3", source="wandb").local_dir()


def _their_pt(path, keys, values, n_frozen, naming, dtype=torch.bfloat16):
    """A .pt as their TrainableCache saves it: nn.ParameterLists of [1, H, n, D] per layer."""

    def plist(xs, a, b):
        return torch.nn.ParameterList([torch.nn.Parameter(x[:, a:b].unsqueeze(0).to(dtype)) for x in xs])

    p = keys[0].shape[1]
    fk, fv = FROZEN[naming]
    state = {
        "trainable_keys": plist(keys, n_frozen, p),
        "trainable_values": plist(values, n_frozen, p),
        fk: plist(keys, 0, n_frozen),
        fv: plist(values, 0, n_frozen),
    }
    torch.save(state, path)
    return path


FROZEN = {"frozen": ("frozen_keys", "frozen_values"), "fixed": ("fixed_keys", "fixed_values")}


@pytest.fixture(scope="module")
def text_cartridge(tmp_path_factory, model, tokenizer, memory):
    from helpers import bundled_meta

    from ray_cartridges.cartridge import create_cartridge, save_cartridge

    pm = create_cartridge(model, num_tokens=32, method="text", tokenizer=tokenizer, text=memory.render())
    return save_cartridge(pm, tmp_path_factory.mktemp("interop") / "c", bundled_meta(model, tokenizer, 32))


@pytest.mark.parametrize("naming", ["frozen", "fixed"])
def test_their_pt_cartridge_imports_and_answers_like_the_cartridge_it_came_from(
    tmp_path, text_cartridge, model, tokenizer, naming
):
    from ray_cartridges.agent import KVArtifact, KVCacheMemoryConfig, KVMemoryAgent, KVMemoryAgentConfig
    from ray_cartridges.agent.kv_memory import KVCacheMemory
    from ray_cartridges.interop import import_cartridge

    kv = KVCacheMemory.from_dir(text_cartridge, model=model, tokenizer=tokenizer).kv
    pt = _their_pt(tmp_path / "cache.pt", [k for k, _ in kv], [v for _, v in kv], 1, naming, dtype=torch.float32)
    out = import_cartridge(pt, "smollm2-135m-instruct", tmp_path / "imported")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id, not a local path

    def reply(path):
        mc = KVCacheMemoryConfig(KVArtifact(str(path)))
        agent = KVMemoryAgent(KVMemoryAgentConfig(mc, engine="transformers"), model=model, tokenizer=tokenizer)
        return agent.chat([{"role": "user", "content": "Who is the station doctor?"}], max_tokens=16)

    assert reply(out) == reply(text_cartridge) and reply(out)
    meta = json.loads((out / "cartridge.json").read_text())
    assert meta["num_tokens"] == 32 and meta["num_frozen_tokens"] == 1 and meta["init_method"] == "imported"
    # bf16, as their trainer saves a random init: read and widened
    _their_pt(tmp_path / "bf16.pt", [k for k, _ in kv], [v for _, v in kv], 1, naming)
    from ray_cartridges.interop import read_cartridges_pt

    keys, _, n_frozen = read_cartridges_pt(tmp_path / "bf16.pt")
    assert n_frozen == 1 and keys[0].dtype == torch.float32 and torch.allclose(keys[3], kv[3][0], atol=0.05)


class _Payload:
    """A pickle that makes a directory when unpickled: what a hostile .pt could run instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def test_a_pt_with_other_objects_or_shapes_is_refused(tmp_path, tiny_model_dir):
    import argparse

    from ray_cartridges.cartridge import CartridgeMismatchError
    from ray_cartridges.interop import import_cartridge, read_cartridges_pt

    torch.save({"trainable_keys": argparse.Namespace(run="anything")}, tmp_path / "evil.pt")  # not a tensor
    with pytest.raises(ValueError, match=r"evil.pt: refused to load a Cartridges .pt: it holds argparse.Namespace"):
        read_cartridges_pt(tmp_path / "evil.pt")
    torch.save({"trainable_keys": _Payload(tmp_path / "ran")}, tmp_path / "code.pt")  # unpickling would run code
    with pytest.raises(ValueError, match=r"it holds posix.mkdir \(not a tensor\)") as refused:
        read_cartridges_pt(tmp_path / "code.pt")
    assert not (tmp_path / "ran").exists() and "weights_only` set to `False" not in str(refused.value)
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match="text.pt: refused to load a Cartridges .pt: not a file of tensors"):
        read_cartridges_pt(tmp_path / "text.pt")
    ks = [torch.randn(3, 8, 64) for _ in range(30)]
    _their_pt(tmp_path / "c.pt", ks, ks, 1, "frozen")
    with pytest.raises(CartridgeMismatchError, match="num_layers: file has 30, model has 2"):
        import_cartridge(tmp_path / "c.pt", str(tiny_model_dir), tmp_path / "out")


def test_exports_for_their_trainer_and_tokasaurus(tmp_path, text_cartridge):
    import yaml

    from ray_cartridges.cli import main
    from ray_cartridges.interop import read_cartridges_pt

    assert main(["export-cartridge", str(text_cartridge), "--out", str(tmp_path / "c.pt"), "--dtype", "bf16"]) == 0
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["trainable_keys"][0].dtype == torch.bfloat16 and raw["trainable_keys"][0].shape == (1, 3, 31, 64)
    assert raw["frozen_keys"][0].shape == (1, 3, 1, 64) and len(raw["trainable_values"]) == 30
    assert main(["export-cartridge", str(text_cartridge), "--format", "tokasaurus", "--out", str(tmp_path / "tk")]) == 0
    out = tmp_path / "tk" / text_cartridge.name
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["kv_cache_initializer"]["max_tokens"] == 32
    assert cfg["model"]["pretrained_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    keys, _, n_frozen = read_cartridges_pt(out / "cartridge.pt")
    assert keys[0].shape == (3, 32, 64) and n_frozen == 1


def _as_their_topk_record(rec):
    """Our seed record written as their later data_generation.py writes one."""
    msgs = rec["messages"]
    answer = msgs[-1]
    entries = answer["logprobs"]["content"]
    return {
        "teacher_messages": msgs[:-1],
        "input_messages": [m for m in msgs[:-1] if m["role"] != "system"],
        "output_message": {"role": "assistant", "content": answer["content"]},
        "output_ids": answer["token_ids"],
        "topk_logprobs": [[t["logprob"] for t in e["top_logprobs"]] for e in entries],
        "topk_token_ids": [[t["token_id"] for t in e["top_logprobs"]] for e in entries],
        "sample_id": 7,
    }


def _as_their_parquet_row(rec):
    """Our seed record as a row of the Cartridges trainer's converted parquet."""
    msgs = rec["messages"]
    out = []
    for m in msgs[1:]:
        row = {"role": m["role"], "content": m["content"], "token_ids": None, "top_logprobs": None}
        if m["role"] == "assistant":
            entries = m["logprobs"]["content"]
            flat = [(j, t["token_id"], t["logprob"]) for j, e in enumerate(entries) for t in e["top_logprobs"]]
            row["token_ids"] = m["token_ids"]
            row["top_logprobs"] = {
                "token_idx": [x[0] for x in flat],
                "token_id": [x[1] for x in flat],
                "logprobs": [x[2] for x in flat],
                "shape": [len(entries), len(entries[0]["top_logprobs"])],
            }
        out.append(row)
    return {"messages": out, "system_prompt": msgs[0]["content"], "metadata": json.dumps({"i": 1}), "type": "replay"}


def _same_supervision(a, b):
    return all(a[k] == b[k] for k in ("input_ids", "topk_pos", "topk_ids")) and a["topk_logprobs"] == pytest.approx(
        b["topk_logprobs"], abs=1e-6
    )


def test_their_topk_records_and_converted_parquet_give_our_rows(teacher_jsonl, tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_cartridges.convert import convert_jsonl, convert_record, convert_their_parquet
    from ray_cartridges.flat_topk import read_flat_topk

    recs = [json.loads(x) for x in teacher_jsonl.read_text().splitlines()[:4]]
    ours = [convert_record(r, tokenizer) for r in recs]
    src = tmp_path / "theirs.jsonl"
    src.write_text("".join(json.dumps(_as_their_topk_record(r)) + "\n" for r in recs))
    convert_jsonl(src, tmp_path / "a.parquet", tokenizer, progress=False)
    got = read_flat_topk(tmp_path / "a.parquet").to_pylist()
    assert len(got) == 4 and all(_same_supervision(a, b) for a, b in zip(got, ours))
    assert json.loads(got[0]["metadata"])["sample_id"] == 7
    pq.write_table(pa.Table.from_pylist([_as_their_parquet_row(r) for r in recs]), tmp_path / "theirs.parquet")
    convert_their_parquet(tmp_path / "theirs.parquet", tmp_path / "b.parquet", tokenizer, progress=False)
    got = read_flat_topk(tmp_path / "b.parquet").to_pylist()
    assert len(got) == 4 and all(_same_supervision(a, b) for a, b in zip(got, ours))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_is_converted_with_their_parquet_trains(teacher_jsonl, tmp_path, memory, tiny_model_dir, ray_cluster):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import small_train_config

    from ray_cartridges.train import run_training

    recs = [json.loads(x) for x in teacher_jsonl.read_text().splitlines()]
    data = tmp_path / "hub-copy"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist([_as_their_parquet_row(r) for r in recs]), data / "train.parquet")
    cfg = small_train_config(tmp_path, data, memory, 1, "theirs", model_name=tiny_model_dir, max_steps=2)
    cfg.input_dataset.is_converted = True
    summary = run_training(cfg)
    assert summary["steps"] == 2 and (tmp_path / "theirs" / "cartridge.json").is_file()
    assert any(p.name.startswith("converted-") for p in (tmp_path / "theirs" / "data").iterdir())


def test_their_history_agent_renderings_are_offered_as_memory_layouts(tmp_path, tokenizer):
    """Both of their HistoryAgent prompts, as its code builds them (a dict content as str() writes it), reach the
    teacher, the record and our HistoryAgent unchanged."""
    from ray_cartridges.agent.history import HistoryAgent, HistoryAgentConfig
    from ray_cartridges.config import GenerateConfig, validate_config
    from ray_cartridges.generate.records import make_record
    from ray_cartridges.generate.strategies import build_prompts
    from ray_cartridges.generate.teacher import chat_ids

    root = _their_checkpoint(tmp_path)
    feedback = str({"message": "The spare key is in the blue tin.", "score": 0})
    q = "Where is the spare key?"
    want = {
        "history_lines": [
            {"role": "system", "content": "You help."},
            {
                "role": "user",
                "content": f"OBSERVATION: {q}\n\nACTION: I do not know.\n\nFEEDBACK: {feedback}\n\nQ: {q}",
            },
        ],
        "history_chat": [
            {"role": "system", "content": "You help."},
            {"role": "user", "content": q},
            {"role": "assistant", "content": "I do not know."},
            {"role": "user", "content": feedback},
            {"role": "user", "content": q},
        ],
    }
    for layout, conversation in want.items():
        expected = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        cfg = validate_config(
            GenerateConfig,
            {
                "checkpoint_dir": str(root),
                "output_dir": str(tmp_path / "out"),
                "memory_layout": layout,
                "replay": {"mode": "full_memory", "samples_per_observation": 1},
                "self_study": {"enabled": False},
                "recite": {"enabled": False},
            },
        )
        (replay,) = [p for p in build_prompts(read_memory(root), cfg) if p["strategy"].startswith("replay")]
        assert chat_ids(tokenizer, replay["context"], replay["user"]) == expected, layout
        rec = make_record(tokenizer, context=replay["context"], user=q, answer_ids=[1], entries=[{}], metadata={})
        # the student's conversation is the bare question; the teacher's whole prompt is kept beside it
        assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
        assert rec["messages"][1]["content"] == q and rec["teacher_messages"] == conversation
        agent = HistoryAgent(
            HistoryAgentConfig(checkpoint_dir=str(root), memory_layout=layout), model=object(), tokenizer=tokenizer
        )
        assert agent.prompt_ids([{"role": "user", "content": q}]) == expected, layout
    # the default layout is ours: everything in one system prompt, no teacher_messages in the record
    ours = HistoryAgent(HistoryAgentConfig(checkpoint_dir=str(root)), model=object(), tokenizer=tokenizer)
    assert ours.context.messages[0][0] == "system" and len(ours.context.messages) == 1
    assert "blue tin" in ours.context.system
