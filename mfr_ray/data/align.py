"""Face alignment: find a face and its 5 landmarks, then warp it onto a standard 5-point template.

MTCNN (facenet-pytorch) is the primary detector; where it finds nothing (common on masked faces) the
configured fallbacks run in order: dlib's HOG detector with the 68-landmark model reduced to 5 points,
then a centre box. Every crop records which method produced it, and bad input becomes a result with a
status and a reason instead of an exception. A centre-box crop is a guess, not a face: it is
`ok_fallback` with the reason, never plain `ok`.

Masks move the lower landmarks (MTCNN's nose and mouth points wander by 10-20% of the eye distance on a
masked face), so the similarity can be fitted on the upper face only or with the mouth down-weighted
(`landmark_fit`), the same choice for training and evaluation crops; `dlib_upper_face` fits it on dlib's
68-point brows, nose bridge and eyes instead, which a mask leaves in place.

MTCNN runs facenet-pytorch's networks and stages (`mtcnn_detect`; the networks on `align.runtime`,
`mfr_ray.runtime.mtcnn`), with every candidate box of a batch resampled at once by exact area pooling
instead of one interpolate call per box.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mfr_ray.data.config import AlignConfig
from mfr_ray.imageio import OK_FALLBACK, USABLE_STATUSES, Status, to_rgb_uint8
from mfr_ray.threads import use_threads

if TYPE_CHECKING:
    import torch

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
# Landmark order of every 5-point array: image-left eye, image-right eye, nose tip, left/right mouth corner.
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


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


# dlib_upper_face: the 68-point indices it fits on (brows 17-26, nose bridge 27-30, eyes 36-47) and where
# the all5 fit puts them on average in the 112x96 crop (299 unmasked LFW images, `lfw_files(300, 11)`),
# so an unmasked face keeps all5's framing on average.
UPPER_FACE_68 = np.r_[17:31, 36:48]
UPPER_FACE_96x112 = np.array(
    [[14.69, 46.30], [19.44, 41.53], [26.28, 39.78], [33.51, 40.49], [40.27, 43.06], [53.36, 42.94],
     [60.08, 40.32], [67.23, 39.47], [74.05, 41.14], [78.80, 45.83], [46.96, 50.97], [47.07, 57.63],
     [47.20, 64.32], [47.31, 71.20], [22.98, 52.96], [27.16, 50.51], [32.10, 50.44], [36.43, 53.38],
     [31.88, 54.27], [27.03, 54.32], [57.39, 53.22], [61.72, 50.31], [66.62, 50.22], [70.78, 52.66],
     [66.81, 54.10], [62.02, 54.12]]
)
# The box the 68-point predictor is fitted in, from the eye centres alone (a mask moves the mouth): centre
# EYE_BOX_DROP eye distances below the eye midpoint, half side EYE_BOX_HALF eye distances; on unmasked LFW
# faces (277 LFW images with one HOG face) the mean of `masking.landmarks.landmark_box`, dlib's own framing.
EYE_BOX_DROP, EYE_BOX_HALF = 0.55, 1.28
# dlib's eyes this far (eye distances) from the detector's: a fit on something else, rejected. Loose, since
# on a masked face MTCNN's eyes are the ones that move (LFW, Bush_0001 masked: MTCNN's 12-20%, dlib's < 1%).
UPPER_FACE_MAX_EYE_MISS = 0.5


def eye_box(left_eye: np.ndarray, right_eye: np.ndarray) -> tuple[float, float, float, float]:
    """The dlib-style face box (left, top, right, bottom) implied by the two eye centres."""
    across = right_eye - left_eye
    distance = float(np.linalg.norm(across))
    down = np.array([-across[1], across[0]]) / max(distance, 1e-6)
    cx, cy = (left_eye + right_eye) / 2 + EYE_BOX_DROP * distance * down
    half = EYE_BOX_HALF * distance
    return float(cx - half), float(cy - half), float(cx + half), float(cy + half)


def upper_face_targets(crop: str) -> np.ndarray:
    """UPPER_FACE_96x112 in the template of `crop` (the templates are similar to each other)."""
    to_crop = similarity_transform(SPHEREFACE_96x112, CROP_TEMPLATES[crop][1])
    return UPPER_FACE_96x112 @ to_crop[:, :2].T + to_crop[:, 2]


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
    """The aligner's input: `to_rgb_uint8`'s RGB (its notes are not the crop's business), at least 8 px
    on its shorter side, or why it cannot be used."""

    rgb, status, reason = to_rgb_uint8(image)
    if rgb is None:
        return None, status, reason
    if min(rgb.shape[:2]) < 8:
        return None, Status.UNSUPPORTED, f"image too small ({rgb.shape[1]}x{rgb.shape[0]})"
    return rgb, Status.OK, ""


def area_crops(integral: np.ndarray, image_inds: np.ndarray, y, ey, x, ex, size: tuple[int, int]) -> torch.Tensor:
    """Every box `[y-1:ey, x-1:ex]` of its image resampled to `size` (height, width) exactly as
    `interpolate(mode="area")` (= adaptive average pooling: output row i averages input rows
    floor(i*n/size) .. ceil((i+1)*n/size) - 1), for all boxes at once from the images' integral images
    (B, H+1, W+1, C, integers), instead of one interpolate call per box (a third of MTCNN's time)."""
    import torch

    def edges(start: np.ndarray, stop: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        n = (stop - start)[:, None]
        i = np.arange(size)[None, :]
        return start[:, None] + (i * n) // size, start[:, None] - ((-(i + 1) * n) // size)

    r0, r1 = edges(np.asarray(y, np.int64) - 1, np.asarray(ey, np.int64), size[0])
    c0, c1 = edges(np.asarray(x, np.int64) - 1, np.asarray(ex, np.int64), size[1])
    height, width, channels = integral.shape[1:]
    base = (np.asarray(image_inds, dtype=np.int64) * height)[:, None, None]
    flat = integral.reshape(-1, channels)

    def at(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:  # (K, size, size, C)
        index = (base + rows[:, :, None]) * width + cols[:, None, :]
        return flat.take(index.ravel(), axis=0).reshape(*index.shape, channels)

    sums = at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)
    counts = (r1 - r0)[:, :, None, None] * (c1 - c0)[:, None, :, None]
    return torch.from_numpy((sums / counts).astype(np.float32).transpose(0, 3, 1, 2).copy())


def mtcnn_detect(mtcnn, images: np.ndarray):
    """`MTCNN.detect(images, landmarks=True)` for a (B, H, W, 3) uint8 stack (keep_all, no sorting),
    with the boxes of the second and third stage resampled together (`area_crops`); same stages,
    thresholds and NMS as facenet-pytorch's `detect_face`, landmarks equal to 0.01 px."""
    import cv2
    import torch
    from facenet_pytorch.models.utils.detect_face import (
        batched_nms,
        batched_nms_numpy,
        bbreg,
        generateBoundingBox,
        pad,
        rerec,
    )

    threshold = mtcnn.thresholds
    with torch.no_grad():
        batch, h, w = images.shape[:3]
        every, ones, full_h, full_w = np.arange(batch), np.ones(batch), np.full(batch, h), np.full(batch, w)
        depth = cv2.CV_32S if 255 * h * w < 2**31 else cv2.CV_64F  # exact integer sums
        integral = np.stack([cv2.integral(image, sdepth=depth) for image in images])
        scale, minl, scales = 12.0 / mtcnn.min_face_size, min(h, w) * 12.0 / mtcnn.min_face_size, []
        while minl >= 12:
            scales.append(scale)
            scale, minl = scale * mtcnn.factor, minl * mtcnn.factor
        boxes, image_inds, picks, offset = [], [], [], 0
        for scale in scales:  # stage 1: P-Net over the pyramid
            level = (int(h * scale + 1), int(w * scale + 1))
            im_data = (area_crops(integral, every, ones, full_h, ones, full_w, level) - 127.5) * 0.0078125
            reg, probs = mtcnn.pnet(im_data)
            boxes_scale, inds_scale = generateBoundingBox(reg, probs[:, 1], scale, threshold[0])
            boxes.append(boxes_scale)
            image_inds.append(inds_scale)
            picks.append(batched_nms(boxes_scale[:, :4], boxes_scale[:, 4], inds_scale, 0.5) + offset)
            offset += boxes_scale.shape[0]
        pick = torch.cat(picks)
        boxes, image_inds = torch.cat(boxes)[pick], torch.cat(image_inds)[pick]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes, image_inds = boxes[pick], image_inds[pick]
        regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack(
            [boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
             boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh, boxes[:, 4]]
        ).permute(1, 0)
        boxes = rerec(boxes)

        def stage_input(boxes, image_inds, size):
            """The boxes' crops (boxes with an empty crop dropped, where facenet-pytorch would fail)."""
            y, ey, x, ex = pad(boxes, w, h)
            keep = (ey > y - 1) & (ex > x - 1)
            if not keep.all():
                keep_t = torch.from_numpy(keep)
                boxes, image_inds = boxes[keep_t], image_inds[keep_t]
                y, ey, x, ex = y[keep], ey[keep], x[keep], ex[keep]
            crops = area_crops(integral, image_inds.numpy(), y, ey, x, ex, (size, size))
            return boxes, image_inds, (crops - 127.5) * 0.0078125

        if len(boxes) > 0:  # stage 2: R-Net
            boxes, image_inds, im_data = stage_input(boxes, image_inds, 24)
            out0, out1 = (o.permute(1, 0) for o in mtcnn.rnet(im_data))
            score = out1[1, :]
            ipass = score > threshold[1]
            boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
            image_inds, mv = image_inds[ipass], out0[:, ipass].permute(1, 0)
            pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
            boxes = rerec(bbreg(boxes[pick], mv[pick]))
            image_inds = image_inds[pick]
        points = torch.zeros(0, 5, 2)
        if len(boxes) > 0:  # stage 3: O-Net, landmarks
            boxes, image_inds, im_data = stage_input(boxes, image_inds, 48)
            out0, out1, out2 = (o.permute(1, 0) for o in mtcnn.onet(im_data))
            score = out2[1, :]
            ipass = score > threshold[2]
            points = out1[:, ipass]
            boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
            image_inds, mv = image_inds[ipass], out0[:, ipass].permute(1, 0)
            w_i, h_i = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
            points_x = w_i.repeat(5, 1) * points[:5, :] + boxes[:, 0].repeat(5, 1) - 1
            points_y = h_i.repeat(5, 1) * points[5:10, :] + boxes[:, 1].repeat(5, 1) - 1
            points = torch.stack((points_x, points_y)).permute(2, 1, 0)
            boxes = bbreg(boxes, mv)
            pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image_inds, 0.7, "Min")
            boxes, image_inds, points = boxes[pick], image_inds[pick], points[pick]
    boxes, points, image_inds = boxes.numpy(), points.numpy(), image_inds.numpy()
    found = [np.flatnonzero(image_inds == i) for i in range(batch)]
    return (
        [boxes[f, :4] if len(f) else None for f in found],
        [boxes[f, 4] if len(f) else [None] for f in found],
        [points[f] if len(f) else None for f in found],
    )


def _dlib_rect(left: int, top: int, right: int, bottom: int):
    import dlib

    return dlib.rectangle(left, top, right, bottom)


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
        self._predictor = None
        if not self.config.skip_detection:
            from facenet_pytorch import MTCNN

            self._mtcnn = MTCNN(
                keep_all=True,
                min_face_size=self.config.min_face_size,
                thresholds=list(self.config.mtcnn_thresholds),
                post_process=False,
                device="cpu",
            )
            # Channels-last halves MTCNN's CPU time in torch (max-pooling, its slowest kernel, is 5x faster
            # in that layout); landmarks agree with the default layout to 0.01 px.
            for net in (self._mtcnn.pnet, self._mtcnn.rnet, self._mtcnn.onet):
                net.to(memory_format=torch.channels_last)
            from mfr_ray.runtime.mtcnn import run_stages_on

            run_stages_on(self._mtcnn, self.config.runtime, self.config.num_threads)
            from mfr_ray.masking.landmarks import dlib_model  # the mask engine's copy: loaded once

            if "dlib" in self.config.fallbacks:
                self._dlib = (dlib_model("hog"), dlib_model("shape_predictor"))
            if self.config.landmark_fit == "dlib_upper_face":
                self._predictor = dlib_model("shape_predictor")

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
                    boxes, probs, points = mtcnn_detect(self._mtcnn, stack)
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
        upper = self._upper_face(image, landmarks) if self._predictor is not None and method != "center" else None
        if upper is None:
            matrix = template_matrix(landmarks, self.config.crop, self.weights)
            if self._predictor is not None and method != "center":
                reason = "; ".join(filter(None, [reason, "dlib upper-face fit rejected; fitted on the 5 points"]))
        else:
            matrix = similarity_transform(upper, upper_face_targets(self.config.crop))
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

    def upper_face_landmarks(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray | None:
        """dlib's 68 points of the face whose 5 `landmarks` the detector found, fitted in the box its eyes
        imply and refitted on dlib's own eyes until the box settles; None where dlib's eyes land far from
        the detector's (a failed fit)."""
        import cv2

        from mfr_ray.masking.landmarks import REFITS, box_overlap, eye_line

        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        five = np.asarray(landmarks, dtype=np.float64)
        box = eye_box(five[0], five[1])
        for attempt in range(REFITS + 1):
            left, top, right, bottom = (round(v) for v in box)
            shape = self._predictor(grey, _dlib_rect(left, top, right - 1, bottom - 1))
            points = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
            implied = eye_box(*eye_line(points))
            if attempt == REFITS or box_overlap(implied, box) > 0.75:
                break
            box = implied
        eye_distance = float(np.linalg.norm(five[1] - five[0]))
        miss = max(np.linalg.norm(np.stack(eye_line(points)) - five[:2], axis=1))
        return points if miss <= UPPER_FACE_MAX_EYE_MISS * eye_distance else None

    def _upper_face(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray | None:
        points = self.upper_face_landmarks(image, landmarks)
        return None if points is None else points[UPPER_FACE_68]

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
