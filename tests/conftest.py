"""Shared fixtures: the bundled model (loaded once), a tiny random Llama, a Ray cluster, teacher data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # Ray Train notices a finished run sooner

from helpers import BUNDLED, EXAMPLE_CHECKPOINT, make_teacher_jsonl, tiny_llama  # noqa: E402

# what makes a test an integration test (marked slow; `make test-fast` runs the rest): a Ray cluster, the
# teacher data, the bundled model, or a vLLM engine
INTEGRATION_FIXTURES = {"ray_cluster", "teacher_jsonl", "model"}
VLLM_TEST_FILES = {"test_vllm_cartridges.py", "test_gpu.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in VLLM_TEST_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tokenizer():
    from ray_cartridges.models import load_tokenizer

    return load_tokenizer(BUNDLED)


@pytest.fixture(scope="session")
def model():
    from ray_cartridges.models import load_model

    return load_model(BUNDLED, "fp32")


@pytest.fixture(scope="session")
def tiny_model():
    """A 2-layer random Llama over the bundled tokenizer's vocabulary: the model of unit tests, where what is
    checked is that two computations agree (or differ), not what a trained model answers."""
    return tiny_llama()


@pytest.fixture(scope="session")
def memory():
    from ray_cartridges.memory import read_memory

    return read_memory(EXAMPLE_CHECKPOINT)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved 2-layer random Llama with the bundled model's tokenizer: a student for the tests of training
    mechanics (DDP / DeepSpeed / multi-node agreement, resume after a fault), where what is checked is that two
    runs agree, not what the cartridge learns. Its steps take a fraction of the bundled model's; the teacher data
    (the bundled model's answers) tokenize the same."""
    path = tmp_path_factory.mktemp("tiny-student")
    model = tiny_llama(layers=2, kv_heads=2, heads=4, head_dim=16, vocab=len(tokenizer), seed=0)
    model.config.max_position_embeddings = 2048
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def teacher_jsonl(tmp_path_factory) -> Path:
    """Teacher data from the bundled model (see make_teacher_jsonl).

    ``RAY_CARTRIDGES_TEST_TEACHER=<file>`` reads a file made earlier by make_teacher_jsonl instead: for a machine
    that has the bundled model's architecture and tokenizer but not its weights (the GPU check machine), where
    the teacher's own answers would be noise that does not re-tokenize."""
    given = os.environ.get("RAY_CARTRIDGES_TEST_TEACHER")
    if given:
        return Path(given)
    shared = os.environ.get("RAY_CARTRIDGES_TEST_SHARE")
    if shared:  # `make test` runs two pytest processes: the first makes the data, the other reads it
        path = Path(shared) / "teacher.jsonl"
        if not path.is_file():
            tmp = make_teacher_jsonl(Path(shared) / f"teacher.jsonl.{os.getpid()}.tmp")
            os.replace(tmp, path)
        return path
    return make_teacher_jsonl(tmp_path_factory.mktemp("teacher") / "dataset.jsonl")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (never `ray stop` inside tests)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
