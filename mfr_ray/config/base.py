"""Base model every config section derives from: unknown keys are errors, not silently ignored."""

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator

from mfr_ray.paths import expand_shared


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


class StrictModel(BaseModel):
    """Unknown keys are errors; a raw ValidationError never quotes its input (a section's input holds its
    secrets): `load_config` names the key and shows a value only where it is safe."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), hide_input_in_errors=True
    )


# A config path that may start with `${shared}` (the shared datasets/weights folder); expanded on load.
SharedPath = Annotated[str, AfterValidator(expand_shared)]

_NOTICES: set[str] = set()


def deprecated_spelling(field: str, message: str):
    """A validator for `field` (assign it in the class body): a value set there still works and prints
    `message` once as a deprecation notice."""

    def notice(cls, value):
        if value:
            deprecation_notice(message)
        return value

    return field_validator(field)(classmethod(notice))


def deprecation_notice(message: str) -> None:
    """One line on stderr, once per process, for a config key that still works but has a newer spelling."""
    import sys

    if message not in _NOTICES:
        _NOTICES.add(message)
        print(f"deprecated: {message}", file=sys.stderr, flush=True)
