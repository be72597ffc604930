"""Typed YAML configs with ``a.b=c`` command-line overrides.

Every stage's config is a pydantic model that forbids unknown keys. :func:`load_config` reads a
YAML file, applies overrides, validates, and turns pydantic's errors into one :class:`ConfigError`
that names the file, the dotted key, the offending value and the expected type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that does not validate."""


class StrictModel(BaseModel):
    """Base for all config sections: unknown keys are errors, defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str] | None, source: str = "<overrides>") -> dict:
    """Apply ``a.b.c=value`` overrides in place (values parsed as YAML scalars/lists)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} is not of the form key.sub=value")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"{source}: override {item!r} has an empty key")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"{source}: override {item!r}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = _parse_value(raw)
    return data


def _describe(cls: type[BaseModel], loc: tuple) -> str:
    """The expected type of the field at ``loc``, as written in the model's annotation."""
    model: Any = cls
    field = None
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            field = model.model_fields[part]
            model = field.annotation
        else:
            break
    if field is None:
        return "?"
    ann = field.annotation
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def format_validation_error(err: ValidationError, cls: type[BaseModel], source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"] if not isinstance(x, int)) or ("<root>",)
        key = ".".join(str(x) for x in e["loc"])
        kind = e["type"]
        if kind == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {e.get('input')!r})")
        elif kind == "missing":
            lines.append(f"  {key}: missing required key (expected {_describe(cls, loc)})")
        elif kind == "value_error" and isinstance(e.get("input"), dict):
            # a rule across fields (a model's validator): its message names the fields; the whole section's
            # values would only bury it
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {key or '(top level)'}: {msg}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r}, expected {_describe(cls, loc)})")
    return "\n".join(lines)


def validate_config(cls: type[T], data: dict, source: str = "<config>") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, cls, source)) from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load ``path`` (may be None for defaults only), apply overrides, validate into ``cls``."""
    data = load_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    apply_overrides(data, overrides, source)
    return validate_config(cls, data, source)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
