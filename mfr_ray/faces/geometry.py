"""Crop geometry: the 5-point templates of each crop layout, the (weighted) similarity fits that put a
face's landmarks on them, and the crop jitter prepare uses for masked twins. Pure numpy (OpenCV only to
warp), shared by the aligner, training augmentation and the benchmarks."""

from __future__ import annotations

import hashlib

import numpy as np

from mfr_ray.faces.config import AlignConfig

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

# Landmark order of every 5-point array: image-left eye, image-right eye, nose tip, left/right mouth corner.
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


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
