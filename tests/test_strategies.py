"""Prompt strategies: replay phrasings and the split keys that keep held-out experiences out of training."""

from conftest import EXAMPLE_CHECKPOINT

from ray_cartridges.batching import heldout_keys
from ray_cartridges.config import GenerateConfig, validate_config
from ray_cartridges.generate.strategies import build_prompts
from ray_cartridges.memory import read_memory


def _cfg(**replay):
    return validate_config(
        GenerateConfig,
        {"checkpoint_dir": str(EXAMPLE_CHECKPOINT), "replay": replay, "self_study": {"num_samples": 8}},
    )


def test_replay_samples_are_distinct_phrasings_that_share_their_experience_key():
    memory = read_memory(EXAMPLE_CHECKPOINT)
    questions = {f"entry-{i}": g[0].content for i, g in enumerate(memory.triples()) if g[0].type == "Observation"}
    prompts = build_prompts(memory, _cfg(mode="full_memory", samples_per_observation=3))
    replay = [p for p in prompts if p["strategy"].startswith("replay/")]
    assert len(replay) == 3 * len(questions)
    assert len({p["prompt_id"] for p in prompts}) == len(prompts)
    by_key: dict[str, list[dict]] = {}
    for p in replay:
        by_key.setdefault(p["split_key"], []).append(p)
    assert set(by_key) == set(questions)
    for key, group in by_key.items():
        users = sorted((p["metadata"]["sample"], p["user"]) for p in group)
        assert users[0] == (0, questions[key])  # sample 0 asks the Observation verbatim
        assert len({u for _, u in users}) == 3  # the others are other words, not duplicates
        assert all(questions[key] in u for _, u in users)  # ...of the same question
        # all phrasings of one experience fall on the same side of the train / held-out split
        held = heldout_keys([p["split_key"] for p in prompts], 0.3, 7)
        assert len({p["split_key"] in held for p in group}) == 1


def test_one_sample_per_observation_is_the_observation_itself():
    memory = read_memory(EXAMPLE_CHECKPOINT)
    replay = [p for p in build_prompts(memory, _cfg()) if p["strategy"].startswith("replay/")]
    assert sorted(p["user"] for p in replay) == sorted(
        g[0].content for g in memory.triples() if g[0].type == "Observation"
    )
