"""Typed experiment configs: pydantic models loaded from YAML with `key=value` overrides."""

from mfr_ray.config.base import ConfigError, StrictModel
from mfr_ray.config.loader import (
    CONFIG_KINDS,
    apply_overrides,
    config_class,
    dump_config,
    flatten_config,
    load_config,
    origin_of,
    read_config,
    read_config_with_origins,
    set_dotted,
    validate_config,
)

__all__ = [
    "CONFIG_KINDS",
    "ConfigError",
    "StrictModel",
    "apply_overrides",
    "config_class",
    "dump_config",
    "flatten_config",
    "load_config",
    "origin_of",
    "read_config",
    "read_config_with_origins",
    "set_dotted",
    "validate_config",
]
