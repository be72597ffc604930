"""A config reference generated from the pydantic models (``ray-cartridges show-config``)."""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .distill import DistillConfig
from .generate import GenerateConfig
from .serve import ServeConfig
from .train import TrainConfig


def _stages():
    return {"train": TrainConfig, "generate": GenerateConfig, "distill": DistillConfig, "serve": ServeConfig}


def _type_name(ann) -> str:
    """A field's type as the reference prints it; a Literal lists its allowed values."""
    if get_origin(ann) is Annotated:  # a constrained type prints as its type
        return _type_name(get_args(ann)[0])
    if get_origin(ann) is Literal:
        return " or ".join(repr(v) for v in get_args(ann))
    args = get_args(ann)
    if get_origin(ann) in (Union, UnionType) and any(get_origin(a) is Literal for a in args):
        return " or ".join(_type_name(a) for a in args)
    if get_origin(ann) is list and args and get_origin(args[0]) is Literal:
        return f"list of {_type_name(args[0])}"
    if ann is type(None):
        return "None"
    name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
    return name.replace(" | ", " or ")


def _rows(model: type[BaseModel], prefix: str = "", brief: frozenset = frozenset()):
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield key, "section", "", (f.description or ann.__doc__ or "").strip()
            if key not in brief:
                yield from _rows(ann, key + ".")
            continue
        default = "(required)" if f.default is PydanticUndefined else repr(f.default).replace("|", "\\|")
        yield key, _type_name(ann), default, f.description or ""


def config_reference(stage: str, level: int = 1, brief: frozenset = frozenset()) -> str:
    model = _stages()[stage]
    lines = [
        f"{'#' * level} {stage} config ({model.__name__})",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    for key, typ, default, desc in _rows(model, brief=brief):
        lines.append(f"| `{key}` | {typ} | {default} | {desc} |")
    return "\n".join(lines)


STAGES = ("train", "generate", "distill", "serve")
INTRO = """# Configuration reference

Generated from the config models (`python -m ray_cartridges.cli show-config all > docs/CONFIG.md`, or
`make docs`); a test fails when this file and the models disagree. Every file is YAML; unknown keys are errors
that name the key and the file; any key can be overridden on the command line as `section.key=value`.
The seed's key names are accepted as they are.

- `train`: `ray-cartridges train --config ...` (the seed's `cartridge_train_*.yaml`)
- `generate`: `ray-cartridges generate --config ...` (the seed's `*_gen.yaml`)
- `distill`: `jobs/distill.py --config ...`: one file with a `generate:` and a `train:` section (as above)
  plus the job's own keys
- `serve`: `ray-cartridges serve --config ...` and `serve run ray_cartridges.serve.app:build_app config=...`
"""


def full_reference() -> str:
    """Every stage's table, as one markdown document (``docs/CONFIG.md``)."""
    parts = [INTRO]
    for stage in STAGES:
        brief = frozenset({"generate", "train"}) if stage == "distill" else frozenset()
        parts.append(config_reference(stage, level=2, brief=brief))
    return "\n\n".join(parts) + "\n"
