"""Config of the teacher data generation stage (``ray-cartridges generate``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import StrictModel


class GenerateConfig(StrictModel):
    """Teacher generation: a model with the memory in its prompt answers many prompts; top-k logprobs are kept."""

    checkpoint_dir: str = Field(description="HistoryAgent checkpoint root, 'latest', an ep_* dir, or a text file.")
    output_dir: str = Field("outputs/distillation/data/example_run", description="Where dataset files go.")
    model_name: str = Field("smollm2-135m-instruct", description="Teacher model: hub id, local dir or bundled name.")
    dtype: Literal["fp32", "bf16"] = Field("bf16", description="Teacher dtype.")
    top_logprobs: int = Field(20, gt=0, description="Top-k logprobs kept per answer token.")
    num_threads: int = Field(1, gt=0, description="Teacher actors (engines) in parallel.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    max_tokens: int = Field(128, gt=0, description="Max answer tokens.")
    max_model_len: int = Field(4096, gt=0, description="Engine context length.")
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs per engine.")
    max_samples: int | None = Field(None, gt=0, description="Cap on generated conversations.")
    seed: int = Field(0, description="Seed of prompt sampling and generation.")
    hf_repo_id: str | None = Field(None, description="Hub dataset repo to push to.")
    hf_private: bool = Field(True, description="Create the hub dataset as private.")
