"""Face reading, shared by preparation, evaluation and serving: read -> decode -> detect -> align
(`reading.read_decode_align`), the aligner and its detectors (`aligner.FaceAligner`: MTCNN in `mtcnn`,
then dlib), the crop templates and similarity fits (`geometry`) and their config (`config.AlignConfig`).
Names load lazily, so importing a config does not pull in torch or dlib."""

from mfr_ray import lazy_attributes

_LAZY = {
    "AlignConfig": "mfr_ray.faces.config",
    "AlignResult": "mfr_ray.faces.aligner",
    "FaceAligner": "mfr_ray.faces.aligner",
    "CROP_TEMPLATES": "mfr_ray.faces.geometry",
    "FaceCrop": "mfr_ray.faces.reading",
    "read_decode_align": "mfr_ray.faces.reading",
}

__all__ = ["CROP_TEMPLATES", "AlignConfig", "AlignResult", "FaceAligner", "FaceCrop", "read_decode_align"]

__getattr__ = lazy_attributes(__name__, _LAZY)
