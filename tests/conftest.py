"""Shared fixtures: the bundled model (loaded once), a tiny random Llama, a Ray cluster, teacher data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CHECKPOINT = REPO / "examples" / "agent_checkpoint"
BUNDLED = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def tokenizer():
    from ray_cartridges.models import load_tokenizer

    return load_tokenizer(BUNDLED)


@pytest.fixture(scope="session")
def model():
    from ray_cartridges.models import load_model

    return load_model(BUNDLED, "fp32")


def bundled_meta(model, tokenizer, num_tokens: int, num_frozen_tokens: int = 1):
    """The CartridgeMeta of a cartridge of ``num_tokens`` on the bundled model."""
    from ray_cartridges.cartridge import CartridgeMeta, ModelShape
    from ray_cartridges.models import tokenizer_fingerprint

    return CartridgeMeta(
        model_name=BUNDLED,
        shape=ModelShape.of(model),
        num_tokens=num_tokens,
        num_frozen_tokens=num_frozen_tokens,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )


def tiny_llama(layers=2, kv_heads=2, heads=4, head_dim=16, vocab=49152, seed=0):
    """A small random Llama (no download) for shape and compatibility tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
    )
    m = LlamaForCausalLM(cfg).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


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


def small_train_config(tmp_path, teacher_jsonl, memory, workers, name, scaling=None, model_name=BUNDLED, **training):
    """A short training run on the teacher data: p = 32, global batch 4, 4 steps (any training key overridable);
    ``model_name`` the student (the bundled model, or ``tiny_model_dir`` for tests of mechanics)."""
    from ray_cartridges.config import TrainConfig, validate_config

    return validate_config(
        TrainConfig,
        {
            "model_name": str(model_name),
            "input_dataset": {"local_path": str(teacher_jsonl), "is_converted": False, "eval_fraction": 0.2},
            "output": {"local_dir": str(tmp_path / name)},
            "kv_cache": {"method": "text", "num_tokens": 32, "init_text": memory.render()},
            "training": {"global_batch_size": 4, "lr": 1e-2, "max_steps": 4, "eval_every": 4, **training},
            "scaling": {"num_workers": workers, **(scaling or {})},
        },
    )


def make_teacher_jsonl(path: Path, model, tokenizer, memory) -> Path:
    """Teacher data made by the transformers reference teacher: 2 phrasings of each memory question."""
    from ray_cartridges.generate.engines import HFEngine, Sampling
    from ray_cartridges.generate.teacher import run_prompts

    context = memory.render()
    prompts = []
    for i, group in enumerate(memory.triples()):
        q = group[0].content
        for j, user in enumerate([q, "Quick question: " + q[0].lower() + q[1:]]):
            prompts.append(
                {
                    "prompt_id": f"p{i}-{j}",
                    "strategy": "replay/test",
                    "context": context,
                    "user": user,
                    "split_key": f"entry-{i}",
                }
            )
    records, problems = run_prompts(
        HFEngine(model, tokenizer), prompts, sampling=Sampling(max_tokens=24, top_logprobs=20)
    )
    assert not problems
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def teacher_jsonl(tmp_path_factory, model, tokenizer, memory) -> Path:
    """Teacher data from the bundled model (see make_teacher_jsonl).

    ``RAY_CARTRIDGES_TEST_TEACHER=<file>`` reads a file made earlier by make_teacher_jsonl instead: for a machine
    that has the bundled model's architecture and tokenizer but not its weights (the GPU check machine), where
    the teacher's own answers would be noise that does not re-tokenize."""
    given = os.environ.get("RAY_CARTRIDGES_TEST_TEACHER")
    if given:
        return Path(given)
    shared = os.environ.get("RAY_CARTRIDGES_TEST_SHARE")
    if shared:  # `make test` runs three pytest processes: the first makes the data, the others read it
        path = Path(shared) / "teacher.jsonl"
        if not path.is_file():
            tmp = make_teacher_jsonl(Path(shared) / f"teacher.jsonl.{os.getpid()}.tmp", model, tokenizer, memory)
            os.replace(tmp, path)
        return path
    return make_teacher_jsonl(tmp_path_factory.mktemp("teacher") / "dataset.jsonl", model, tokenizer, memory)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (never `ray stop` inside tests)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
