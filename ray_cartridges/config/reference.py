"""A config reference generated from the pydantic models (``ray-cartridges show-config``)."""

from __future__ import annotations

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .distill import DistillConfig
from .generate import GenerateConfig
from .train import TrainConfig


def _stages():
    from ..serve.config import ServeConfig

    return {"train": TrainConfig, "generate": GenerateConfig, "distill": DistillConfig, "serve": ServeConfig}


def _type_name(ann) -> str:
    name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
    return name.replace(" | ", " or ")


def _rows(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield key, "section", "", (f.description or ann.__doc__ or "").strip()
            yield from _rows(ann, key + ".")
            continue
        default = "(required)" if f.default is PydanticUndefined else repr(f.default).replace("|", "\\|")
        yield key, _type_name(ann), default, f.description or ""


def config_reference(stage: str) -> str:
    model = _stages()[stage]
    lines = [f"# {stage} config ({model.__name__})", "", "| key | type | default | description |", "|---|---|---|---|"]
    for key, typ, default, desc in _rows(model):
        lines.append(f"| `{key}` | {typ} | {default} | {desc} |")
    return "\n".join(lines)
