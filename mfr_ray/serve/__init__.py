"""The recogniser in service: a model package (`mfr export`), a gallery of enrolled people (`mfr enrol`),
verification and identification (`mfr verify`, `mfr identify`) and the Ray Serve application (`mfr serve`).

Everything a deployed model does with an image goes through `ModelPackage.embed_images`, the alignment and
normalisation the evaluation used, so a service score is the evaluation's score for the same images."""

from mfr_ray.serve.export import export_package
from mfr_ray.serve.package import EmbedResult, ModelPackage, OperatingPoint, load_package

__all__ = ["EmbedResult", "ModelPackage", "OperatingPoint", "export_package", "load_package"]
