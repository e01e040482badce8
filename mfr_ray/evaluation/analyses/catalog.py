"""The registered analyses in report order and the `analyses:` config section they make. It reaches the
analysis classes through the ANALYSES registry only, never by import: the evaluate config builds its
section here, and the analyses read that config, so an import either way would close a circle."""

from __future__ import annotations

from typing import Any

from mfr_ray.config.base import StrictModel
from mfr_ray.registry import ANALYSES


def registered_analyses() -> list[tuple[str, Any]]:
    """(name, Analysis subclass) of every registered analysis, in report order."""
    return sorted(ANALYSES.items(), key=lambda item: item[1].order)


def configured_analyses(analyses_cfg: StrictModel) -> list[Any]:
    """Every registered analysis (an Analysis instance) with its own config cut from the flat `analyses:`
    section, report order."""
    return [
        cls(name, cls.Config.model_validate(analyses_cfg.model_dump(include=set(cls.Config.model_fields))))
        for name, cls in registered_analyses()
    ]


def analyses_config_fields() -> dict[str, tuple[Any, Any]]:
    """The fields every registered analysis puts under `analyses:`, for pydantic's create_model; a key two
    analyses both claim, or an analysis without its bool switch, is an error here, not a silent override."""
    fields: dict[str, tuple[Any, Any]] = {}
    for name, cls in registered_analyses():
        switch = cls.Config.model_fields.get(name)
        if switch is None or switch.annotation is not bool:
            raise TypeError(f"analysis {name!r}: its Config needs a bool field {name!r} (the switch)")
        for key, info in cls.Config.model_fields.items():
            if key in fields:
                raise TypeError(f"analysis {name!r}: config key {key!r} is already another analysis's")
            fields[key] = (info.annotation, info)
    return fields
