"""What a training run leaves in ``output.local_dir``: the cartridge, exports, metrics and plots."""

from __future__ import annotations

import json
import os
from pathlib import Path


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
    """PNG of train KD loss per step and eval KD loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["train/loss"]) for r in recs if "train/loss" in r]
    evl = [(r["step"], r["eval/loss"]) for r in recs if "eval/loss" in r]
    if not train and not evl:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train KD loss", lw=1)
    if evl:
        ax.plot(*zip(*evl), "o-", label="held-out KD loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KD loss (nats / token)")
    ax.set_title("cartridge distillation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
