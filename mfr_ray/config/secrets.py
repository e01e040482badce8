"""Secrets in configs and in what is shown or logged: the one redaction every message, MLflow param and
shared file goes through, and which config keys hold a secret. Beside the loader, which explains a bad
value without showing it."""

from __future__ import annotations

import re
import typing
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, SecretBytes, SecretStr

if TYPE_CHECKING:
    from mfr_ray.config.common import StorageConfig

REDACTED = "***"

# scheme://user:password@host -> scheme://***@host (the user part can be a token too, e.g. https://TOKEN@host)
_URI_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@")
# ?token=... &X-Amz-Signature=... &password=...: query values whose name says they are a secret
_QUERY_SECRET = re.compile(
    r"(?i)(?P<name>[?&;][\w.-]*(?:token|secret|passw|pwd|key|signature|sig|credential|auth)[\w.-]*=)[^&#\s'\"]+"
)


def redact(text: str, *storages: StorageConfig | None) -> str:
    """`text` fit to show or log: the credentials of each storage config given (None: the AWS_*
    environment's) replaced by `***`, then the credentials URIs carry anywhere in it: userinfo
    (`https://user:pass@host`, `postgresql://u:p@h/db`) and secret-named query values (`?token=`,
    `X-Amz-Signature=`). With no storage config, only the URI credentials."""
    if storages:
        from mfr_ray.config.common import StorageConfig

        for storage in storages:
            for value in (storage or StorageConfig()).credentials().values():
                if value and len(value) >= 4:
                    text = text.replace(value, REDACTED)
    text = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['name']}{REDACTED}", text)


def holds_secret(annotation: Any, seen: frozenset = frozenset()) -> bool:
    """A SecretStr field, or a section with one anywhere below it."""
    if annotation in (SecretStr, SecretBytes):
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation not in seen and any(
            holds_secret(f.annotation, seen | {annotation}) for f in annotation.model_fields.values()
        )
    return any(holds_secret(arg, seen) for arg in typing.get_args(annotation))


def secret_paths(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted keys of the secrets set in a config (its non-empty `SecretStr` fields)."""
    found = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr) and value.get_secret_value():
            found.append(f"{prefix}{name}")
        elif isinstance(value, BaseModel):
            found += secret_paths(value, f"{prefix}{name}.")
    return found


def secret_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted keys of every `SecretStr` field a config class has, set or not."""
    found = set()
    for name, field in model.model_fields.items():
        for kind in (field.annotation, *typing.get_args(field.annotation)):
            if kind is SecretStr:
                found.add(f"{prefix}{name}")
            elif isinstance(kind, type) and issubclass(kind, BaseModel):
                found |= secret_fields(kind, f"{prefix}{name}.")
    return found


def _hide_secrets(value: Any, key: str, secret_keys: set[str]) -> Any:
    if key in secret_keys:
        return REDACTED
    if isinstance(value, dict):
        return {k: _hide_secrets(v, f"{key}.{k}", secret_keys) for k, v in value.items()}
    return value


def safe_override(item: str, secret_keys: set[str], *storages: StorageConfig | None) -> str:
    """A `key=value` override as it may be shown: a value at a secret key (also inside a mapping value,
    `storage={secret_access_key: ...}`) becomes `***`, and any configured credential is redacted."""
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    hidden = _hide_secrets(value, key.strip(), secret_keys)
    if hidden != value:
        shown = hidden if isinstance(hidden, str) else yaml.safe_dump(hidden, default_flow_style=True).strip()
        item = f"{key}={shown}"
    return redact(item, *storages)
