"""The one training loop: runs in every Ray Train worker (``train_loop_per_worker``).

The frozen model reads a cartridge and a conversation (no memory in the prompt); the loss is the KD loss
against the teacher's precomputed top-k logprobs at the assistant positions. Only the cartridge has
gradients. The backend (DDP today) wraps the model; the loop itself does not change with it.
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
from pathlib import Path

import torch

from ..batching import collate, global_batches, split_rows, student_logits_at, worker_slice
from ..cartridge import CartridgeMeta, ModelShape, create_cartridge, encoder, save_cartridge
from ..config import TrainConfig, dump_config
from ..fsutil import write_text_atomic
from ..loss import kd_loss_sum
from ..models import load_model, load_tokenizer, tokenizer_fingerprint
from .artifacts import append_jsonl, plot_losses
from .backends import DDPBackend, DeepSpeedBackend
from .schedule import lr_factor

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


def plan_steps(cfg: TrainConfig, n_train: int) -> tuple[list[list[int]], int]:
    """The global batch plan and the number of optimizer steps."""
    t = cfg.training
    per_epoch = n_train // t.global_batch_size
    if per_epoch == 0:
        raise ValueError(f"training.global_batch_size={t.global_batch_size} exceeds the {n_train} training rows")
    epochs = t.epochs if t.max_steps is None else max(1, math.ceil(t.max_steps / per_epoch))
    return epochs, per_epoch


@torch.no_grad()
def evaluate(
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


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(loop_config["config"])
    t = cfg.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # Ray pins OMP_NUM_THREADS=1 in workers; share the node's cores between its local workers instead.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    torch.manual_seed(t.seed)
    out_dir = Path(cfg.output.local_dir)
    is_writer = rank == 0

    if t.global_batch_size % world:
        raise ValueError(
            f"training.global_batch_size={t.global_batch_size} does not divide over scaling.num_workers={world}"
        )
    per_worker = t.global_batch_size // world
    micro = min(t.micro_batch_size or per_worker, per_worker)

    tok = load_tokenizer(cfg.model_name)
    model = load_model(cfg.model_name, cfg.model_dtype, device)

    # --- data: every worker reads the whole (unsplit) dataset and takes its slice of each global batch
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # one line per step below is enough
    shard = ray.train.get_dataset_shard("train")
    rows = [dict(r) for r in shard.iter_rows()]
    rows.sort(key=lambda r: r["row_id"])
    n_all = len(rows)
    rows = [r for r in rows if len(r["input_ids"]) <= t.max_seq_len]
    dropped = n_all - len(rows)
    train_rows, eval_rows = split_rows(rows, cfg.input_dataset.eval_fraction, cfg.input_dataset.split_seed)
    epochs, per_epoch = plan_steps(cfg, len(train_rows))
    plan = global_batches([len(r["input_ids"]) for r in train_rows], t.global_batch_size, epochs, t.seed)
    total_steps = min(len(plan), t.max_steps or len(plan))
    eval_every = t.eval_every or total_steps

    # --- cartridge, optimizer, schedule
    peft_model = create_cartridge(
        model,
        num_tokens=cfg.kv_cache.num_tokens,
        num_frozen_tokens=cfg.kv_cache.num_frozen_tokens,
        method=cfg.kv_cache.method,
        tokenizer=tok,
        text=init_text(cfg),
        seed=t.seed,
    ).to(device)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, t.warmup_steps, t.min_lr_ratio))
    n_micro = math.ceil(per_worker / micro)
    no_harm = (
        _no_harm_chunks(
            tok, loop_config.get("no_harm_text"), t.no_harm_tokens, t.no_harm_format, cfg.student_system_prompt
        )
        if t.no_harm_weight
        else []
    )
    if t.no_harm_weight and not no_harm:
        raise ValueError(f"training.no_harm_text_file: the text is shorter than no_harm_tokens={t.no_harm_tokens}")
    n_micro += 1 if no_harm else 0  # the no-harm chunk is one more micro-step of each step
    kd_tail = t.tail_mass == "all"  # the memory data's KD loss (and the held-out loss) with the tail class
    if t.backend == "deepspeed":
        backend = DeepSpeedBackend(
            peft_model, params, opt, world, t.max_grad_norm, n_micro, t.zero_stage, micro, False, t.profile
        )
    else:
        backend = DDPBackend(peft_model, params, opt, world, t.max_grad_norm, n_micro, t.profile)
    train_model = backend.model
    # under ZeRO-3 every forward is collective: each rank evaluates the whole held-out split
    collective_forward = t.backend == "deepspeed" and t.zero_stage == 3
    eval_sharded = not collective_forward

    start_step = 0
    ckpt = ray.train.get_checkpoint()  # set when Ray Train restarts this run after a failure
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start_step = _load_train_state(Path(d), peft_model, backend, sched)
    elif loop_config.get("resume_from"):  # an earlier identical run stopped (or finished) here
        start_step = _load_train_state(Path(loop_config["resume_from"]), peft_model, backend, sched)
    fault_at = loop_config.get("fault_at_step")  # test hook: fail once at this step (FailureConfig restarts)
    use_autocast = t.bf16_autocast or cfg.model_dtype == "bf16"

    def autocast():
        if not use_autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    # the bare model's top-k on each no-harm chunk never changes (frozen model, fixed text): computed once per
    # chunk, when a step first uses it (a short run over a long text reads a few chunks); under ZeRO-3 every
    # forward is collective, so there all of them are computed here, on every rank alike
    no_harm_targets = _NoHarmTargets(peft_model, no_harm, device, t.top_k_logits, autocast)
    if collective_forward:
        no_harm_targets.compute_all()
    pad_id = tok.pad_token_id
    my_eval = eval_rows[rank::world] if eval_sharded else eval_rows
    metrics_path = out_dir / "metrics.jsonl"
    run = None
    if is_writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "distillation_config.yaml", dump_config(cfg))
        if metrics_path.exists():
            if start_step == 0:
                metrics_path.unlink()
            else:  # resumed: drop what was logged after the checkpoint, it is about to be redone
                kept = [
                    line
                    for line in metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step
                ]
                write_text_atomic(metrics_path, "".join(line + "\n" for line in kept))
        if cfg.wandb.mode != "disabled":
            import wandb

            run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                name=cfg.wandb.name,
                mode=cfg.wandb.mode,
                dir=str(out_dir),
                config=cfg.model_dump(mode="json"),
                resume="allow",
            )

    def run_eval(step: int) -> dict:
        if not eval_rows:
            return {}
        s, c = evaluate(peft_model, my_eval, pad_id, t.top_k_logits, micro, autocast, device, kd_tail)
        if eval_sharded:
            s, c = _all_reduce([s, c])
        return {"step": step, "eval/loss": s / max(c, 1.0), "eval/tokens": c}

    def log(rec: dict) -> None:
        if is_writer:
            append_jsonl(metrics_path, rec)
            if run is not None:
                run.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    meta_base = dict(
        model_name=cfg.model_name,
        shape=ModelShape.of(model),
        num_tokens=cfg.kv_cache.num_tokens,
        num_frozen_tokens=cfg.kv_cache.num_frozen_tokens,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        init_method=cfg.kv_cache.method,
        student_system_prompt=cfg.student_system_prompt,
    )
    data_hash = _rows_hash(rows)

    def checkpoint(step: int, metrics: dict, final: bool) -> None:
        with tempfile.TemporaryDirectory() as d, backend.full_weights():  # collective under ZeRO-3
            # one full copy, taken while gathered: PEFT's save gathers (and re-partitions) on its own under ZeRO-3
            full = encoder(peft_model).weight.detach().clone()
            if is_writer:
                extra = {"step": step, "data_hash": data_hash, "metrics": metrics}
                name = "cache-final.pt" if final else f"cache-step{step}.pt"
                target = out_dir if final else out_dir / "checkpoints" / f"step-{step}"
                save_cartridge(peft_model, target, CartridgeMeta(**meta_base, extra=extra), export_pt=name, weight=full)
                if not final:
                    os.replace(target / name, out_dir / name)
                progress = {"metrics": metrics, "run_hash": loop_config.get("run_hash")}
                _save_cartridge_state(Path(d), full, step, progress)
            wrote = backend.save_state(Path(d), sched, step, is_writer)
            ck = ray.train.Checkpoint.from_directory(d) if (is_writer or wrote) else None
            ray.train.report({**metrics, "step": step}, checkpoint=ck)

    best_dir = out_dir / "best"
    best = {"eval/loss": math.inf, "step": None}
    if is_writer and t.keep_best:
        if start_step == 0:
            shutil.rmtree(best_dir, ignore_errors=True)  # an earlier, different run's best
        elif (best_dir / "best.json").exists():
            best = json.loads((best_dir / "best.json").read_text())

    def track_best(step: int, ev: dict) -> None:
        """Keep the cartridge with the lowest held-out loss (a decision every rank makes alike)."""
        if not (t.keep_best and ev):
            return
        # rank 0 (which holds the best so far, also after a resume) decides for every rank
        improved = is_writer and ev["eval/loss"] < best["eval/loss"]
        if not _all_reduce([1.0 if improved else 0.0])[0]:
            return
        best.update({"eval/loss": ev["eval/loss"], "step": step})
        # saved while gathered (ZeRO-3): PEFT's save would otherwise gather on rank 0 alone and hang the others
        with backend.full_weights():
            full = encoder(peft_model).weight.detach().clone()
            if is_writer:
                extra = {"step": step, "data_hash": data_hash, "metrics": ev}
                tmp = out_dir / ".best.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                save_cartridge(peft_model, tmp, CartridgeMeta(**meta_base, extra=extra), weight=full)
                write_text_atomic(tmp / "best.json", json.dumps(best))
                shutil.rmtree(best_dir, ignore_errors=True)
                os.replace(tmp, best_dir)

    if start_step == 0:
        first = run_eval(0)
        if first:
            log(first)
            track_best(0, first)
    last_eval: dict = {}
    step_metrics: dict = {}
    timer = _PhaseTimer(t.profile, device)
    for step in range(start_step, total_steps):
        if fault_at is not None and step == fault_at and not (out_dir / ".fault_injected").exists():
            if is_writer:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / ".fault_injected").write_text(str(step))
            raise RuntimeError(f"injected fault at step {step}")
        t0 = time.perf_counter()
        gbatch = plan[step]
        global_positions = sum(int(train_rows[i]["num_positions"]) for i in gbatch)
        global_tokens = sum(len(train_rows[i]["input_ids"]) for i in gbatch)
        mine = worker_slice(gbatch, rank, world)
        loss_sum = 0.0
        chunks = [mine[i : i + micro] for i in range(0, len(mine), micro)]
        timer.start()
        for ci, chunk in enumerate(chunks):
            b = collate([train_rows[i] for i in chunk], pad_id, t.top_k_logits)
            b = {k: v.to(device) for k, v in b.items()}
            timer.lap("data")
            with backend.accumulate(last=ci == len(chunks) - 1 and not no_harm):
                with autocast():
                    logits = student_logits_at(train_model, b)
                ls = kd_loss_sum(logits, b["topk_ids"], b["topk_logprobs"], kd_tail)
                check_finite(ls, "KD loss", step, [train_rows[i]["row_id"] for i in chunk])
                timer.lap("forward")
                # data parallelism averages gradients over workers: scale so the result is the global per-token mean
                backend.backward(ls * world / global_positions)
                timer.lap("backward")
            loss_sum += float(ls)
        nh_loss = 0.0
        if no_harm:  # last micro-step: the bare model teaches the cartridge-reading model on general text
            x, top_ids, top_lp = no_harm_targets.get((step * world + rank) % len(no_harm))
            timer.lap("data")
            with backend.accumulate(last=True):
                with autocast():
                    student = train_model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[
                        0, :-1
                    ]
                nh = kd_loss_sum(student, top_ids, top_lp, t.tail_mass != "none") / top_ids.shape[0]
                timer.lap("forward")
                backend.backward(t.no_harm_weight * nh)  # the workers' mean of per-token means
                timer.lap("backward")
            nh_loss = float(nh)
        lr = sched.get_last_lr()[0]
        grad_norm = backend.step()
        if grad_norm is not None:
            check_finite(
                torch.as_tensor(float(grad_norm)), "gradient norm", step, [train_rows[i]["row_id"] for i in mine]
            )
        else:
            grad_norm = float("nan")  # DeepSpeed without clipping computes none
        sched.step()
        timer.lap("optimizer")
        loss_total, nh_total = _all_reduce([loss_sum, nh_loss])
        timer.lap("comm")
        dt = time.perf_counter() - t0
        step_metrics = {
            "step": step + 1,
            "train/loss": loss_total / global_positions,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm),
            "train/tokens_per_s": global_tokens / dt,
            "train/step_time_s": dt,
            **timer.result(backend.comm_seconds()),
            **({"train/no_harm_loss": nh_total / world} if no_harm else {}),
        }
        if (step + 1) % t.log_every == 0 or step + 1 == total_steps:
            log(step_metrics)
            if is_writer:
                _say(
                    f"[train] step {step + 1}/{total_steps} loss {step_metrics['train/loss']:.4f} "
                    f"lr {lr:.2e} grad_norm {float(grad_norm):.3f} {step_metrics['train/tokens_per_s']:.0f} tok/s"
                )
        done = step + 1 == total_steps
        if (step + 1) % eval_every == 0 or done:
            last_eval = run_eval(step + 1)
            log(last_eval)
            track_best(step + 1, last_eval)
            if is_writer and last_eval:
                _say(f"[eval] step {step + 1} held-out KD loss {last_eval['eval/loss']:.4f}")
        if done or (t.save_every and (step + 1) % t.save_every == 0):
            checkpoint(step + 1, {**step_metrics, **last_eval}, final=done)

    workers = _gather_workers(rank, device)
    if is_writer and start_step < total_steps:  # a finished run that is re-run keeps its summary
        summary = {
            "workers": workers,
            "best": best if best["step"] is not None else None,
            "steps": total_steps,
            "train_rows": len(train_rows),
            "eval_rows": len(eval_rows),
            "dropped_too_long": dropped,
            "epochs": epochs,
            "final": {**step_metrics, **last_eval},
        }
        write_text_atomic(out_dir / "train_summary.json", json.dumps(summary, indent=2))
        plot_losses(metrics_path, out_dir / "loss.png")
        if run is not None:
            run.finish()


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


class _NoHarmTargets:
    """(input ids, teacher top-k ids, teacher top-k logprobs) of each no-harm chunk, the teacher being the bare
    model (the adapter disabled); each chunk's computed when first asked for and kept."""

    def __init__(self, peft_model, chunks: list[list[int]], device, top_k: int, autocast):
        self.model, self.chunks, self.device, self.top_k, self.autocast = peft_model, chunks, device, top_k, autocast
        self.cache: dict[int, tuple] = {}

    @torch.no_grad()
    def get(self, i: int) -> tuple:
        if i not in self.cache:
            x = torch.tensor([self.chunks[i]], device=self.device)
            with self.model.disable_adapter(), self.autocast():
                base = torch.log_softmax(self.model(input_ids=x, use_cache=False).logits[0, :-1].float(), -1)
            top_lp, top_ids = base.topk(self.top_k, dim=-1)
            self.cache[i] = (x, top_ids, top_lp)
        return self.cache[i]

    def compute_all(self) -> None:
        for i in range(len(self.chunks)):
            self.get(i)


def _no_harm_chunks(
    tok, text: str | None, n: int, fmt: str = "raw", system_prompt: str | None = None
) -> list[list[int]]:
    """The general text cut into chunks of ``n`` tokens (the last partial chunk is dropped).

    ``fmt``: ``raw`` the chunks as they are; ``chat`` each chunk as the assistant's answer to an unrelated
    request, in the chat template the agent uses; ``both`` a raw and a chat version of every chunk, alternating.
    """
    if not text:
        return []
    ids = tok(text).input_ids
    raw = [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)]
    if fmt == "raw":
        return raw
    chat = []
    for i, chunk in enumerate(raw):
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        msgs += [
            {"role": "user", "content": GENERAL_REQUESTS[i % len(GENERAL_REQUESTS)]},
            {"role": "assistant", "content": tok.decode(chunk)},
        ]
        chat.append(list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False)))
    return chat if fmt == "chat" else [c for pair in zip(raw, chat) for c in pair]


# user turns of the chat-formatted no-harm chunks: requests that have nothing to do with any memory
GENERAL_REQUESTS = (
    "Tell me about something you find interesting.",
    "Write a short paragraph on any topic.",
    "Explain something from science or history.",
    "Can you describe how something works?",
)
