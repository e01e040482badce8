"""Face alignment: find a face and its 5 landmarks, then warp it onto a standard 5-point template.

MTCNN (`mfr_ray.faces.mtcnn`) is the primary detector; where it finds nothing (common on masked faces) the
configured fallbacks run in order: dlib's HOG detector with the 68-landmark model reduced to 5 points,
then a centre box. Every crop records which method produced it, and bad input becomes a result with a
status and a reason instead of an exception. A centre-box crop is a guess, not a face: it is
`ok_fallback` with the reason, never plain `ok`.

Masks move the lower landmarks (MTCNN's nose and mouth points wander by 10-20% of the eye distance on a
masked face), so the similarity can be fitted on the upper face only or with the mouth down-weighted
(`landmark_fit`, `mfr_ray.faces.geometry`), the same choice for training and evaluation crops;
`dlib_upper_face` fits it on dlib's 68-point brows, nose bridge and eyes instead, which a mask leaves in
place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mfr_ray.faces.config import AlignConfig
from mfr_ray.faces.geometry import (
    CROP_TEMPLATES,
    UPPER_FACE_68,
    UPPER_FACE_MAX_EYE_MISS,
    ARCFACE_112x112,
    eye_box,
    fit_weights,
    pick_face,
    similarity_transform,
    template_matrix,
    upper_face_targets,
    warp_with,
)
from mfr_ray.faces.mtcnn import mtcnn_detect
from mfr_ray.imageio import OK_FALLBACK, USABLE_STATUSES, Status, to_rgb_uint8
from mfr_ray.threads import use_threads

# The rescue pass (`AlignConfig.rescue`): black border added on each side, as a share of the frame's longer
# side, and MTCNN's stage thresholds on the padded frame (the first pass: 0.6, 0.7, 0.7). Chosen on 800
# held-out-N95 LFW photos (seed 24): of the 64 the chain missed, padding found 29 at the default thresholds,
# 43 with these; the non-face set's best score stayed 0.72 against the 0.9 acceptance.
RESCUE_PAD = 0.25
RESCUE_THRESHOLDS = (0.3, 0.4, 0.4)
RESCUE_METHOD = "mtcnn_rescue"
RESCUE_MISS = "rescue pass (padded, mirrored) found no face"


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


def _as_rgb(image) -> tuple[np.ndarray | None, str, str]:
    """The aligner's input: `to_rgb_uint8`'s RGB (its notes are not the crop's business), at least 8 px
    on its shorter side, or why it cannot be used."""

    rgb, status, reason = to_rgb_uint8(image)
    if rgb is None:
        return None, status, reason
    if min(rgb.shape[:2]) < 8:
        return None, Status.UNSUPPORTED, f"image too small ({rgb.shape[1]}x{rgb.shape[0]})"
    return rgb, Status.OK, ""


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
        """Crop from MTCNN's detection on the (shrunk) copy, else from the second chances in order (dlib, the
        rescue pass), else the centre guess where configured: a real detection always beats a guess."""
        small, scale = shrunk if shrunk is not None else (image, 1.0)
        notes = []
        if isinstance(detection, str):
            notes.append(detection)
        elif detection is not None:
            box, score, landmarks = detection
            return self._result(image, "mtcnn", landmarks / scale, np.asarray(box) / scale, score)
        else:
            notes.append("mtcnn found no face")
        for method, detect, miss in self._second_chances():
            found = detect(small)
            if found is not None:
                box, score, landmarks = found
                reason = "; ".join(notes)
                return self._result(image, method, landmarks / scale, np.asarray(box) / scale, score, reason)
            notes.append(miss)
        if "center" in self.config.fallbacks:
            box, landmarks = self._centre_guess(image.shape)
            notes.append("centre box guessed")
            return self._result(image, "center", landmarks, box, None, "; ".join(notes), OK_FALLBACK)
        return AlignResult(None, "none", status="no_face", reason="; ".join(notes))

    def _second_chances(self) -> list[tuple[str, Callable, str]]:
        """(method, detector, note when it finds nothing) to try where MTCNN found no face, in order."""
        chances = [("dlib", self._detect_dlib, "dlib found no face")] if self._dlib is not None else []
        if self.config.rescue:
            chances.append((RESCUE_METHOD, self._rescue, RESCUE_MISS))
        return chances

    def _rescue(self, image: np.ndarray):
        """MTCNN again, accepting only faces scored mtcnn_min_score as the first pass does: on the frame padded
        with black by RESCUE_PAD of its longer side with looser stage thresholds (RESCUE_THRESHOLDS: more
        candidates reach the last stage, which still scores them), then on the mirror image. Masked faces
        the first pass misses are found this way, non-faces are not (benchmarks/bench_detect_masked.py)."""
        import cv2

        pad = round(RESCUE_PAD * max(image.shape[:2]))
        padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        found = self._detect_once(padded, RESCUE_THRESHOLDS)
        if found is not None:
            box, score, landmarks = found
            return np.asarray(box) - pad, score, landmarks - pad
        found = self._detect_once(np.ascontiguousarray(image[:, ::-1]), None)
        if found is None:
            return None
        box, score, landmarks = found
        right = image.shape[1] - 1  # column x of the mirror image is column right - x of the frame
        box = np.array([right - box[2], box[1], right - box[0], box[3]])
        landmarks = np.column_stack([right - landmarks[:, 0], landmarks[:, 1]])[[1, 0, 2, 4, 3]]  # sides swap
        return box, score, landmarks

    def _detect_once(self, image: np.ndarray, thresholds: tuple[float, float, float] | None):
        boxes, probs, points = mtcnn_detect(self._mtcnn, image[None], thresholds)
        return self._choose(boxes[0], probs[0], points[0], image.shape)

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
