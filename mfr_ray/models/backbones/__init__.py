"""Face embedding backbones: each module here registers its networks with `@BACKBONES.register("name")`
(`mfr_ray.registry`), and is found by being in this package."""
