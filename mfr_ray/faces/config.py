"""How faces are found and cropped (`AlignConfig`): one config for preparation, evaluation and serving."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mfr_ray.config.base import StrictModel
from mfr_ray.registry import RUNTIMES
from mfr_ray.runtime import DEFAULT_RUNTIME

CropName = Literal["112x112", "112x96", "160x160"]
LandmarkFit = Literal["all5", "upper_face", "weighted", "dlib_upper_face"]
MaskedTwin = Literal["reuse", "detect", "jitter"]


class AlignConfig(StrictModel):
    """How faces are found and cropped (`mfr_ray.faces`): prepare, evaluation and serving share it."""

    crop: CropName = "112x96"
    skip_detection: bool = Field(False, description="input is already an aligned crop: only resize it")
    fallbacks: list[Literal["dlib", "center"]] = Field(default_factory=lambda: ["dlib", "center"])
    min_face_size: int = Field(20, ge=8, description="smallest face side in pixels the detectors accept")
    mtcnn_thresholds: list[float] = Field(default_factory=lambda: [0.6, 0.7, 0.7], min_length=3, max_length=3)
    mtcnn_min_score: float = Field(0.9, ge=0.0, le=1.0, description="faces scored below this are ignored")
    rescue: bool = Field(
        True, description="where MTCNN and dlib find no face, run MTCNN again on the frame padded with black "
        "(looser stage thresholds) and on its mirror image, accepting only faces scored mtcnn_min_score: finds "
        "masked faces the first pass misses (benchmarks/bench_detect_masked.py); before the centre guess"
    )
    dlib_upsample: int = Field(1, ge=0, le=3, description="HOG detector upsampling steps")
    center_box_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="centre fallback: face box side as a fraction of the image's shorter side"
    )
    batch_size: int = Field(
        8, ge=1, description="images per MTCNN call in align_batch (same-size images); on CPU 8 is faster than "
        "32 and holds fewer candidate boxes in memory at once"
    )
    max_pixels: int = Field(4096 * 4096, ge=1, description="larger images are rejected as too_large")
    detect_max_side: int = Field(
        1024, ge=64, description="detection runs on a copy shrunk to this longest side; the landmarks are "
        "scaled back and the full-resolution image is warped"
    )
    landmark_fit: LandmarkFit = Field(
        "all5", description="points the similarity is fitted on: all5 (equal weights), upper_face (eyes + "
        "nose: masks move the mouth corners), weighted (mouth corners weighted by mouth_weight, nose by "
        "nose_weight), dlib_upper_face (dlib's 68-point fit on the detected face, similarity on the brows, nose "
        "bridge and eyes only: nothing a mask covers)"
    )
    mouth_weight: float = Field(0.2, ge=0.0, le=1.0, description="landmark_fit=weighted: weight of each mouth corner")
    nose_weight: float = Field(1.0, ge=0.0, le=1.0, description="landmark_fit=weighted: weight of the nose tip")
    masked_twin: MaskedTwin = Field(
        "reuse", description="prepare: how a masked copy is cropped. reuse: the mask is painted on the unmasked "
        "crop; detect: the full frame is masked, then aligned from landmarks found on the masked frame (the "
        "unmasked landmarks where that fails); jitter: the unmasked landmarks moved by a random similarity of "
        "the size masks cause (jitter_*), then masked. Evaluation always detects on the image it is given."
    )
    # jitter_* defaults: the crop difference masked vs unmasked frame measured by
    # benchmarks/bench_align_masked.py (200 LFW images, our masks, all5 fit; robust sigma, x/y pooled).
    jitter_shift: float = Field(
        0.10, ge=0.0, le=1.0, description="masked_twin=jitter: std of the crop shift per axis, as a fraction "
        "of the template's eye distance"
    )
    jitter_shift_y_mean: float = Field(
        0.06, ge=-1.0, le=1.0, description="masked_twin=jitter: mean downward shift (fraction of the eye distance)"
    )
    jitter_scale: float = Field(0.14, ge=0.0, le=0.5, description="masked_twin=jitter: std of the relative scale")
    jitter_scale_mean: float = Field(
        0.065, ge=-0.5, le=0.5, description="masked_twin=jitter: mean relative scale - 1 (masked crops zoom in)"
    )
    jitter_rotation_deg: float = Field(4.0, ge=0.0, le=45.0, description="masked_twin=jitter: std of the rotation")
    num_threads: int | None = Field(None, ge=1, description="torch and OpenCV threads; None leaves their setting")
    runtime: RUNTIMES.name_type = Field(
        DEFAULT_RUNTIME, description="what runs MTCNN's three stages: openvino | onnxruntime (ONNX exports of "
        "facenet-pytorch's weights, cached) | torch; landmarks agree to 1e-4 px"
    )
