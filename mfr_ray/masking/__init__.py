"""Synthetic face masks (MaskTheFace method): dlib landmarks -> six key points + tilt -> template view ->
homography warp -> blend matched to the face's light, with a recorded, holdable style (how it is worn, print,
straps, valve, shading, grain, soft edges). Templates and patterns are drawn by our own code."""

from mfr_ray.masking.config import AlignedLayout, CustomMaskType, MaskingConfig, MaskStyleConfig, parse_mix
from mfr_ray.masking.engine import MaskEngine
from mfr_ray.masking.layers import available_mask_types, available_patterns
from mfr_ray.masking.records import MaskRecord, MaskResult, record_schema
from mfr_ray.masking.sampling import MaskChoice, rng_for
from mfr_ray.masking.templates import KEYPOINT_NAMES

__all__ = [
    "KEYPOINT_NAMES",
    "AlignedLayout",
    "CustomMaskType",
    "MaskChoice",
    "MaskEngine",
    "MaskRecord",
    "MaskResult",
    "MaskStyleConfig",
    "MaskingConfig",
    "available_mask_types",
    "available_patterns",
    "parse_mix",
    "record_schema",
    "rng_for",
]
