"""Base model every config section derives from: unknown keys are errors, not silently ignored."""

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


class StrictModel(BaseModel):
    """Unknown keys are errors; a raw ValidationError never quotes its input (a section's input holds its
    secrets): `load_config` names the key and shows a value only where it is safe."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), hide_input_in_errors=True
    )
