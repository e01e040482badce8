"""The one registry every plug-in seam uses: backbones, heads, training objectives, mask types, fabric
patterns, evaluation analyses, config kinds and inference runtimes.

An entry registers itself where it is defined (`@HEADS.register("arcface")`). Each registry knows which
modules hold its entries and imports them on first lookup, so configs can validate a name lazily (without
importing torch at parse time of an unrelated config) and adding an entry is one file plus one decorator:
a module inside a registered package is found without being listed anywhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry (a class, a factory or a spec). `modules` are imported before the first lookup; a
    package among them is imported with every module inside it."""

    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind = kind
        self._modules = modules
        self._entries: dict[str, T] = {}
        self._loaded = False
        self._loading = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name")` above a class or function."""

        def add(entry: T) -> T:
            self.add(name, entry)
            return entry

        return add

    def add(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry

    def _load(self) -> None:
        """Import the registry's modules; it counts as loaded only once every one imported. A module that
        fails raises (naming it) on this and on every later lookup, never a silently partial registry."""
        if self._loaded or self._loading:  # _loading: a module looking a name up while the registry loads
            return
        self._loading = True
        try:
            for module_name in self._modules:
                current = module_name
                try:
                    module = importlib.import_module(module_name)
                    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
                        current = f"{module_name}.{info.name}"
                        importlib.import_module(current)
                except Exception as exc:
                    raise ImportError(
                        f"{self.kind} registry: module {current} failed to import ({type(exc).__name__}: {exc})",
                        name=current,
                    ) from exc
            self._loaded = True
        finally:
            self._loading = False

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def in_order(self) -> list[str]:
        """Names in registration order, where the order means something (a mask mix draws by it)."""
        self._load()
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._entries.items())

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the entry registered under `name` (a class or a factory)."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def check(self, name: str) -> str:
        """Pydantic validator body: the name, or a ValueError listing the known names."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return name

    @property
    def name_type(self) -> Any:
        """`str` annotated for pydantic so a config field accepts registered names only."""
        return Annotated[str, AfterValidator(self.check)]


# Every seam's registry, with the modules that fill it. A module inside a listed package registers itself
# by being there; each seam's owner keeps its line here.
BACKBONES: Registry = Registry("backbone", ("mfr_ray.models.backbones",))
HEADS: Registry = Registry("head", ("mfr_ray.models.heads",))
OBJECTIVES: Registry = Registry("objective", ("mfr_ray.train.objectives",))
MASK_TYPES: Registry = Registry("mask type", ("mfr_ray.masking.templates",))
PATTERNS: Registry = Registry("pattern", ("mfr_ray.masking.patterns",))
ANALYSES: Registry = Registry("analysis", ("mfr_ray.evaluation.analyses",))
CONFIG_KINDS: Registry = Registry("config kind", ("mfr_ray.config.loader",))
RUNTIMES: Registry = Registry("inference runtime", ("mfr_ray.runtime.sessions",))
