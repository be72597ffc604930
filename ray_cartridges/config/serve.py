"""Config of the Ray Serve app (``ray-cartridges serve --config configs/serve.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel
from .generate import check_cpu_block


class LimitsConfig(StrictModel):
    """Request bounds: what is refused, and with which status."""

    max_body_bytes: int = Field(1_000_000, gt=0, description="Largest accepted request body (413 above).")
    max_messages: int = Field(64, gt=0, description="Most messages in one request (400 above).")
    max_tokens: int = Field(512, gt=0, description="Largest max_tokens a request may ask for (400 above).")
    max_context_tokens: int = Field(2048, gt=0, description="Prompt + max_tokens limit (400 above).")
    max_queued_requests: int = Field(256, gt=0, description="Requests waiting per replica before 429.")


class ServeConfig(StrictModel):
    """Serve one or more cartridges behind an OpenAI-compatible endpoint."""

    cartridges: dict[str, str] = Field(
        description="model name -> cartridge (local dir, or hf://org/repo for a hub cartridge)."
    )
    base_model: str | None = Field(None, description="Frozen model (default: the cartridges' model).")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="dtype of the frozen model.")
    api_key: str | None = Field(None, description="Bearer key required when set (prefer api_key_env).")
    api_key_env: str | None = Field("RAY_CARTRIDGES_API_KEY", description="Env var that holds the API key.")
    host: str = Field("127.0.0.1", description="HTTP host.")
    port: int = Field(8000, gt=0, description="HTTP port.")
    num_replicas: int = Field(1, gt=0, description="Replicas (ignored when autoscaling is set).")
    autoscaling: dict | None = Field(None, description="Ray Serve autoscaling_config (min/max replicas, targets).")
    num_cpus_per_replica: float = Field(1.0, gt=0, description="CPUs per replica.")
    num_gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica.")
    max_cartridges_per_replica: int = Field(
        8, gt=0, description="Cartridges whose K/V a replica keeps on its device for loading (LRU); all are served."
    )
    block_size: int | None = Field(
        None,
        gt=0,
        description="vLLM KV block size (default: vLLM's; without a GPU a multiple of 32). A cartridge whose p is "
        "a multiple of it stays in the prefix cache between requests; otherwise it is written again for each "
        "request.",
    )
    enforce_eager: bool = Field(False, description="Run vLLM without torch.compile: starts sooner, decodes slower.")
    max_num_seqs: int | None = Field(None, gt=0, description="Most requests in vLLM's running batch (default: vLLM's).")
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="after")
    def _check(self):
        if not self.num_gpus_per_replica:  # replicas without a GPU run vLLM's CPU attention
            check_cpu_block(self.block_size, "or null")
        return self
