"""The research workflow's files, laid out as its own code writes them (fixtures written by hand from its field
lists): checkpoints with only latest.json {"path": ...}, {file:} system prompts, memory_snapshot_path."""

import json
import shutil

import pytest
from conftest import EXAMPLE_CHECKPOINT

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
