"""What a training run leaves in ``output.local_dir``: the cartridge, exports, metrics and plots."""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import atomic_path, write_text_atomic


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class RunLogger:
    """The run's metrics: ``metrics.jsonl`` in the output directory and, when configured, wandb. Only the writer
    (rank 0) writes; on the other ranks every call is a no-op.

    A resumed run keeps the lines up to its checkpoint's step and drops the later ones (they are about to be
    redone), so every step is logged exactly once; a fresh run starts an empty file."""

    def __init__(self, out_dir: Path, is_writer: bool, start_step: int, wandb_cfg=None, run_config: dict | None = None):
        self.path = out_dir / "metrics.jsonl"
        self.is_writer = is_writer
        self.run = None
        if not is_writer:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if start_step == 0:
                self.path.unlink()
            else:
                kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
                write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=wandb_cfg.name,
                mode=wandb_cfg.mode,
                dir=str(out_dir),
                config=run_config,
                resume="allow",
            )

    def log(self, record: dict) -> None:
        """One record (``step`` and metrics by name)."""
        if not (self.is_writer and record):
            return
        append_jsonl(self.path, record)
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def finish(self, plot_to: Path | None = None) -> None:
        """The loss plot (when asked) and the end of the wandb run."""
        if not self.is_writer:
            return
        if plot_to is not None:
            plot_losses(self.path, plot_to)
        if self.run is not None:
            self.run.finish()


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
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png
