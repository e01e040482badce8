"""Load a YAML config into its typed model, apply `a.b=value` overrides, and explain errors by key and file.

Every YAML file in `configs/` names its `kind`; the kind picks the pydantic model. Stages register their
job config here as "module:Class" so loading one kind does not import every stage.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from mfr_ray.config.base import ConfigError

CONFIG_KINDS: dict[str, str] = {
    "mask": "mfr_ray.masking:MaskingConfig",
    "prepare": "mfr_ray.data.config:PrepareConfig",
    "train": "mfr_ray.train.config:TrainConfig",
    "tune": "mfr_ray.tune.config:TuneConfig",
    "evaluate": "mfr_ray.evaluation.config:EvaluateConfig",
    "quickstart": "mfr_ray.quickstart:QuickstartConfig",
    "doctor": "mfr_ray.config.common:DoctorConfig",
}

REDACTED = "***"


def config_class(kind: str) -> type[BaseModel]:
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"unknown config kind {kind!r}; known kinds: {', '.join(sorted(CONFIG_KINDS))}")
    module_name, _, class_name = CONFIG_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `data["a"]["b"]["c"] = value` for key `a.b.c`, creating sections as needed."""
    path = key.split(".")
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key!r}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set nested keys from `a.b.c=value` strings; values are parsed as YAML scalars/lists."""
    for item in overrides:
        path, value = _parse_override(item)
        set_dotted(data, ".".join(path), value)
    return data


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            shown = err.get("input")
            shown = "" if isinstance(shown, dict | list) else f" (got {shown!r})"
            lines.append(f"  {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    expected: type[BaseModel] | None = None,
) -> BaseModel:
    """Read `path`, apply overrides, and validate against the model its `kind` names (or `expected`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides)
    kind = data.pop("kind", None)
    if expected is None:
        if kind is None:
            raise ConfigError(f"{path}: missing `kind` (one of {', '.join(sorted(CONFIG_KINDS))})")
        model = config_class(kind)
    else:
        model = expected
        if kind is not None and CONFIG_KINDS.get(kind, "").split(":")[-1] != expected.__name__:
            raise ConfigError(f"{path}: kind {kind!r} is not a {expected.__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(path))) from None


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return REDACTED if value.get_secret_value() else ""
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def dump_config(config: BaseModel) -> dict[str, Any]:
    """Plain-data view of a config with every secret replaced by `***` (safe to print or log)."""
    return _plain(config)


def flatten_config(config: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`, secrets redacted; the shape MLflow params want."""
    data = dump_config(config) if isinstance(config, BaseModel) else config
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat
