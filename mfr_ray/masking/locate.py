"""Where the faces of an image are for masking: the detector's boxes, or the aligned layout's face box on
an aligned crop, and 68 landmarks fitted in each (refitted and checked for plausibility on aligned crops)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mfr_ray.masking.config import MaskingConfig
from mfr_ray.masking.landmarks import (
    REFITS,
    Box,
    FaceLandmarker,
    aligned_face_box,
    box_overlap,
    implausible_landmarks,
    landmark_box,
)


@dataclass(frozen=True)
class LocatedFaces:
    """Where the faces of one image are: every box found, the (box, 68 landmarks) pairs that fitted, the
    detector used and notes for the record's reason."""

    boxes: list[Box]
    fitted: list[tuple[Box, np.ndarray]]
    detector: str
    notes: list[str]


class FaceLocator:
    """Finds faces and their landmarks; construct once (loads the dlib models)."""

    def __init__(self, config: MaskingConfig):
        self.detector = config.detector
        self.landmarker = FaceLandmarker(
            config.detector, config.upsample, config.retry_upsample, config.detect_max_side
        )
        self._layouts = {(layout.width, layout.height): layout for layout in config.aligned_layouts}

    def locate(self, rgb: np.ndarray, aligned: bool, note: str) -> LocatedFaces:
        """Face boxes and their fitted landmarks (implausible fits on aligned crops are dropped, with a
        note)."""
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        boxes, detector, box_note = self._face_boxes(rgb, grey, aligned)
        notes = [n for n in (note, box_note) if n]
        fitted = []
        for prior in boxes:
            box, landmarks = prior, self.landmarker.fit(grey, prior)
            if detector == "aligned":
                box, landmarks = self._refit(grey, box, landmarks)
            problem = implausible_landmarks(landmarks, box) if detector == "aligned" else None
            if problem:
                notes.append(f"landmark fit rejected: {problem}")
            else:
                fitted.append((box, landmarks))
        return LocatedFaces(boxes, fitted, detector, notes)

    def _face_boxes(self, rgb: np.ndarray, grey: np.ndarray, aligned: bool) -> tuple[list[Box], str, str]:
        h, w = grey.shape
        if aligned:
            layout = self._layouts.get((w, h))
            if layout is not None:
                return [aligned_face_box(layout.face_box, w, h)], "aligned", ""
            note = f"no aligned layout for {w}x{h}, used the detector"
        else:
            note = ""
        return self.landmarker.detect(rgb, grey), self.detector, note

    def _refit(self, grey: np.ndarray, box: Box, landmarks: np.ndarray) -> tuple[Box, np.ndarray]:
        """Refit an aligned crop's landmarks on the box its own fit implies until the box settles: the
        layout's prior box only has to be roughly right (FaceNet crops with or without margin, other
        cropping tools)."""
        for _ in range(REFITS):
            implied = landmark_box(landmarks)
            if not np.isfinite(implied).all() or box_overlap(implied, box) > 0.75:
                break
            box, landmarks = implied, self.landmarker.fit(grey, implied)
        return box, landmarks
