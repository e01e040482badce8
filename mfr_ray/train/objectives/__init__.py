"""Training objectives, one module each: a class deriving from `Objective` registered with
`@OBJECTIVES.register("kind")`, which is also the `loss:` section of a train config with that `kind`.

Every module here is imported with the package, so the configs' union of objectives (`train.config`) sees
them all however the package is first reached.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
