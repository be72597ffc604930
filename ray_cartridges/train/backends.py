"""Data-parallel backends behind one interface, so the training loop does not change with the backend.

- ``ddp``: torch DistributedDataParallel (via ``ray.train.torch.prepare_model``), a torch AdamW and
  gradient clipping; the optimizer state is saved by rank 0.
- ``deepspeed``: a DeepSpeed engine with ZeRO stage 1, 2 or 3 around the same model and the same torch AdamW
  (a torch optimizer avoids compiling DeepSpeed's fused Adam). Stage 1/2 partition the optimizer state
  (and gradients); stage 3 also partitions the parameters, including the frozen model, for models too large
  for one device. Its checkpoints are written by every rank (``save_checkpoint``) into the run's storage.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from ..cartridge import encoder, load_tensors_only


class DDPBackend:
    name = "ddp"

    def __init__(
        self,
        peft_model,
        params,
        opt,
        world: int,
        max_grad_norm: float | None,
        accumulation: int,
        profile: bool = False,
        student=None,
    ):
        """``student``: the module that runs forwards (default ``peft_model``; it holds the same parameters)."""
        import ray.train.torch

        self.peft_model = peft_model
        self.params = params
        self.opt = opt
        self.max_grad_norm = max_grad_norm
        student = student if student is not None else peft_model
        self.model = ray.train.torch.prepare_model(student) if world > 1 else student
        self._comm_s = 0.0
        if profile and world > 1:
            self.model.register_comm_hook(None, self._timed_allreduce)

    def _timed_allreduce(self, state, bucket):
        """DDP comm hook for profiling: the same mean all-reduce, synchronous, with its time recorded.

        The cartridge is one parameter whose gradient is complete only at the end of backward, so DDP has
        nothing to overlap it with and a synchronous reduce costs the same as the default hook.
        """
        import torch.distributed as dist

        buf = bucket.buffer()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        if buf.is_cuda:
            torch.cuda.synchronize(buf.device)
        self._comm_s += time.perf_counter() - t0
        buf.div_(dist.get_world_size())
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut

    def comm_seconds(self) -> float:
        """Seconds spent reducing gradients since the last call (measured only when profiling)."""
        s, self._comm_s = self._comm_s, 0.0
        return s

    def accumulate(self, last: bool):
        """Context of one micro-batch: gradients sync only on the last one of a step."""
        if last or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        if self.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params]))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    @contextlib.contextmanager
    def full_weights(self):
        yield

    def save_state(self, d: Path, sched, step: int, is_writer: bool) -> bool:
        """Write optimizer/scheduler state into ``d``; returns whether this rank wrote files."""
        if not is_writer:
            return False
        torch.save(
            {"optimizer": self.opt.state_dict(), "scheduler": sched.state_dict(), "step": step}, d / "train_state.pt"
        )
        return True

    def load_state(self, d: Path, sched) -> int:
        state = load_tensors_only(d / "train_state.pt", "a training state")
        self.opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        return int(state["step"])


class DeepSpeedBackend(DDPBackend):
    name = "deepspeed"

    def __init__(
        self,
        peft_model,
        params,
        opt,
        world: int,
        max_grad_norm: float | None,
        accumulation: int,
        zero_stage: int,
        micro_batch: int,
        bf16: bool,
        profile: bool = False,
        student=None,
    ):
        import deepspeed

        cfg = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": accumulation,
            "zero_optimization": {"stage": zero_stage},
            "gradient_clipping": max_grad_norm or 0.0,
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True,
            # DeepSpeed's own timers: when profiling, the gradient reduce inside backward is read from them
            "wall_clock_breakdown": profile,
        }
        self.peft_model = peft_model
        self.params = params
        self.engine, self.opt, _, _ = deepspeed.initialize(
            model=student if student is not None else peft_model,
            model_parameters=params,
            optimizer=opt,
            config=cfg,
            dist_init_required=False,
        )
        self.model = self.engine
        self.zero_stage = zero_stage
        self.profile = profile
        self.engine.checkpoint_engine.load = _load_tensors_only

    def comm_seconds(self) -> float:
        """Seconds of gradient reduce in backward since the last call (DeepSpeed's ``bwd_allreduce`` timer).

        The parameter all-gather of ZeRO's optimizer step is not timed apart: it stays in the optimizer phase.
        """
        if not self.profile:
            return 0.0
        from deepspeed.utils.timer import BACKWARD_REDUCE_MICRO_TIMER

        return self.engine.timers(BACKWARD_REDUCE_MICRO_TIMER).elapsed(reset=True) / 1000.0

    def accumulate(self, last: bool):
        return contextlib.nullcontext()  # the engine knows the accumulation boundary

    def backward(self, loss: torch.Tensor) -> None:
        # the loop already scaled the loss to a global per-token mean: no further division by accumulation
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float | None:
        """The optimizer step; the gradient norm where DeepSpeed computed one (None where it did not)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    @contextlib.contextmanager
    def full_weights(self):
        """Under ZeRO-3 parameters are partitioned: gather the cartridge to read or save it."""
        if self.zero_stage == 3:
            import deepspeed

            enc = encoder(self.peft_model)
            ps = [p for p in (enc.frozen_embedding, enc.trainable_embedding) if p is not None]
            with deepspeed.zero.GatheredParameters(ps, modifier_rank=0):
                yield
        else:
            yield

    def save_state(self, d: Path, sched, step: int, is_writer: bool) -> bool:
        self.engine.save_checkpoint(
            str(d / "deepspeed"), tag="state", client_state={"step": step, "scheduler": sched.state_dict()}
        )
        return True

    def load_state(self, d: Path, sched) -> int:
        _, client = self.engine.load_checkpoint(str(d / "deepspeed"), tag="state")
        sched.load_state_dict(client["scheduler"])
        return int(client["step"])


def _deepspeed_checkpoint_globals() -> list:
    """The DeepSpeed classes its ZeRO checkpoints hold besides tensors (found by loading each stage's files)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _load_tensors_only(path: str, map_location=None):
    """DeepSpeed's checkpoint read with ``weights_only=True`` (its own engine uses ``weights_only=False``): a file
    under the run's storage that holds any other object is refused, never executed."""
    return load_tensors_only(path, "a DeepSpeed checkpoint", _deepspeed_checkpoint_globals(), map_location)
