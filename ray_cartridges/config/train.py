"""Config of the training stage (``ray-cartridges train``). Seed key names stay valid."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel


class InputDatasetConfig(StrictModel):
    """Where the teacher data comes from and how it is split."""

    repo_id: str | None = Field(None, description="Hub dataset id to pull with snapshot_download.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of repo_id.")
    local_path: str | None = Field(
        None, description="Local dataset: a JSONL file (seed format) or a parquet file/directory (flat top-k)."
    )
    is_converted: bool = Field(
        True, description="true: the data is flat top-k parquet; false: seed JSONL, converted on the fly."
    )
    min_prob_mass: float = Field(0.99, gt=0, le=1, description="Conversion: keep top tokens until this mass.")
    eval_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of split keys held out for evaluation, per kind of key (replay experiences, self-study "
        "chunks): all rows of a held-out experience or chunk stay out of training.",
    )
    split_seed: int = Field(0, description="Seed of the train/eval split.")

    @model_validator(mode="after")
    def _one_source(self):
        if not self.repo_id and not self.local_path:
            raise ValueError("input_dataset needs repo_id or local_path")
        return self


class OutputConfig(StrictModel):
    """Where the cartridge goes (local directory, optional hub repo)."""

    local_dir: str = Field(description="Directory that receives the cartridge, checkpoints and metrics.")
    hf_repo_id: str | None = Field(None, description="Hub model repo to push the cartridge to.")
    upload_to_hf: bool = Field(False, description="Push output.local_dir to hf_repo_id at the end.")
    hf_private: bool = Field(True, description="Create the hub repo as private.")
    export_tokasaurus: bool = Field(
        False,
        description="Also write the cartridge as Tokasaurus reads it, tokasaurus/<local_dir name>/{cartridge.pt, "
        "config.yaml}, inside local_dir (pushed with the cartridge).",
    )


class KVCacheConfig(StrictModel):
    """The cartridge: its length p and how it is initialised."""

    method: Literal["random", "text"] = Field(
        "random", description="Cartridge init: 'random' or 'text' (prefill the first num_tokens tokens of a text)."
    )
    num_tokens: int = Field(128, gt=0, description="Cartridge length p (virtual KV tokens).")
    num_frozen_tokens: int = Field(1, ge=0, description="Leading cartridge tokens kept frozen (attention sink).")
    init_text: str | None = Field(None, description="Text for method=text.")
    init_text_file: str | None = Field(None, description="File holding the text for method=text.")

    @model_validator(mode="after")
    def _check(self):
        if self.num_frozen_tokens > self.num_tokens:
            raise ValueError(
                f"kv_cache.num_frozen_tokens ({self.num_frozen_tokens}) > kv_cache.num_tokens ({self.num_tokens})"
            )
        if self.method == "text" and not (self.init_text or self.init_text_file):
            raise ValueError("kv_cache.method=text needs kv_cache.init_text or kv_cache.init_text_file")
        return self


class TrainingConfig(StrictModel):
    """Optimisation, batching, evaluation, checkpoints and the data-parallel backend."""

    epochs: int = Field(1, gt=0, description="Passes over the training split.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    global_batch_size: int = Field(8, gt=0, description="Conversations per optimizer step, summed over workers.")
    micro_batch_size: int | None = Field(
        None, gt=0, description="Per-worker forward batch; smaller than the per-worker batch means accumulation."
    )
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps before cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: no clipping).")
    top_k_logits: int = Field(20, gt=0, description="Top-k teacher logprobs per token used by the loss.")
    seed: int = Field(0, description="Seed of init, shuffling and everything random.")
    bf16_autocast: bool = Field(False, description="Run the frozen model under bf16 autocast.")
    max_seq_len: int = Field(2048, gt=0, description="Conversations longer than this (tokens) are dropped.")
    shared_prefix: bool = Field(
        True,
        description="Read the leading tokens all rows of a micro-batch share (the chat template's system prompt) "
        "once and repeat their keys and values over the rows: the same loss and gradients for fewer tokens.",
    )
    save_every: int = Field(
        0,
        ge=0,
        description="Write a checkpoint every N steps (0: only at the end); a stopped or failed run, re-run, "
        "continues from the last one.",
    )
    eval_every: int = Field(0, ge=0, description="Evaluate on the held-out split every N steps (0: start and end).")
    log_every: int = Field(1, gt=0, description="Log metrics every N steps.")
    backend: Literal["ddp", "deepspeed"] = Field("ddp", description="Data-parallel backend.")
    zero_stage: int = Field(
        2,
        ge=1,
        le=3,
        description="DeepSpeed ZeRO stage: 1 optimizer state, 2 + gradients, 3 + parameters (frozen model too).",
    )
    resume: bool = Field(
        True,
        description="Continue from the last checkpoint of an identical earlier run (same config and training data) "
        "in output.local_dir.",
    )
    no_harm_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the no-harm term: per step, KD from the bare model (no cartridge) to the model "
        "with the cartridge on a chunk of general text, so the cartridge does not disturb text unrelated to "
        "the memory. 0: off.",
    )
    no_harm_text_file: str | None = Field(
        None, description="General text for the no-harm term (default: the bundled ray_cartridges/data/general.txt)."
    )
    no_harm_tokens: int = Field(128, gt=1, description="Tokens per no-harm chunk (one chunk per worker per step).")
    no_harm_format: Literal["raw", "chat", "both"] = Field(
        "both",
        description="How the no-harm chunks are read after the cartridge: as plain text, as the assistant turn of "
        "a chat about something else (how the agent reads the cartridge), or alternating both.",
    )
    tail_mass: Literal["none", "no_harm", "all"] = Field(
        "all",
        description="Where the KD loss also matches the probability mass outside the teacher's kept top-k tokens "
        "(one more class: the teacher's left-out mass against the student's mass on all other tokens): none, the "
        "no-harm term only, or all (the memory data too). Without it the loss is minimised by putting all the "
        "student's mass on the kept tokens, sharper than the teacher.",
    )
    keep_best: bool = Field(
        True, description="Keep the cartridge with the lowest held-out KD loss so far in <local_dir>/best."
    )
    profile: bool = Field(
        False,
        description="Log a per-step time breakdown (data, forward, backward, optimizer, communication) in "
        "metrics.jsonl; synchronises the device between phases, so leave it off for production runs.",
    )


class ScalingConfig(StrictModel):
    """Ray Train workers and resources (the seed's torchrun flags map here)."""

    num_workers: int = Field(1, gt=0, description="Ray Train workers (total over all nodes).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    resources_per_worker: dict[str, float] | None = Field(None, description="Ray resources per worker.")
    storage_path: str | None = Field(
        None, description="Ray Train storage (shared FS or cloud URI on clusters); default: <local_dir>/ray_results."
    )
    max_failures: int = Field(
        0, ge=0, description="Worker-group failures to recover from (restart from last checkpoint)."
    )


class WandbConfig(StrictModel):
    """Experiment tracking (never asks for a login unless mode is online)."""

    mode: Literal["disabled", "offline", "online"] = Field("disabled", description="wandb mode.")
    project: str = Field("ray-cartridges", description="wandb project.")
    entity: str | None = Field(None, description="wandb entity.")
    name: str | None = Field(None, description="wandb run name.")


class TrainConfig(StrictModel):
    """Knowledge distillation of a cartridge from precomputed teacher logprobs."""

    input_dataset: InputDatasetConfig
    output: OutputConfig
    model_name: str = Field("smollm2-135m-instruct", description="Hub id, local dir, or bundled short name.")
    model_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "fp32",
        description="dtype of the frozen model weights (the cartridge stays fp32). auto: bf16 on GPUs and on CPUs "
        "with AVX512-BF16/AMX, fp32 elsewhere (CPUs without them emulate bf16, much slower than fp32).",
    )
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto",
        description="Attention kernel of the frozen model in training. auto: sdpa on GPUs, eager on CPUs (where "
        "PyTorch's flash-attention backward is slower than plain matmuls at these short sequences).",
    )
    student_system_prompt: str | None = Field(
        None, description="System prompt of the student conversation (null: none; the template's default applies)."
    )
    kv_cache: KVCacheConfig = KVCacheConfig()
    training: TrainingConfig = TrainingConfig()
    scaling: ScalingConfig = ScalingConfig()
    distributed_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend (auto: nccl with GPUs, gloo otherwise)."
    )
    wandb: WandbConfig = WandbConfig()

    @model_validator(mode="after")
    def _batch_divides_over_workers(self):
        gbs, workers = self.training.global_batch_size, self.scaling.num_workers
        if gbs % workers:
            raise ValueError(
                f"training.global_batch_size={gbs} does not divide over scaling.num_workers={workers}: each worker "
                "must get the same number of rows per step"
            )
        return self
