"""Load a YAML config into its typed model, apply `a.b=value` overrides, and explain errors by key and file.

Every YAML file in `configs/` names its `kind`; the kind picks the pydantic model. Stages register their
job config here, in `CONFIG_KINDS` (`mfr_ray.registry`), as "module:Class" so loading one kind does not
import every stage.
"""

from __future__ import annotations

import importlib
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretBytes, SecretStr, ValidationError

from mfr_ray.config.base import ConfigError
from mfr_ray.config.secrets import REDACTED, holds_secret, redact
from mfr_ray.registry import CONFIG_KINDS

for _kind, _target in {
    "mask": "mfr_ray.masking:MaskingConfig",
    "prepare": "mfr_ray.data.config:PrepareConfig",
    "train": "mfr_ray.train.config:TrainConfig",
    "tune": "mfr_ray.tune.config:TuneConfig",
    "evaluate": "mfr_ray.evaluation.config:EvaluateConfig",
    "quickstart": "mfr_ray.quickstart:QuickstartConfig",
    "doctor": "mfr_ray.config.common:DoctorConfig",
}.items():
    CONFIG_KINDS.add(_kind, _target)

def config_class(kind: str) -> type[BaseModel]:
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"unknown config kind {kind!r}; known kinds: {', '.join(CONFIG_KINDS.names())}")
    module_name, _, class_name = CONFIG_KINDS.get(kind).partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {key + '=...'!r} has an empty key")  # the value may be a secret
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


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _union_member(models: list[type[BaseModel]], part: int | str) -> type[BaseModel] | None:
    """The section of a tagged union (`loss:`, picked by `kind`) that pydantic names by its tag in an error
    location."""
    if len(models) < 2 or not isinstance(part, str):
        return None
    for model in models:
        kind = model.model_fields.get("kind")
        if kind is not None and part in typing.get_args(kind.annotation):
            return model
    return None


def _error_key(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[str, bool]:
    """The dotted key of an error location as the config spells it (without a union member's tag), and
    whether the field there is a secret or a section holding one (whatever was given there, e.g. a string
    instead of the `storage` mapping, may be a secret)."""
    parts: list[str] = []
    models, fields, followed = [model], [], True
    for part in loc:
        member = _union_member(models, part) if followed else None
        if member is not None:
            models = [member]
            continue
        parts.append(str(part))
        if not followed or isinstance(part, int):
            continue
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        followed = bool(fields)
        models = [m for f in fields for m in _models_in(f.annotation)]
    return ".".join(parts) or "<root>", followed and any(holds_secret(f.annotation) for f in fields)


def _format_errors(
    exc: ValidationError, source: str, model: type[BaseModel], origins: dict[str, str] | None = None
) -> str:
    """One line per error naming the key (and the base file or command line that set it, when that is not
    `source`); the input is shown only when it is a plain value of a field that is not a secret (no dicts or
    lists: a section's input would hold its secrets)."""
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        key, secret = _error_key(model, err["loc"])
        found = origin_of(origins or {}, key)
        where = f" [set in {found}]" if found and found != source else ""
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{where}")
            continue
        if err["type"] == "union_tag_invalid":
            ctx = err["ctx"]
            lines.append(f"  {key}.kind: unknown kind {ctx['tag']!r}; known: {ctx['expected_tags']}{where}")
            continue
        shown = err.get("input")
        hidden = isinstance(shown, dict | list | tuple | BaseModel) or secret
        got = "" if hidden else f" (got {redact(repr(shown))})"
        lines.append(f"  {key}: {err['msg']}{got}{where}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:  # its str() quotes the offending line, which may hold a secret
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _chain(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The files `path` inherits from, root base first, each with its own data (`base:` taken out)."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: list[Path] = []
    while True:
        if path.resolve() in seen:
            names = " -> ".join(str(p) for p, _ in chain) + f" -> {path}"
            raise ConfigError(f"config base cycle: {names}")
        seen.append(path.resolve())
        data = _read_yaml(path)
        base = data.pop("base", None)
        chain.append((path, data))
        if base is None:
            return chain[::-1]
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: base: must name one YAML file (relative to {path.name})")
        base_path = Path(os.path.normpath(path.parent / base))  # configs/quickstart/../x.yaml -> configs/x.yaml
        if not base_path.is_file():
            raise ConfigError(f"{path}: base {base!r} not found ({base_path})")
        path = base_path


def _sections(models: list[type[BaseModel]], key: str, old: Any, new: Any) -> tuple[list[type[BaseModel]], bool]:
    """The model(s) of section `key` when a file gives it the mapping `new` (empty: not a section, the value is
    replaced whole), and whether `new` merges into `old` key by key. A mapping-valued field (`masking.mix`,
    `head_kwargs`, `sources`) is no section; a tagged-union section (`loss:`) whose `kind` changes is
    replaced."""
    if not isinstance(new, dict):
        return [], False
    found: list[type[BaseModel]] = []
    for field in [m.model_fields[key] for m in models if key in m.model_fields]:
        annotation = field.annotation
        if typing.get_origin(annotation) in (dict, list, tuple, set):
            continue
        found += _models_in(annotation)
    merges = isinstance(old, dict)
    if len(found) > 1:  # a tagged union: merge only within the same kind
        kind = new.get("kind", old.get("kind") if merges else None)
        merges = merges and old.get("kind") == kind
        member = _union_member(found, kind) if isinstance(kind, str) else None
        found = [member] if member is not None else found
    return found, merges and bool(found)


def _merge(
    base: dict[str, Any], over: dict[str, Any], models: list[type[BaseModel]], source: str,
    origins: dict[str, str], prefix: str = "",
) -> dict[str, Any]:
    """`over` merged into `base` section by section; `origins[dotted key] = source` for every value `over`
    set (per key inside a section, whole for any other value)."""
    merged = dict(base)
    for key, value in over.items():
        name = f"{prefix}{key}"
        sections, merges = _sections(models, key, base.get(key), value)
        if not merges:
            for stale in [k for k in origins if k == name or k.startswith(f"{name}.")]:
                del origins[stale]
        if sections:
            merged[key] = _merge(base[key] if merges else {}, value, sections, source, origins, f"{name}.")
            if not value:
                origins[name] = source
            continue
        merged[key] = value
        origins[name] = source
    return merged


OVERRIDE_ORIGIN = "command line"


def read_config_with_origins(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), expected: type[BaseModel] | None = None,
    overrides_origin: str = OVERRIDE_ORIGIN,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged data of config file `path` (its `base:` chain resolved, its `kind` included) with the
    overrides applied, and the origin of every key that was set: `{"data.uri": "configs/train_x.yaml",
    "optim": "configs/base/train.yaml", "schedule.epochs": "command line"}` (a section's origin covers the
    keys below it that no later file set). A key's origin is the last file of the chain that set it."""
    chain = _chain(Path(path))
    kinds = [(p, d["kind"]) for p, d in chain if "kind" in d]
    if len({k for _, k in kinds}) > 1:
        named = ", ".join(f"{p} is kind {k!r}" for p, k in kinds)
        raise ConfigError(f"{path}: its base chain mixes kinds ({named})")
    kind = kinds[-1][1] if kinds else None
    model = expected
    if model is None and isinstance(kind, str) and kind in CONFIG_KINDS:
        model = config_class(kind)
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for file, own in chain:
        data = _merge(data, own, [model] if model else [], str(file), origins)
    for item in overrides:
        key, value = _parse_override(item)
        set_dotted(data, ".".join(key), value)
        name = ".".join(key)
        for stale in [k for k in origins if k.startswith(f"{name}.")]:
            del origins[stale]
        origins[name] = overrides_origin
    return data, origins


def read_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The plain data of config file `path` (its `base:` chain merged, its `kind` included) with the
    overrides applied."""
    return read_config_with_origins(path, overrides)[0]


def origin_of(origins: dict[str, str], key: str) -> str | None:
    """The file (or `command line`) that set dotted `key`, or the section above it; None: a code default."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = origins.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None


def validate_config(
    data: dict[str, Any], source: str | Path, expected: type[BaseModel] | None = None,
    origins: dict[str, str] | None = None,
) -> BaseModel:
    """Validate config data read from `source` against the model its `kind` names (or `expected`); with
    `origins` (`read_config_with_origins`), an error names the base file (or the command line) that set the
    bad key when that is not `source` itself."""
    data = dict(data)
    kind = data.pop("kind", None)
    if expected is None:
        if kind is None:
            raise ConfigError(f"{source}: missing `kind` (one of {', '.join(CONFIG_KINDS.names())})")
        model = config_class(kind)
    else:
        model = expected
        target = CONFIG_KINDS.get(kind) if kind in CONFIG_KINDS else ""
        if kind is not None and target.split(":")[-1] != expected.__name__:
            raise ConfigError(f"{source}: kind {kind!r} is not a {expected.__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(source), model, origins or {})) from None


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    expected: type[BaseModel] | None = None,
) -> BaseModel:
    """Read `path` (and its `base:` chain), apply overrides, and validate against the model its `kind` names
    (or `expected`)."""
    data, origins = read_config_with_origins(path, overrides, expected)
    return validate_config(data, path, expected, origins)


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr | SecretBytes):
        return REDACTED if value.get_secret_value() else ""
    if isinstance(value, str):
        return redact(value)
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
    """Plain-data view of a config with every secret (SecretStr, credentials inside URIs) replaced by `***`
    (safe to print or log; not for rebuilding the config)."""
    return _plain(config)


def flatten_config(config: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`, secrets redacted (in plain dicts too); the shape MLflow params want."""
    data = _plain(config)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat
