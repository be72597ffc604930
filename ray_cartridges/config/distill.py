"""Config of the end-to-end job (``jobs/distill.py``): generate -> train -> publish -> evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel
from .generate import GenerateConfig
from .train import TrainConfig


class StagesConfig(StrictModel):
    """Which stages of the job run (each one resumes from its own outputs)."""

    generate: bool = Field(True, description="Run teacher generation (resumes from finished shards).")
    train: bool = Field(True, description="Run cartridge training (resumes from the last checkpoint).")
    publish: bool = Field(True, description="Push the cartridge to the hub when train.output.upload_to_hf is true.")
    evaluate: bool = Field(True, description="Evaluate the cartridge against no memory and in-context memory.")


class EvalConfig(StrictModel):
    """The evaluation stage (recall questions)."""

    max_questions: int = Field(30, gt=0, description="Memory questions asked in the recall check.")
    max_tokens: int = Field(40, gt=0, description="Max answer tokens in the recall check.")
    engine: Literal["vllm", "transformers"] = Field(
        "vllm",
        description="What answers the recall questions: vLLM (cartridge through its KV connector, memory in context "
        "as a cached prefix) or the transformers reference. KL is always read by the reference.",
    )
    enforce_eager: bool = Field(
        False, description="The recall engine (vLLM) without torch.compile: starts sooner; for short CPU runs."
    )


class DistillConfig(StrictModel):
    """One config for the whole job. ``train.input_dataset`` and a text init default to generation's outputs."""

    generate: GenerateConfig
    train: TrainConfig
    stages: StagesConfig = StagesConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="before")
    @classmethod
    def _wire_stages(cls, data):
        if not isinstance(data, dict) or not isinstance(data.get("generate"), dict):
            return data
        train = data.setdefault("train", {}) or {}
        if not isinstance(train, dict):
            return data
        gen_out = data["generate"].get("output_dir", GenerateConfig.model_fields["output_dir"].default)
        data_in = train.setdefault("input_dataset", {}) or {}
        if isinstance(data_in, dict) and not data_in.get("local_path") and not data_in.get("repo_id"):
            data_in.update(local_path=str(Path(gen_out) / "shards"), is_converted=data_in.get("is_converted", True))
        kv = train.setdefault("kv_cache", {}) or {}
        if kv.get("method") == "text" and not kv.get("init_text") and not kv.get("init_text_file"):
            kv["init_text_file"] = str(Path(gen_out) / "memory.txt")
        train.setdefault("model_name", data["generate"].get("model_name", "smollm2-135m-instruct"))
        if "student_system_prompt" in data["generate"]:
            train.setdefault("student_system_prompt", data["generate"]["student_system_prompt"])
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.generate.top_logprobs < self.train.training.top_k_logits:
            raise ValueError(
                f"train.training.top_k_logits={self.train.training.top_k_logits} exceeds generate.top_logprobs="
                f"{self.generate.top_logprobs}: the data has fewer logprobs per token than training expects"
            )
        return self
