"""mfr-ray: turn face datasets into mask-robust face recognisers on Ray."""

__version__ = "0.1.0"


def lazy_attributes(package: str, names: dict[str, str]):
    """A package's module `__getattr__` (PEP 562) that imports `names[attr]`'s module on first use, so
    importing the package (a config, the CLI) does not load torch, Ray or dlib."""

    def __getattr__(name: str):
        if name in names:
            import importlib

            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
