"""Face detection, 68-point landmarks (dlib), and the geometry the masks are placed by.

Landmark indices are dlib's 0-based iBUG-68 numbering: jaw 0-16 (0 on the image left), nose bridge
27-30, eyes 36-41 / 42-47, outer lips 48-59 (57 = bottom of the lower lip), chin 8.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

from mfr_ray.paths import face_model_file

Box = tuple[float, float, float, float]  # left, top, right, bottom (pixels)

LEFT_JAW = np.arange(0, 9)
RIGHT_JAW = np.arange(8, 17)
EYE_CLEARANCE = 0.12
BRIDGE_DROP = 0.4  # the mask's top point sits this far from landmark 28 towards 29: just under the eyes


@cache
def dlib_model(name: str):
    """dlib models, loaded once per process and shared (the 68-point predictor alone is ~100 MB)."""
    import dlib

    if name == "shape_predictor":
        return dlib.shape_predictor(str(face_model_file("shape_predictor_68_face_landmarks.dat")))
    if name == "hog":
        return dlib.get_frontal_face_detector()
    if name == "cnn":
        return dlib.cnn_face_detection_model_v1(str(face_model_file("mmod_human_face_detector.dat")))
    raise ValueError(f"unknown dlib model {name!r}")


class FaceLandmarker:
    """dlib HOG (or MMOD CNN) detector + 68-point shape predictor, loaded once per process/actor.

    Detection runs on a shrunken grey copy for big images and retries with more upsampling only when the
    first pass finds nothing, which keeps the common case fast without losing small faces.
    """

    def __init__(
        self,
        detector: str | None = "hog",
        upsample: int = 0,
        retry_upsample: int = 1,
        detect_max_side: int = 1024,
    ):
        import dlib

        self._dlib = dlib
        self.predictor = dlib_model("shape_predictor")
        self.kind = detector
        self.upsample = upsample
        self.retry_upsample = retry_upsample
        self.detect_max_side = detect_max_side
        self._hog = dlib_model("hog") if detector == "hog" else None
        self._cnn = dlib_model("cnn") if detector == "cnn" else None

    def _run(self, image: np.ndarray, upsample: int) -> list:
        if self._cnn is not None:
            return [d.rect for d in self._cnn(image, upsample)]
        return list(self._hog(image, upsample))

    def detect(self, rgb: np.ndarray, grey: np.ndarray) -> list[Box]:
        """Face boxes in full-image pixels, largest first."""
        import cv2

        if self._hog is None and self._cnn is None:
            raise RuntimeError("this landmarker was built without a detector")
        source = rgb if self._cnn is not None else grey
        h, w = grey.shape
        scale = min(1.0, self.detect_max_side / max(h, w))
        if scale < 1.0:
            source = cv2.resize(
                source, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
            )
        found = self._run(source, self.upsample)
        if not found and self.retry_upsample > self.upsample:
            found = self._run(source, self.retry_upsample)
        boxes = [
            (r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale)
            for r in found
        ]
        return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))

    def fit(self, grey: np.ndarray, box: Box) -> np.ndarray:
        """68x2 float32 landmarks inside `box` (the box dlib's detector would draw)."""
        left, top, right, bottom = (round(v) for v in box)
        shape = self.predictor(grey, self._dlib.rectangle(left, top, right - 1, bottom - 1))
        return np.array([(p.x, p.y) for p in shape.parts()], np.float32)


def eye_line(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the image-left and image-right eyes."""
    return landmarks[36:42].mean(axis=0), landmarks[42:48].mean(axis=0)


def face_tilt(landmarks: np.ndarray) -> float:
    """Degrees between the nose line (27 -> 30) and the perpendicular of the eye line; positive when the
    nose tip points to the image left (face turned towards the image left)."""
    left_eye, right_eye = eye_line(landmarks)
    ex, ey = right_eye - left_eye
    down = np.array([-ey, ex])
    nose = landmarks[30] - landmarks[27]
    cross = down[0] * nose[1] - down[1] * nose[0]
    return math.degrees(math.atan2(cross, float(down @ nose)))


def view_for_tilt(tilt_deg: float, threshold_deg: float) -> str:
    """Template view for a tilt: "left" beyond +threshold, "right" beyond -threshold, else "front"."""
    if tilt_deg > threshold_deg:
        return "left"
    if tilt_deg < -threshold_deg:
        return "right"
    return "front"


def _jaw_crossing(
    landmarks: np.ndarray, through: np.ndarray, direction: np.ndarray, jaw: np.ndarray
) -> np.ndarray:
    """Where the line through `through` along `direction` meets the jaw polyline (nearest jaw point if it
    does not)."""
    points = landmarks[jaw]
    rel = points - through
    side = direction[0] * rel[:, 1] - direction[1] * rel[:, 0]
    for i in range(len(points) - 1):
        if side[i] == 0 or side[i] * side[i + 1] < 0:
            t = side[i] / (side[i] - side[i + 1]) if side[i] != side[i + 1] else 0.0
            return points[i] + t * (points[i + 1] - points[i])
    return points[int(np.argmin(np.abs(side)))]


def six_keypoints(landmarks: np.ndarray) -> np.ndarray:
    """The mask's six key points (6x2 float32): nose bridge, image-left/right jaw level with the nose,
    image-left/right jaw level with the bottom of the lower lip, chin. "Level" means along the eye line.

    The bridge and the nose line are kept at least EYE_CLEARANCE of the eye-to-lip height below the lowest
    eyelid point (but above mid-nose), so faces pitched down (short noses in the image) keep their eyes free."""
    left_eye, right_eye = eye_line(landmarks)
    direction = (right_eye - left_eye) / max(float(np.linalg.norm(right_eye - left_eye)), 1e-6)
    down = np.array([-direction[1], direction[0]], np.float32)
    eye_low = float((landmarks[36:48] @ down).max())
    top = eye_low + EYE_CLEARANCE * float(landmarks[57] @ down - (left_eye + right_eye) @ down / 2)
    top = min(top, float((landmarks[29] + landmarks[30]) @ down) / 2)  # never below mid-nose
    bridge = landmarks[28] + BRIDGE_DROP * (landmarks[29] - landmarks[28])
    nose = landmarks[30] - landmarks[28]
    if float(bridge @ down) < top and float(nose @ down) > 1e-6:
        bridge = bridge + nose * ((top - float(bridge @ down)) / float(nose @ down))
    nose_level = landmarks[29] + down * max(0.0, top - float(landmarks[29] @ down))
    return np.array(
        [
            bridge,
            _jaw_crossing(landmarks, nose_level, direction, LEFT_JAW),
            _jaw_crossing(landmarks, nose_level, direction, RIGHT_JAW),
            _jaw_crossing(landmarks, landmarks[57], direction, LEFT_JAW),
            _jaw_crossing(landmarks, landmarks[57], direction, RIGHT_JAW),
            landmarks[8],
        ],
        np.float32,
    )


def implausible_landmarks(landmarks: np.ndarray, box: Box) -> str | None:
    """Why a landmark fit cannot be a face (None when it looks like one): catches fits on non-faces in
    the aligned fast path, where no detector vouches for the box."""
    left, top, right, bottom = box
    size = max(right - left, bottom - top)
    left_eye, right_eye = eye_line(landmarks)
    eye_dist = float(np.linalg.norm(right_eye - left_eye))
    if not 0.2 * size <= eye_dist <= 0.7 * size:
        return f"eye distance {eye_dist:.1f}px does not fit a {size:.0f}px face box"
    axis = np.array([-(right_eye - left_eye)[1], (right_eye - left_eye)[0]]) / eye_dist
    heights = [float(axis @ landmarks[i]) for i in (27, 30, 57, 8)]
    if float(axis @ (left_eye + right_eye) / 2) >= heights[1] or not heights[1] < heights[2] < heights[3]:
        return "eyes, nose, mouth and chin are not in order"
    return None


BOX_PER_FACE = 1.22  # dlib HOG box side / (eye-to-mouth + eye-to-eye distance), mean of 396 LFW faces
REFITS = 2  # landmark fits on a box drawn from the previous fit, at most, after the layout's prior box


def landmark_box(landmarks: np.ndarray) -> Box:
    """The box dlib's detector would draw around a face with these landmarks: centred between the eyes and
    the mouth, its side proportional to the eye-mouth plus eye-eye distance. Refitting on it makes an
    aligned crop's fit independent of how much margin its layout leaves around the face."""
    left_eye, right_eye = eye_line(landmarks)
    eyes, mouth = (left_eye + right_eye) / 2, (landmarks[48] + landmarks[54]) / 2
    half = BOX_PER_FACE * float(np.linalg.norm(mouth - eyes) + np.linalg.norm(right_eye - left_eye)) / 2
    cx, cy = (eyes + mouth) / 2
    return float(cx - half), float(cy - half), float(cx + half), float(cy + half)


def box_overlap(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def shifted_keypoints(
    keypoints: np.ndarray, landmarks: np.ndarray, nose_shift: float, chin_lift: float
) -> np.ndarray:
    """Key points of a mask worn higher/lower on the nose (`nose_shift`, share of the nose length, > 0 is
    lower) and with its chin edge lifted (`chin_lift`, share of the lip-to-chin distance). The top is kept
    below the eyelids and above the nose tip whatever the shift."""
    points = keypoints.copy()
    left_eye, right_eye = eye_line(landmarks)
    direction = (right_eye - left_eye) / max(float(np.linalg.norm(right_eye - left_eye)), 1e-6)
    down = np.array([-direction[1], direction[0]], np.float32)
    eye_low = float((landmarks[36:48] @ down).max())
    lip = float(landmarks[57] @ down)
    top_min = eye_low + 0.07 * (lip - eye_low)  # the highest the top may go: just under the eyelids
    nose_length = float((landmarks[30] - landmarks[27]) @ down)
    top_max = float(landmarks[30] @ down) - max(0.25 * nose_length, 0.15 * (lip - eye_low))  # above the tip
    nose = landmarks[30] - landmarks[27]
    step = float(nose @ down)
    if step > 1e-6:
        now = float(points[0] @ down)
        target = now + nose_shift * step
        # moving up stops under the eyelids, moving down stops above the tip (never past where it was)
        target = max(target, min(top_min, now)) if nose_shift < 0 else min(target, max(top_max, now))
        move = nose * ((target - now) / step)
        points[0] += move
        points[1:3] += 0.6 * move
    lift = chin_lift * (landmarks[57] - landmarks[8])
    points[5] += lift
    points[3:5] += 0.5 * lift
    points[0:3] += 0.12 * lift  # the least-squares homography would otherwise pull the top down the nose
    return points


def aligned_face_box(face_box: tuple[float, float, float, float], width: int, height: int) -> Box:
    """A layout's fractional box in pixels of a width x height crop."""
    fl, ft, fr, fb = face_box
    return fl * width, ft * height, fr * width, fb * height


def crop_and_resize(image: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Cut `box` (left, top, right, bottom) out of `image` and resize it to `size` (width, height): a fixed
    stand-in for face alignment on already-centred photos such as LFW deep-funneled."""
    import cv2

    left, top, right, bottom = box
    return cv2.resize(image[top:bottom, left:right], size, interpolation=cv2.INTER_AREA)
