"""Face alignment: find a face and its 5 landmarks, then warp it onto a standard 5-point template.

MTCNN (facenet-pytorch) is the primary detector; where it finds nothing (common on masked faces) the
configured fallbacks run in order: dlib's HOG detector with the 68-landmark model reduced to 5 points,
then a centre box. Every crop records which method produced it, and bad input becomes a result with a
status and a reason instead of an exception. A centre-box crop is a guess, not a face: it is
`ok_fallback` with the reason, never plain `ok`.

Masks move the lower landmarks (MTCNN's nose and mouth points wander by 10-20% of the eye distance on a
masked face), so the similarity can be fitted on the upper face only or with the mouth down-weighted
(`landmark_fit`), the same choice for training and evaluation crops.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field

from mfr_ray.config.base import StrictModel
from mfr_ray.threads import use_threads

CropName = Literal["112x112", "112x96", "160x160"]

# Reference landmarks (x, y) in the output crop: left eye, right eye, nose tip, left/right mouth corner.
SPHEREFACE_96x112 = np.array(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]],
    dtype=np.float64,
)
ARCFACE_112x112 = SPHEREFACE_96x112 + np.array([8.0, 0.0])


def _facenet_template(size: int = 160, margin: float = 0.2) -> np.ndarray:
    """ArcFace template scaled to `size` with `margin` extra context around it, the looser framing
    FaceNet crops (box + margin) have."""
    scale = size / 112.0 / (1.0 + margin)
    return (ARCFACE_112x112 - 56.0) * scale + size / 2.0


CROP_TEMPLATES: dict[str, tuple[tuple[int, int], np.ndarray]] = {
    "112x112": ((112, 112), ARCFACE_112x112),
    "112x96": ((112, 96), SPHEREFACE_96x112),
    "160x160": ((160, 160), _facenet_template()),
}

ALIGN_METHODS = ("mtcnn", "dlib", "center", "prealigned")
# Statuses of a result that carries a crop: `ok` (a detected or pre-aligned face) and `ok_fallback` (no
# face found, the centre box was guessed). Every other status has no crop.
OK_FALLBACK = "ok_fallback"
USABLE_STATUSES = frozenset({"ok", OK_FALLBACK})
# Landmark order of every 5-point array: image-left eye, image-right eye, nose tip, left/right mouth corner.
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
LandmarkFit = Literal["all5", "upper_face", "weighted"]
MaskedTwin = Literal["reuse", "detect", "jitter"]


class AlignConfig(StrictModel):
    """How faces are found and cropped."""

    crop: CropName = "112x96"
    skip_detection: bool = Field(False, description="input is already an aligned crop: only resize it")
    fallbacks: list[Literal["dlib", "center"]] = Field(default_factory=lambda: ["dlib", "center"])
    min_face_size: int = Field(20, ge=8, description="smallest face side in pixels the detectors accept")
    mtcnn_thresholds: list[float] = Field(default_factory=lambda: [0.6, 0.7, 0.7], min_length=3, max_length=3)
    mtcnn_min_score: float = Field(0.9, ge=0.0, le=1.0, description="faces scored below this are ignored")
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
        "nose_weight)"
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


@dataclass
class AlignResult:
    """`frame` is the (RGB, full-resolution) image the crop was warped from, kept by reference so a masked
    twin can be cut from the same frame; `matrix` is the 2x3 frame -> crop transform."""

    crop: np.ndarray | None
    method: str
    landmarks: list[list[float]] | None = None
    box: list[float] | None = None
    score: float | None = None
    status: str = "ok"
    reason: str = ""
    matrix: np.ndarray | None = field(default=None, repr=False)
    frame: np.ndarray | None = field(default=None, repr=False)

    @property
    def usable(self) -> bool:
        return self.status in USABLE_STATUSES and self.crop is not None


# Where the all5 fit puts MTCNN's 5 points on average, minus the 112x96 template (px; mean over 300 LFW
# images): the targets of the other fits, so that an unmasked face keeps all5's framing on average (the
# framing the CASIA checkpoint was trained on) while a masked one no longer follows its mouth.
ALL5_MEAN_OFFSET_96x112 = np.array([[0.0, 0.73], [-0.08, 0.70], [0.26, 1.23], [-1.13, -1.30], [0.96, -1.36]])


def fit_weights(config: AlignConfig) -> np.ndarray | None:
    """Per-landmark weights of the similarity fit (order of LANDMARK_NAMES); None = all5, equal weights
    onto the template itself."""
    if config.landmark_fit == "upper_face":
        return np.array([1.0, 1.0, 1.0, 0.0, 0.0])
    if config.landmark_fit == "weighted":
        return np.array([1.0, 1.0, config.nose_weight, config.mouth_weight, config.mouth_weight])
    return None


def fit_targets(crop: str) -> np.ndarray:
    """Template points of `crop` moved by ALL5_MEAN_OFFSET_96x112 (scaled to the crop's template)."""
    template = CROP_TEMPLATES[crop][1]
    scale = np.linalg.norm(template[1] - template[0]) / np.linalg.norm(SPHEREFACE_96x112[1] - SPHEREFACE_96x112[0])
    return template + scale * ALL5_MEAN_OFFSET_96x112


def similarity_transform(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares similarity (rotation, uniform scale, translation) mapping src points onto
    dst (Umeyama 1991, each point's squared error times its weight; None = equal weights); returns the
    2x3 matrix cv2.warpAffine takes. Points of weight 0 have no influence at all."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(src),) or (w < 0).any() or np.count_nonzero(w) < 2:
        raise ValueError(f"need one non-negative weight per point and two points weighted, got {w.tolist()}")
    w = w / w.sum()
    src_mean, dst_mean = w @ src, w @ dst
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = (dst_c * w[:, None]).T @ src_c
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rot = u @ np.diag(d) @ vt
    var_src = (w * (src_c**2).sum(1)).sum()
    scale = (s * d).sum() / var_src if var_src > 0 else 1.0
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rot
    matrix[:, 2] = dst_mean - scale * rot @ src_mean
    return matrix


def template_matrix(landmarks: np.ndarray, crop: str, weights: np.ndarray | None = None) -> np.ndarray:
    """Frame -> crop similarity that puts `landmarks` on the template of `crop` (weights None: the all5
    fit), or with `weights` onto fit_targets(crop)."""
    if weights is None:
        return similarity_transform(landmarks, CROP_TEMPLATES[crop][1])
    return similarity_transform(landmarks, fit_targets(crop), weights)


def warp_with(image: np.ndarray, matrix: np.ndarray, crop: str) -> np.ndarray:
    import cv2

    height, width = CROP_TEMPLATES[crop][0]
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def warp_to_template(image: np.ndarray, landmarks: np.ndarray, crop: str, weights: np.ndarray | None = None):
    """Crop `image` so that its 5 `landmarks` land on the template of `crop`."""
    return warp_with(image, template_matrix(landmarks, crop, weights), crop)


def residual_similarity(matrix: np.ndarray, reference: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, float, float]:
    """How crop `matrix` differs from crop `reference` (both frame -> crop), as the crop-space similarity
    `matrix o reference^-1`: the shift it gives the crop point `centre` (px, x and y), its relative scale
    minus 1 and its rotation in degrees. The benchmark's crop difference, in the units of the jitter."""
    residual = (np.vstack([matrix, [0.0, 0.0, 1.0]]) @ np.linalg.inv(np.vstack([reference, [0.0, 0.0, 1.0]])))[:2]
    shift = residual[:, :2] @ centre + residual[:, 2] - centre
    scale = float(np.hypot(residual[0, 0], residual[1, 0]))
    return shift, scale - 1.0, float(np.degrees(np.arctan2(residual[1, 0], residual[0, 0])))


def jitter_matrix(matrix: np.ndarray, config: AlignConfig, crop: str, key: str) -> np.ndarray:
    """`matrix` (frame -> crop) composed with a random crop-space similarity about the template centre
    (the residual_similarity the benchmark measures between masked and unmasked crops): shift, scale and
    rotation drawn from normals with the jitter_* means and spreads, the same for a `key` in any process."""
    template = CROP_TEMPLATES[crop][1]
    eye_distance = float(np.linalg.norm(template[1] - template[0]))
    digest = hashlib.blake2b(f"align-jitter\x00{key}".encode(), digest_size=16).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    shift = rng.normal([0.0, config.jitter_shift_y_mean], config.jitter_shift) * eye_distance
    scale = max(0.5, 1.0 + float(rng.normal(config.jitter_scale_mean, config.jitter_scale)))
    angle = np.radians(rng.normal(0.0, config.jitter_rotation_deg))
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = template.mean(0)
    jitter = np.eye(3)
    jitter[:2, :2] = rot
    jitter[:2, 2] = centre - rot @ centre + shift
    return (jitter @ np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]


def pick_face(boxes: np.ndarray, image_shape: tuple[int, ...]) -> int:
    """Index of the face to keep when there are several: large and near the centre (area minus twice the
    squared offset of its centre from the image centre)."""
    height, width = image_shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    centre = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 - width / 2, (boxes[:, 1] + boxes[:, 3]) / 2 - height / 2], 1)
    return int(np.argmax(area - 2.0 * (centre**2).sum(1)))


def _as_rgb(image) -> tuple[np.ndarray | None, str, str]:
    """Normalise an input array to HxWx3 uint8, or say why it cannot be used."""
    if not isinstance(image, np.ndarray):
        return None, "unsupported", f"expected a numpy array, got {type(image).__name__}"
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        return None, "unsupported", f"expected HxWx3 RGB, got shape {image.shape}"
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.size and image.max() <= 1.0:
            image = image * 255.0
        image = np.clip(image, 0, 255).astype(np.uint8)
    if min(image.shape[:2]) < 8:
        return None, "unsupported", f"image too small ({image.shape[1]}x{image.shape[0]})"
    return np.ascontiguousarray(image), "ok", ""


class FaceAligner:
    """Detect-and-align with models loaded once (build one per Ray actor)."""

    def __init__(self, config: AlignConfig | None = None):
        import torch

        self.config = config or AlignConfig()
        self.output_hw = CROP_TEMPLATES[self.config.crop][0]
        self.weights = fit_weights(self.config)
        if self.config.num_threads:
            use_threads(self.config.num_threads)
        self._mtcnn = None
        self._dlib = None
        if not self.config.skip_detection:
            from facenet_pytorch import MTCNN

            self._mtcnn = MTCNN(
                keep_all=True,
                min_face_size=self.config.min_face_size,
                thresholds=list(self.config.mtcnn_thresholds),
                post_process=False,
                device="cpu",
            )
            # Channels-last halves MTCNN's CPU time (max-pooling, its slowest kernel, is 5x faster in that
            # layout); landmarks agree with the default layout to 0.01 px.
            for net in (self._mtcnn.pnet, self._mtcnn.rnet, self._mtcnn.onet):
                net.to(memory_format=torch.channels_last)
            if "dlib" in self.config.fallbacks:
                from mfr_ray.masking.landmarks import dlib_model  # the mask engine's copy: loaded once

                self._dlib = (dlib_model("hog"), dlib_model("shape_predictor"))

    # -- public API -------------------------------------------------------------------------------------
    def align(self, image: np.ndarray) -> AlignResult:
        return self.align_batch([image])[0]

    def align_batch(self, images: list[np.ndarray]) -> list[AlignResult]:
        """Align many images; MTCNN runs batched over images of the same size (after shrinking those
        larger than detect_max_side)."""
        results: list[AlignResult | None] = [None] * len(images)
        ready: dict[int, np.ndarray] = {}
        small: dict[int, tuple[np.ndarray, float]] = {}
        for i, raw in enumerate(images):
            rgb, status, reason = _as_rgb(raw)
            if rgb is None:
                results[i] = AlignResult(None, "none", status=status, reason=reason)
            elif rgb.shape[0] * rgb.shape[1] > self.config.max_pixels:
                results[i] = AlignResult(
                    None, "none", status="too_large", reason=f"{rgb.shape[1]}x{rgb.shape[0]} exceeds max_pixels"
                )
            elif self.config.skip_detection:
                results[i] = self._prealigned(rgb)
            else:
                ready[i] = rgb
                small[i] = self._shrunk(rgb)
        for indices, detections in self._detect_mtcnn({i: copy for i, (copy, _) in small.items()}):
            for i, detection in zip(indices, detections, strict=True):
                results[i] = self._finish(ready[i], small[i], detection)
        return results  # type: ignore[return-value]

    def _shrunk(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """The copy detection runs on and its scale (copy px per frame px): the frame itself when it fits
        in detect_max_side. Large photos detect as well at 1024 px and MTCNN's time grows with the pixels."""
        import cv2

        longest = max(image.shape[:2])
        if longest <= self.config.detect_max_side:
            return image, 1.0
        scale = self.config.detect_max_side / longest
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale

    # -- steps ------------------------------------------------------------------------------------------
    def _prealigned(self, image: np.ndarray) -> AlignResult:
        """Centre-crop to the output aspect ratio and resize."""
        import cv2

        out_h, out_w = self.output_hw
        h, w = image.shape[:2]
        if h * out_w > w * out_h:
            new_h = round(w * out_h / out_w)
            top = (h - new_h) // 2
            image = image[top : top + new_h]
        else:
            new_w = round(h * out_w / out_h)
            left = (w - new_w) // 2
            image = image[:, left : left + new_w]
        crop = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA)
        return AlignResult(crop, "prealigned")

    def _detect_mtcnn(self, images: dict[int, np.ndarray]):
        """Yield (indices, detections) per batch of same-sized images; a detection is
        (box, score, landmarks) of the chosen face, None, or an error message."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, image in images.items():
            by_shape.setdefault(image.shape, []).append(i)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.config.batch_size):
                chunk = indices[start : start + self.config.batch_size]
                stack = np.stack([images[i] for i in chunk])
                try:
                    boxes, probs, points = self._mtcnn.detect(stack, landmarks=True)
                except Exception as exc:  # noqa: BLE001 - a detector failure must not lose the batch
                    yield chunk, [f"mtcnn failed: {exc!r}"] * len(chunk)
                    continue
                yield chunk, [
                    self._choose(b, p, pt, images[i].shape) for i, b, p, pt in zip(chunk, boxes, probs, points)
                ]

    def _choose(self, boxes, probs, points, shape):
        if boxes is None:
            return None
        probs = np.asarray(probs, dtype=np.float64)
        boxes = np.asarray(boxes, dtype=np.float64)
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        keep = (probs >= self.config.mtcnn_min_score) & (sides >= self.config.min_face_size)
        if not keep.any():
            return None
        idx = np.flatnonzero(keep)
        best = idx[pick_face(boxes[idx], shape)]
        return boxes[best], float(probs[best]), np.asarray(points[best], dtype=np.float64)

    def _finish(self, image: np.ndarray, shrunk: tuple[np.ndarray, float] | None, detection) -> AlignResult:
        """Crop from MTCNN's detection on the (shrunk) copy, else from the fallbacks in order."""
        small, scale = shrunk if shrunk is not None else (image, 1.0)
        notes = []
        if isinstance(detection, str):
            notes.append(detection)
        elif detection is not None:
            box, score, landmarks = detection
            return self._result(image, "mtcnn", landmarks / scale, np.asarray(box) / scale, score)
        else:
            notes.append("mtcnn found no face")
        for fallback in self.config.fallbacks:
            if fallback == "dlib" and self._dlib is not None:
                found = self._detect_dlib(small)
                if found is not None:
                    box, score, landmarks = found
                    return self._result(
                        image, "dlib", landmarks / scale, np.asarray(box) / scale, score, "; ".join(notes)
                    )
                notes.append("dlib found no face")
            elif fallback == "center":
                box, landmarks = self._centre_guess(image.shape)
                notes.append("centre box guessed")
                return self._result(image, "center", landmarks, box, None, "; ".join(notes), OK_FALLBACK)
        return AlignResult(None, "none", status="no_face", reason="; ".join(notes))

    def _result(self, image, method, landmarks, box, score, reason="", status="ok") -> AlignResult:
        matrix = template_matrix(landmarks, self.config.crop, self.weights)
        return AlignResult(
            warp_with(image, matrix, self.config.crop),
            method,
            landmarks=np.asarray(landmarks).round(2).tolist(),
            box=None if box is None else np.asarray(box, dtype=np.float64).round(2).tolist(),
            score=score,
            status=status,
            reason=reason,
            matrix=matrix,
            frame=image,
        )

    def _detect_dlib(self, image: np.ndarray):
        """HOG face + 68 landmarks reduced to the 5 template points (eye centres, nose tip, mouth corners)."""
        detector, predictor = self._dlib
        rects, scores, _ = detector.run(image, self.config.dlib_upsample, 0.0)
        rects = [(r, s) for r, s in zip(rects, scores) if min(r.width(), r.height()) >= self.config.min_face_size]
        if not rects:
            return None
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r, _ in rects], dtype=np.float64)
        rect, score = rects[pick_face(boxes, image.shape)]
        shape = predictor(image, rect)
        pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        # 68-point indices: 36-41 image-left eye, 42-47 image-right eye, 30 nose tip, 48/54 mouth corners.
        landmarks = np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]])
        box = [rect.left(), rect.top(), rect.right(), rect.bottom()]
        return box, float(score), landmarks

    def _centre_guess(self, shape) -> tuple[list[float], np.ndarray]:
        """A face box in the image centre and the ArcFace template's landmarks placed inside it."""
        height, width = shape[:2]
        side = self.config.center_box_fraction * min(height, width)
        left, top = (width - side) / 2, (height - side) / 2
        landmarks = ARCFACE_112x112 / 112.0 * side + np.array([left, top])
        return [left, top, left + side, top + side], landmarks
