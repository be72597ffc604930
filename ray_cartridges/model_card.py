"""The cartridge's model card (README.md in the cartridge directory, shown on the hub)."""

from __future__ import annotations

import json
from pathlib import Path


def cartridge_card(
    cartridge_dir: Path, *, repo_id: str | None, memory_source: str | None, evaluation: dict | None
) -> str:
    meta = json.loads((cartridge_dir / "cartridge.json").read_text())
    summary = {}
    if (cartridge_dir / "train_summary.json").is_file():
        summary = json.loads((cartridge_dir / "train_summary.json").read_text())
    from .models import hub_model_id

    base = hub_model_id(meta["model_name"])
    ident = repo_id or str(cartridge_dir)
    source = "huggingface" if repo_id else "local"
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "tags: [ray-cartridges, cartridge, kv-cache, memory-distillation]",
        "---",
        f"# Cartridge for `{meta['model_name']}`",
        "",
        f"A trained KV-cache prefix of {meta['num_tokens']} tokens ({meta['num_frozen_tokens']} frozen) that stands in "
        "for an agent's long-term memory. Distilled with ray_cartridges from teacher logprobs.",
        "",
        f"- base model: `{meta['model_name']}` (revision: {meta.get('model_revision') or 'as loaded'})",
        f"- memory source: `{memory_source or 'unknown'}`",
        f"- init: {meta['init_method']}; training data hash: {meta['extra'].get('data_hash')}",
        f"- training: {summary.get('steps', '?')} steps, {summary.get('train_rows', '?')} train rows, "
        f"{summary.get('eval_rows', '?')} held-out rows",
    ]
    final = meta["extra"].get("metrics", {})
    if "eval/loss" in final:
        lines.append(f"- final held-out KD loss: {final['eval/loss']:.4f}")
    from .report import evaluation_lines

    lines += [f"- {line}" for line in evaluation_lines(evaluation)]
    lines += [
        "",
        "## Use",
        "",
        "With the agent:",
        "```python",
        "from ray_cartridges.agent import KVArtifact, KVCacheMemoryConfig, KVMemoryAgent, KVMemoryAgentConfig",
        f'memory = KVCacheMemoryConfig(artifact=KVArtifact(id="{ident}", source="{source}"))',
        "agent = KVMemoryAgent(KVMemoryAgentConfig(memory_config=memory))",
        'print(agent.chat([{"role": "user", "content": "What do you remember?"}]))',
        "```",
        "",
        "With PEFT alone:",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{ident}")',
        "```",
        "",
        "Behind the Ray Serve endpoint (OpenAI-compatible):",
        "```bash",
        f"ray-cartridges serve --cartridge {ident}",
        "curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
        f'  -d \'{{"model": "{Path(ident).name}", "messages": [{{"role": "user", "content": "Hello"}}]}}\'',
        "```",
        "",
        "Files: `adapter_config.json` + `adapter_model.safetensors` (PEFT CARTRIDGE), `cartridge.json` (fit checks),",
        "`cache-final.pt` (Cartridges layout, `torch.load(weights_only=True)`), `distillation_config.yaml`.",
    ]
    return "\n".join(lines) + "\n"
