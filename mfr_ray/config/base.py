"""Base model every config section derives from: unknown keys are errors, not silently ignored."""

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
