"""The training recipe: one :class:`KDRecipe` runs in every Ray Train worker (``train_loop_per_worker``).

The frozen model reads a cartridge and a conversation (no memory in the prompt); the loss is the KD loss
against the teacher's precomputed top-k logprobs at the assistant positions. Only the cartridge has
gradients. The backend (DDP or DeepSpeed) wraps the model; the recipe does not change with it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..batching import collate, global_batches, split_rows, student_logits_at, worker_slice
from ..cartridge import CartridgeMeta, ModelShape, create_cartridge, encoder, save_cartridge
from ..config import TrainConfig, dump_config
from ..fsutil import write_text_atomic
from ..loss import kd_loss_sum
from ..models import load_model, load_tokenizer, resolve_attention, tokenizer_fingerprint
from .artifacts import RunLogger
from .backends import DDPBackend, DeepSpeedBackend
from .no_harm import NoHarmTargets, no_harm_chunks
from .schedule import lr_factor
from .student import SharedPrefixStudent

CARTRIDGE_FILE = "cartridge.safetensors"


def _say(line: str) -> None:
    """A progress line to the worker's own stdout, once. (Ray Train's print patch logs a print and, where
    something such as wandb has wrapped sys.stdout, prints it too: every line reached the driver twice.)"""
    print(line, file=sys.__stdout__, flush=True)


def _all_reduce(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        backend = torch.distributed.get_backend()
        if backend == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def init_text(cfg: TrainConfig) -> str | None:
    if cfg.kv_cache.method != "text":
        return None
    if cfg.kv_cache.init_text:
        return cfg.kv_cache.init_text
    return Path(cfg.kv_cache.init_text_file).read_text(encoding="utf-8")


class NonFiniteError(FloatingPointError):
    """A NaN or inf in training: the run stops before anything is written from that step."""


def check_finite(value: torch.Tensor, what: str, step: int, row_ids: list[str]) -> None:
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError(
            f"{what} is {float(value)} at step {step + 1}; the rows of this batch: {', '.join(map(str, row_ids))} "
            "(check their teacher logprobs, or lower training.lr)"
        )


def plan_steps(cfg: TrainConfig, n_train: int) -> tuple[int, int]:
    """The passes over the training rows (``epochs``, or enough for ``max_steps``) and the steps in each."""
    t = cfg.training
    per_epoch = n_train // t.global_batch_size
    if per_epoch == 0:
        raise ValueError(f"training.global_batch_size={t.global_batch_size} exceeds the {n_train} training rows")
    epochs = t.epochs if t.max_steps is None else max(1, math.ceil(t.max_steps / per_epoch))
    return epochs, per_epoch


@torch.no_grad()
def held_out_loss(
    model, rows: list[dict], pad_id: int, top_k: int, micro: int, autocast, device: torch.device, tail: bool = False
) -> tuple[float, float]:
    """(sum of per-token KD loss, number of supervised tokens) over ``rows``; ``tail`` as in kd_loss_sum."""
    total, count = 0.0, 0.0
    for i in range(0, len(rows), micro):
        b = {k: v.to(device) for k, v in collate(rows[i : i + micro], pad_id, top_k).items()}
        with autocast():
            logits = student_logits_at(model, b)
        total += float(kd_loss_sum(logits, b["topk_ids"], b["topk_logprobs"], tail))
        count += b["pred_t"].numel()
    return total, count


def _save_cartridge_state(d: Path, weight: torch.Tensor, step: int, extra: dict) -> None:
    from safetensors.torch import save_file

    save_file({"weight": weight.cpu().contiguous()}, str(d / CARTRIDGE_FILE))
    (d / "progress.json").write_text(json.dumps({"step": step, **extra}))


def _load_train_state(d: Path, peft_model, backend, sched) -> int:
    from safetensors.torch import load_file

    if backend.name == "ddp":  # DeepSpeed restores the (possibly partitioned) weights itself
        encoder(peft_model).load_prompt_embeddings(load_file(str(d / CARTRIDGE_FILE))["weight"])
    return backend.load_state(d, sched)


@dataclass
class WorkerInputs:
    """What the driver hands every worker: texts travel as text, since workers may run on other nodes."""

    config: dict  # the TrainConfig, as JSON
    run_hash: str  # what makes two runs the same run (resuming across runs would mix them)
    resume_from: str | None = None  # an earlier identical run's checkpoint directory
    no_harm_text: str | None = None
    callbacks: tuple = ()  # TrainCallback objects


class TrainCallback:
    """Hooks into the recipe's loop; each a no-op unless overridden (the tests' fault injection is one)."""

    def on_step_start(self, recipe: KDRecipe, step: int) -> None:
        """Before optimizer step ``step`` (0-based) runs."""


class KDRecipe:
    """Knowledge distillation of a cartridge on one worker: ``setup()``, ``train()``, ``cleanup()``."""

    def __init__(self, inputs: WorkerInputs):
        self.inputs = inputs
        self.cfg = TrainConfig.model_validate(inputs.config)
        self.t = self.cfg.training
        self.out_dir = Path(self.cfg.output.local_dir)

    # --- setup
    def setup(self) -> None:
        self._setup_runtime()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_backend()
        self.start_step = self._resume()
        self._setup_outputs()

    def _setup_runtime(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.is_writer = self.rank == 0
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            # Ray pins OMP_NUM_THREADS=1 in workers; share the node's cores between its local workers instead.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
        torch.manual_seed(self.t.seed)
        self.per_worker = self.t.global_batch_size // self.world  # divisibility: checked by the driver
        self.micro = min(self.t.micro_batch_size or self.per_worker, self.per_worker)
        use_autocast = self.t.bf16_autocast or self.cfg.model_dtype == "bf16"
        self.autocast = (
            (lambda: torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
            if use_autocast
            else contextlib.nullcontext
        )

    def _setup_data(self) -> None:
        """Every worker reads the whole (unsplit) dataset and takes its slice of each global batch."""
        import ray.data
        import ray.train

        ray.data.DataContext.get_current().enable_progress_bars = False  # one line per step is enough
        rows = sorted((dict(r) for r in ray.train.get_dataset_shard("train").iter_rows()), key=lambda r: r["row_id"])
        kept = [r for r in rows if len(r["input_ids"]) <= self.t.max_seq_len]
        self.dropped = len(rows) - len(kept)
        self.data_hash = _rows_hash(kept)
        ds = self.cfg.input_dataset
        self.train_rows, self.eval_rows = split_rows(kept, ds.eval_fraction, ds.split_seed)
        self.epochs, _ = plan_steps(self.cfg, len(self.train_rows))
        lengths = [len(r["input_ids"]) for r in self.train_rows]
        self.plan = global_batches(lengths, self.t.global_batch_size, self.epochs, self.t.seed)
        self.total_steps = min(len(self.plan), self.t.max_steps or len(self.plan))
        self.eval_every = self.t.eval_every or self.total_steps
        # under ZeRO-3 every forward is collective: each rank evaluates the whole held-out split
        self.collective_forward = self.t.backend == "deepspeed" and self.t.zero_stage == 3
        self.my_eval = self.eval_rows if self.collective_forward else self.eval_rows[self.rank :: self.world]

    def _setup_model(self) -> None:
        cfg, t = self.cfg, self.t
        self.tok = load_tokenizer(cfg.model_name)
        self.pad_id = self.tok.pad_token_id
        attn = resolve_attention(cfg.attn_implementation, gpu=self.device.type == "cuda")  # the driver resolves it too
        model = load_model(cfg.model_name, cfg.model_dtype, self.device, attn)
        self.peft_model = create_cartridge(
            model,
            num_tokens=cfg.kv_cache.num_tokens,
            num_frozen_tokens=cfg.kv_cache.num_frozen_tokens,
            method=cfg.kv_cache.method,
            tokenizer=self.tok,
            text=init_text(cfg),
            seed=t.seed,
        ).to(self.device)
        self.meta_base = dict(
            model_name=cfg.model_name,
            shape=ModelShape.of(model),
            num_tokens=cfg.kv_cache.num_tokens,
            num_frozen_tokens=cfg.kv_cache.num_frozen_tokens,
            tokenizer_fingerprint=tokenizer_fingerprint(self.tok),
            init_method=cfg.kv_cache.method,
            student_system_prompt=cfg.student_system_prompt,
        )
        chunks = []
        if t.no_harm_weight:
            chunks = no_harm_chunks(
                self.tok, self.inputs.no_harm_text, t.no_harm_tokens, t.no_harm_format, cfg.student_system_prompt
            )
            if not chunks:
                raise ValueError(
                    f"training.no_harm_text_file: the text is shorter than no_harm_tokens={t.no_harm_tokens}"
                )
        self.no_harm = NoHarmTargets(self.peft_model, chunks, self.device, t.top_k_logits, self.autocast)

    def _setup_optimizer(self) -> None:
        t = self.t
        self.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        total = self.total_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, total, t.warmup_steps, t.min_lr_ratio)
        )

    def _setup_backend(self) -> None:
        t = self.t
        # micro-steps per optimizer step: the KD chunks and, with the no-harm term, one more
        n_micro = math.ceil(self.per_worker / self.micro) + (1 if len(self.no_harm) else 0)
        self.student = SharedPrefixStudent(self.peft_model) if t.shared_prefix else self.peft_model
        if t.backend == "deepspeed":
            self.backend = DeepSpeedBackend(
                self.peft_model, self.params, self.opt, self.world, t.max_grad_norm, n_micro, t.zero_stage,
                self.micro, False, t.profile, self.student,
            )  # fmt: skip
        else:
            self.backend = DDPBackend(
                self.peft_model, self.params, self.opt, self.world, t.max_grad_norm, n_micro, t.profile, self.student
            )
        self.train_model = self.backend.model
        if self.collective_forward:  # every rank computes every no-harm target, in the same order
            self.no_harm.compute_all()

    def _resume(self) -> int:
        """The step to start from: Ray Train's checkpoint after a worker failure, else an earlier identical
        run's (``resume_from``), else 0."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                return _load_train_state(Path(d), self.peft_model, self.backend, self.sched)
        if self.inputs.resume_from:
            return _load_train_state(Path(self.inputs.resume_from), self.peft_model, self.backend, self.sched)
        return 0

    def _setup_outputs(self) -> None:
        cfg = self.cfg
        if self.is_writer:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out_dir / "distillation_config.yaml", dump_config(cfg))
        self.logger = RunLogger(self.out_dir, self.is_writer, self.start_step, cfg.wandb, cfg.model_dump(mode="json"))
        self.best_dir = self.out_dir / "best"
        self.best = {"eval/loss": math.inf, "step": None}
        if self.is_writer and self.t.keep_best:
            if self.start_step == 0:
                shutil.rmtree(self.best_dir, ignore_errors=True)  # an earlier, different run's best
            elif (self.best_dir / "best.json").exists():
                self.best = json.loads((self.best_dir / "best.json").read_text())
        self.timer = _PhaseTimer(self.t.profile, self.device)
        self.last_eval: dict = {}
        self.step_metrics: dict = {}

    # --- the loop
    def train(self) -> None:
        if self.start_step == 0:
            self._evaluate_and_log(0)
        for step in range(self.start_step, self.total_steps):
            for cb in self.inputs.callbacks:
                cb.on_step_start(self, step)
            self.step_metrics = self.train_step(step)
            done = step + 1 == self.total_steps
            if (step + 1) % self.t.log_every == 0 or done:
                self._log_step(self.step_metrics)
            if (step + 1) % self.eval_every == 0 or done:
                self.last_eval = self._evaluate_and_log(step + 1)
            if done or (self.t.save_every and (step + 1) % self.t.save_every == 0):
                self.save_checkpoint(step + 1, {**self.step_metrics, **self.last_eval}, final=done)

    def train_step(self, step: int) -> dict:
        """One optimizer step over global batch ``step``; returns its metrics (the same on every rank)."""
        t0 = time.perf_counter()
        gbatch = self.plan[step]
        global_positions = sum(int(self.train_rows[i]["num_positions"]) for i in gbatch)
        global_tokens = sum(len(self.train_rows[i]["input_ids"]) for i in gbatch)
        mine = worker_slice(gbatch, self.rank, self.world)
        self.timer.start()
        loss_sum = self._kd_micro_steps(step, mine, global_positions)
        nh_loss = self._no_harm_micro_step(step) if len(self.no_harm) else 0.0
        lr = self.sched.get_last_lr()[0]
        grad_norm = self.backend.step()
        if grad_norm is None:
            grad_norm = float("nan")  # DeepSpeed without clipping computes none
        else:
            row_ids = [self.train_rows[i]["row_id"] for i in mine]
            check_finite(torch.as_tensor(float(grad_norm)), "gradient norm", step, row_ids)
        self.sched.step()
        self.timer.lap("optimizer")
        loss_total, nh_total = _all_reduce([loss_sum, nh_loss])
        self.timer.lap("comm")
        dt = time.perf_counter() - t0
        return {
            "step": step + 1,
            "train/loss": loss_total / global_positions,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm),
            "train/tokens_per_s": global_tokens / dt,
            "train/step_time_s": dt,
            **self.timer.result(self.backend.comm_seconds()),
            **({"train/no_harm_loss": nh_total / self.world} if len(self.no_harm) else {}),
        }

    def _kd_micro_steps(self, step: int, mine: list[int], global_positions: int) -> float:
        """Forward and backward of this worker's rows of the step, ``micro`` rows at a time; the loss sum."""
        kd_tail = self.t.tail_mass == "all"
        chunks = [mine[i : i + self.micro] for i in range(0, len(mine), self.micro)]
        loss_sum = 0.0
        for ci, chunk in enumerate(chunks):
            rows = [self.train_rows[i] for i in chunk]
            b = {k: v.to(self.device) for k, v in collate(rows, self.pad_id, self.t.top_k_logits).items()}
            self.timer.lap("data")
            with self.backend.accumulate(last=ci == len(chunks) - 1 and not len(self.no_harm)):
                with self.autocast():
                    logits = student_logits_at(self.train_model, b)
                ls = kd_loss_sum(logits, b["topk_ids"], b["topk_logprobs"], kd_tail)
                check_finite(ls, "KD loss", step, [r["row_id"] for r in rows])
                self.timer.lap("forward")
                # data parallelism averages gradients over workers: scale so the result is the global per-token mean
                self.backend.backward(ls * self.world / global_positions)
                self.timer.lap("backward")
            loss_sum += float(ls.detach())
        return loss_sum

    def _no_harm_micro_step(self, step: int) -> float:
        """The step's last micro-step: the bare model teaches the cartridge-reading model on general text."""
        x, top_ids, top_lp = self.no_harm.get((step * self.world + self.rank) % len(self.no_harm))
        self.timer.lap("data")
        with self.backend.accumulate(last=True):
            with self.autocast():
                out = self.train_model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
            nh = kd_loss_sum(out.logits[0, :-1], top_ids, top_lp, self.t.tail_mass != "none") / top_ids.shape[0]
            self.timer.lap("forward")
            self.backend.backward(self.t.no_harm_weight * nh)  # the workers' mean of per-token means
            self.timer.lap("backward")
        return float(nh.detach())

    def _log_step(self, m: dict) -> None:
        self.logger.log(m)
        if self.is_writer:
            _say(
                f"[train] step {m['step']}/{self.total_steps} loss {m['train/loss']:.4f} lr {m['train/lr']:.2e} "
                f"grad_norm {m['train/grad_norm']:.3f} {m['train/tokens_per_s']:.0f} tok/s"
            )

    def evaluate(self, step: int) -> dict:
        """The held-out KD loss per token at ``step`` (empty without a held-out split)."""
        if not self.eval_rows:
            return {}
        kd_tail = self.t.tail_mass == "all"
        s, c = held_out_loss(
            self.student, self.my_eval, self.pad_id, self.t.top_k_logits, self.micro, self.autocast, self.device,
            kd_tail,
        )  # fmt: skip
        if not self.collective_forward:
            s, c = _all_reduce([s, c])
        return {"step": step, "eval/loss": s / max(c, 1.0), "eval/tokens": c}

    def _evaluate_and_log(self, step: int) -> dict:
        ev = self.evaluate(step)
        self.logger.log(ev)
        self.track_best(step, ev)
        if self.is_writer and ev and step:
            _say(f"[eval] step {step} held-out KD loss {ev['eval/loss']:.4f}")
        return ev

    # --- saving
    def _meta(self, step: int, metrics: dict) -> CartridgeMeta:
        return CartridgeMeta(**self.meta_base, extra={"step": step, "data_hash": self.data_hash, "metrics": metrics})

    def save_checkpoint(self, step: int, metrics: dict, final: bool) -> None:
        """The cartridge (final: in the output directory; else under ``checkpoints/``) and Ray Train's
        checkpoint of the whole training state, reported with ``metrics``."""
        import ray.train

        with tempfile.TemporaryDirectory() as d, self.backend.full_weights():  # collective under ZeRO-3
            # one full copy, taken while gathered: PEFT's save gathers (and re-partitions) on its own under ZeRO-3
            full = encoder(self.peft_model).weight.detach().clone()
            if self.is_writer:
                name = "cache-final.pt" if final else f"cache-step{step}.pt"
                target = self.out_dir if final else self.out_dir / "checkpoints" / f"step-{step}"
                save_cartridge(self.peft_model, target, self._meta(step, metrics), export_pt=name, weight=full)
                if not final:
                    os.replace(target / name, self.out_dir / name)
                progress = {"metrics": metrics, "run_hash": self.inputs.run_hash}
                _save_cartridge_state(Path(d), full, step, progress)
            wrote = self.backend.save_state(Path(d), self.sched, step, self.is_writer)
            ck = ray.train.Checkpoint.from_directory(d) if (self.is_writer or wrote) else None
            ray.train.report({**metrics, "step": step}, checkpoint=ck)

    def track_best(self, step: int, ev: dict) -> None:
        """Keep the cartridge with the lowest held-out loss (a decision every rank makes alike)."""
        if not (self.t.keep_best and ev):
            return
        # rank 0 (which holds the best so far, also after a resume) decides for every rank
        improved = self.is_writer and ev["eval/loss"] < self.best["eval/loss"]
        if not _all_reduce([1.0 if improved else 0.0])[0]:
            return
        self.best.update({"eval/loss": ev["eval/loss"], "step": step})
        # saved while gathered (ZeRO-3): PEFT's save would otherwise gather on rank 0 alone and hang the others
        with self.backend.full_weights():
            full = encoder(self.peft_model).weight.detach().clone()
            if self.is_writer:
                tmp = self.out_dir / ".best.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                save_cartridge(self.peft_model, tmp, self._meta(step, ev), weight=full)
                write_text_atomic(tmp / "best.json", json.dumps(self.best))
                shutil.rmtree(self.best_dir, ignore_errors=True)
                os.replace(tmp, self.best_dir)

    def cleanup(self) -> None:
        """The run summary, the loss plot and the end of the wandb run (rank 0); a finished run that is re-run
        keeps its summary."""
        workers = _gather_workers(self.rank, self.device)  # collective: every rank takes part
        if not (self.is_writer and self.start_step < self.total_steps):
            return
        summary = {
            "run_hash": self.inputs.run_hash,
            "workers": workers,
            "best": self.best if self.best["step"] is not None else None,
            "steps": self.total_steps,
            "train_rows": len(self.train_rows),
            "eval_rows": len(self.eval_rows),
            "dropped_too_long": self.dropped,
            "epochs": self.epochs,
            "final": {**self.step_metrics, **self.last_eval},
        }
        write_text_atomic(self.out_dir / "train_summary.json", json.dumps(summary, indent=2))
        self.logger.finish(plot_to=self.out_dir / "loss.png")


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point on each worker."""
    recipe = KDRecipe(loop_config["inputs"])
    recipe.setup()
    recipe.train()
    recipe.cleanup()


def _rows_hash(rows: list[dict]) -> str:
    import hashlib

    h = hashlib.sha256()
    for r in rows:
        h.update(r["row_id"].encode())
    return h.hexdigest()[:16]


class _PhaseTimer:
    """Per-step wall time of each phase (only when ``training.profile``: it synchronises the device)."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.times: dict[str, float] = {}
        self.t = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        if self.enabled:
            self.times = dict.fromkeys(("data", "forward", "backward", "optimizer", "comm"), 0.0)
            self.t = self._now()

    def lap(self, phase: str) -> None:
        if self.enabled:
            now = self._now()
            self.times[phase] += now - self.t
            self.t = now

    def result(self, grad_comm_s: float) -> dict:
        """Metrics of the step; the gradient reduce measured inside backward moves to communication."""
        if not self.enabled:
            return {}
        times = dict(self.times)
        times["backward"] = max(0.0, times["backward"] - grad_comm_s)
        times["comm"] += grad_comm_s
        return {f"time/{k}_s": v for k, v in times.items()}


def _gather_workers(rank: int, device: torch.device) -> list[dict]:
    """Where each rank ran (node id, host, device): every rank takes part, rank 0 gets the list."""
    import socket

    import ray

    me = {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "device": str(device),
    }
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [me]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, me)
    return out
