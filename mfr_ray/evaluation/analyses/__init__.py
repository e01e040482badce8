"""The extra analyses of an evaluation, one module each, registered in `mfr_ray.registry.ANALYSES`. A module
added here is found without being listed anywhere (see docs/extending.md, "Add an analysis")."""
