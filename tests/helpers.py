"""Helpers shared by the tests (fixtures are in conftest.py): paths, tiny models, small configs, teacher data."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ray_cartridges.train.loop import TrainCallback

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CHECKPOINT = REPO / "examples" / "agent_checkpoint"
BUNDLED = "smollm2-135m-instruct"


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


def tiny_llama(layers=2, kv_heads=2, heads=4, head_dim=16, vocab=49152, seed=0, attn="sdpa"):
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
        attn_implementation=attn,
    )
    m = LlamaForCausalLM(cfg).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


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


def make_teacher_jsonl(path: Path) -> Path:
    """Teacher data from the bundled model: 2 phrasings of each of the example memory's first 20 questions (40
    records, answers of at most 20 tokens), answered by the vLLM teacher (fp32, greedy) in a process of its own,
    with its engine in that process as in a CPU teacher actor; the transformers reference teacher gives the same
    answers (test_generate checks the two engines agree)."""
    import os
    import subprocess
    import sys

    from ray_cartridges.engine_env import engine_actor_env

    env = {**os.environ, **engine_actor_env(torch.cuda.is_available(), in_process=True)}
    code = "import sys, helpers; helpers.write_teacher_jsonl(sys.argv[1])"
    run = subprocess.run([sys.executable, "-c", code, str(path)], cwd=Path(__file__).parent, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    return path


def write_teacher_jsonl(path: str) -> None:
    """The body of :func:`make_teacher_jsonl`, in its process."""
    from ray_cartridges.contracts import SamplingParams
    from ray_cartridges.generate.engines import VLLMEngine
    from ray_cartridges.generate.teacher import run_prompts
    from ray_cartridges.memory import read_memory
    from ray_cartridges.models import resolve_model

    memory = read_memory(EXAMPLE_CHECKPOINT)
    context = memory.render()
    prompts = []
    for i, group in enumerate(memory.triples()[:20]):
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
    engine = VLLMEngine(resolve_model(BUNDLED, "fp32"), dtype="fp32", enforce_eager=True, block_size=32)
    records, problems = run_prompts(engine, prompts, sampling=SamplingParams(max_tokens=20, top_logprobs=20))
    assert not problems
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


class FailOnceAt(TrainCallback):
    """A training callback that fails the run once, at the start of ``step`` (0-based), as a killed worker
    would; ``.fault_injected`` in the output directory records it, so the restarted run goes on. (Ray's
    workers cannot import tests/: register this module with ``ray.cloudpickle.register_pickle_by_value``.)"""

    def __init__(self, step: int):
        self.step = step

    def on_step_start(self, recipe, step: int) -> None:
        marker = recipe.out_dir / ".fault_injected"
        if step != self.step or marker.exists():
            return
        if recipe.is_writer:
            marker.write_text(str(step))
        raise RuntimeError(f"injected fault at step {step}")
