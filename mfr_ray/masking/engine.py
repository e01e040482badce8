"""The masking engine: faces -> landmarks -> six key points + tilt -> template view -> homography warp ->
alpha blend with brightness/saturation matched to the face. One engine per process (or Ray actor)."""

from __future__ import annotations

import colorsys
import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, field
from functools import cache

import cv2
import numpy as np

from mfr_ray.imageio import DecodedImage, Status, decode_image, join_reasons, to_rgb_uint8
from mfr_ray.masking.config import HEX_COLOR, RANDOM, VIEWS, MaskingConfig, style_name
from mfr_ray.masking.landmarks import (
    REFITS,
    Box,
    FaceLandmarker,
    aligned_face_box,
    box_overlap,
    face_tilt,
    implausible_landmarks,
    landmark_box,
    shifted_keypoints,
    six_keypoints,
    view_for_tilt,
)
from mfr_ray.masking.patterns import (
    CLOTH_SOLIDS,
    PATTERN_FAMILIES,
    hex_to_rgb,
    load_pattern_file,
    pattern_family,
    pattern_tile,
)
from mfr_ray.masking.templates import (
    MaskTemplate,
    MaskTypeSpec,
    build_template,
    mirror_template,
    template_from_rgba,
)
from mfr_ray.registry import MASK_TYPES, PATTERNS

LUMA = np.array([0.299, 0.587, 0.114], np.float32)
ANCHORED = [0, 5]  # nose bridge and chin: the points whose misplacement shows most (eyes, chin)
POLYGON_LANDMARKS = [*range(2, 15), 28]  # seed 003's landmarks 3-15 and 29, counted from 1
POLYGON_MARGIN = 0.04  # jaw points pushed out by this share of the face height, so the chin is inside
# Coverage styles: ranges of (nose shift in nose lengths, > 0 lower; chin lift in lip-to-chin distances)
COVERAGE_RANGES = {
    "standard": ((-0.05, 0.05), (-0.03, 0.03)),
    "nose_high": ((-0.3, -0.15), (-0.03, 0.03)),
    "nose_low": ((0.2, 0.3), (-0.03, 0.03)),
    "chin_exposed": ((-0.15, -0.05), (0.45, 0.6)),  # pulled up: the homography spreads the lift
}
STRAP_WIDTH = 0.016  # ear loop thickness, share of the cheek-to-cheek width
SHADOW_SIGMA, SHADOW_DEPTH = 0.03, 0.3  # the mask's contact shadow on the skin around it
DRAWN_LOOK_WEIGHT = 0.85  # real printed cloth: the print covers the fabric almost fully
GRAIN_TILE = 256
LIGHT_CELLS = 6  # the face's light under the mask is low-passed to about this many cells across


def polygon_outline(landmarks: np.ndarray) -> np.ndarray:
    """Seed 003's mask polygon, its jaw points moved slightly outwards (away from the nose tip) so the
    mask covers the jaw line instead of ending exactly on it."""
    points = landmarks[POLYGON_LANDMARKS].astype(np.float32).copy()
    centre = landmarks[30]
    outward = points[:-1] - centre
    lengths = np.maximum(np.linalg.norm(outward, axis=1, keepdims=True), 1e-6)
    margin = POLYGON_MARGIN * float(np.linalg.norm(landmarks[8] - landmarks[27]))
    points[:-1] += outward / lengths * margin
    return points


def available_mask_types() -> list[str]:
    """The registered mask types in registration order: a mix that lists them draws by that order."""
    return MASK_TYPES.in_order()


def available_patterns() -> list[str]:
    return PATTERNS.names()


def builtin_spec(mask_type: str) -> MaskTypeSpec | None:
    """The registered spec of a mask type; None for a user type (`custom_masks`), drawn as a template."""
    return MASK_TYPES.get(mask_type) if mask_type in MASK_TYPES else None


def drawn_as(mask_type: str) -> str:
    """How a mask type is drawn: its spec's `drawing` ("template" or "polygon")."""
    spec = builtin_spec(mask_type)
    return spec.drawing if spec is not None else "template"


def rng_for(seed: int, key: str) -> np.random.Generator:
    """Random stream that depends only on (seed, key): stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@dataclass
class MaskRecord:
    """One manifest row. Geometry fields describe the largest face; `face_boxes` lists every face."""

    key: str
    status: str
    reason: str = ""
    num_faces: int = 0
    mask_type: str | None = None
    pattern: str | None = None
    color: str | None = None
    tilt_deg: float | None = None
    keypoints: list[list[float]] = field(default_factory=list)
    polygon: list[list[float]] = field(default_factory=list)
    template_view: str | None = None
    detector: str | None = None
    width: int = 0
    height: int = 0
    face_boxes: list[list[float]] = field(default_factory=list)
    style: str = ""  # JSON of the drawn style (MaskingConfig.style): discrete axes and continuous settings

    def to_row(self) -> dict:
        return asdict(self)


def record_schema():
    """pyarrow schema of `MaskRecord.to_row()`, so batches with and without faces concatenate."""
    import pyarrow as pa

    points = pa.list_(pa.list_(pa.float64()))
    return pa.schema(
        [
            ("key", pa.string()),
            ("status", pa.string()),
            ("reason", pa.string()),
            ("num_faces", pa.int64()),
            ("mask_type", pa.string()),
            ("pattern", pa.string()),
            ("color", pa.string()),
            ("tilt_deg", pa.float64()),
            ("keypoints", points),
            ("polygon", points),
            ("template_view", pa.string()),
            ("detector", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("face_boxes", points),
            ("style", pa.string()),
        ]
    )


@dataclass
class MaskResult:
    """`image` is the masked RGB image (same size as the input) when status is ok, else None; `alpha`
    (uint8, HxW) is how much mask covers each pixel."""

    image: np.ndarray | None
    record: MaskRecord
    alpha: np.ndarray | None = None


@dataclass(frozen=True)
class LocatedFaces:
    """Where the faces of one image are: every box found, the (box, 68 landmarks) pairs that fitted, the
    detector used and notes for the record's reason."""

    boxes: list[Box]
    fitted: list[tuple[Box, np.ndarray]]
    detector: str
    notes: list[str]


@dataclass(frozen=True)
class MaskChoice:
    """What to draw: type, pattern and colour, and the style (discrete axes, e.g. "coverage", and the
    continuous rendering settings, e.g. "lighting"), all drawn from (seed, key)."""

    mask_type: str
    pattern: str | None
    color: str | None
    style: dict = field(default_factory=dict, hash=False)
    drawn_look: bool = False  # pattern/colour drawn by the print style: printed at DRAWN_LOOK_WEIGHT

    def style_json(self) -> str:
        return json.dumps(self.style, sort_keys=True) if self.style else ""


@dataclass(frozen=True)
class TemplateLayers:
    """A template as two premultiplied 4-channel float32 layers, so warping is two warpPerspective calls
    into the face's ROI and patterns/colours are mixed there (per image, no template-size work):
    `base` = (albedo * shade * alpha, alpha); `fabric` = (base RGB * fabric, fabric * shade * alpha)."""

    base: np.ndarray
    fabric: np.ndarray
    keypoints: np.ndarray
    outline: np.ndarray
    straps: np.ndarray

    @classmethod
    def of(cls, t: MaskTemplate) -> TemplateLayers:
        rgb = np.clip(t.albedo * t.shade[..., None], 0, 1) * t.alpha[..., None]
        light = (t.fabric * np.clip(t.shade, 0, 1.5) * t.alpha)[..., None]
        base = np.ascontiguousarray(np.dstack([rgb, t.alpha]), dtype=np.float32)
        fabric = np.ascontiguousarray(np.dstack([rgb * t.fabric[..., None], light]), dtype=np.float32)
        return cls(base, fabric, t.keypoints, t.outline, t.straps)


@cache
def builtin_layers(mask_type: str, view: str, valve: bool = True) -> TemplateLayers:
    """Built-in templates are drawn once per process and shared by every engine."""
    return TemplateLayers.of(build_template(mask_type, view, valve))


@cache
def grain_tile() -> np.ndarray:
    """Fine fabric grain: a fixed, seamless 256 px tile of blurred unit noise, shared by every mask (each
    mask reads it at its own offset), so no noise is generated per image."""
    noise = np.random.default_rng(7).standard_normal((GRAIN_TILE, GRAIN_TILE)).astype(np.float32)
    pad = 4  # blur a wrapped copy and keep the centre, so the tile repeats without seams
    grain = cv2.GaussianBlur(np.pad(noise, pad, mode="wrap"), (0, 0), 0.7)[pad:-pad, pad:-pad]
    return grain / grain.std()


def grain_patch(shape: tuple[int, int], key: str) -> np.ndarray:
    """An HxW window of the grain tile at an offset drawn from `key`."""
    h, w = shape
    offset = zlib.crc32(key.encode())
    oy, ox = offset % GRAIN_TILE, (offset >> 8) % GRAIN_TILE
    if oy + h <= 2 * GRAIN_TILE and ox + w <= 2 * GRAIN_TILE:  # every window of a face-sized mask
        return grain_tiles()[oy : oy + h, ox : ox + w]
    reps = (-(-(oy + h) // GRAIN_TILE), -(-(ox + w) // GRAIN_TILE))
    return np.tile(grain_tile(), reps)[oy : oy + h, ox : ox + w]


@cache
def grain_tiles() -> np.ndarray:
    """The grain tile repeated 2x2, so a window up to a tile in size is a view, never a new np.tile."""
    return np.tile(grain_tile(), (2, 2))


def _pick(weights: dict[str, float], u: float) -> str:
    """The option a uniform draw `u` in [0, 1) lands on, options in their listed order."""
    names = list(weights)
    edges = np.cumsum([weights[n] for n in names])
    return names[min(int(np.searchsorted(edges, u * edges[-1], side="right")), len(names) - 1)]


def _uniform(bounds: tuple[float, float], u: float) -> float:
    return round(bounds[0] + (bounds[1] - bounds[0]) * u, 4)


class MaskEngine:
    """Puts masks on every face of an image. Construct once (loads the dlib models); `mask` never raises
    for bad image content: problems come back as a record status and reason."""

    def __init__(self, config: MaskingConfig | None = None):
        self.config = config or MaskingConfig()
        cfg = self.config
        self.landmarker = FaceLandmarker(cfg.detector, cfg.upsample, cfg.retry_upsample, cfg.detect_max_side)
        self._custom_layers = {name: self._load_custom(spec) for name, spec in cfg.custom_masks.items()}
        self._custom_tiles = {name: load_pattern_file(path) for name, path in cfg.custom_patterns.items()}
        held = {o for o in cfg.style.print if style_name("print", o) in cfg.exclude_styles}
        self.patterns = sorted(
            p for p in set(PATTERNS) | set(self._custom_tiles) if pattern_family(p) not in held
        )
        mix = cfg.mix_entries()
        self._mix_entries = list(mix)
        weights = np.array([mix[e] for e in self._mix_entries], np.float64)
        # Cumulative mix weights: a draw is `searchsorted(cdf, rng.random(), "right")`, exactly what
        # `rng.choice(n, p=weights / sum)` computes, at a fifth of its cost (it validates p on every call).
        self._mix_cdf = np.cumsum(weights / weights.sum()) if len(weights) else weights
        if len(weights):
            self._mix_cdf /= self._mix_cdf[-1]
        self._layouts = {(layout.width, layout.height): layout for layout in cfg.aligned_layouts}
        for mask_type in self._types_in_use() if cfg.preload_templates else ():
            for view in VIEWS:
                for valve in (True, False) if MASK_TYPES.get(mask_type).valve else (True,):
                    self.layers(mask_type, view, valve)

    # ---- templates ---------------------------------------------------------------------------------
    @staticmethod
    def _load_custom(spec) -> dict[str, TemplateLayers]:
        """A user type's views; a missing side is the other side mirrored, or the front view."""
        from PIL import Image

        from mfr_ray.paths import expand_shared

        def load(view: str) -> MaskTemplate:
            with Image.open(expand_shared(getattr(spec, view))) as img:
                return template_from_rgba(np.asarray(img.convert("RGBA")), spec.keypoints[view])

        views = {view: load(view) for view in ("front", "left", "right") if getattr(spec, view)}
        for view, other in (("left", "right"), ("right", "left")):
            if view not in views:
                views[view] = mirror_template(views[other]) if other in views else views["front"]
        return {view: TemplateLayers.of(template) for view, template in views.items()}

    def _types_in_use(self) -> list[str]:
        if self.config.mask_type:
            names = [self.config.mask_type]
        elif self.config.mix:
            names = [entry.partition("/")[0] for entry in self._mix_entries]
        else:
            names = list(MASK_TYPES)
        names = [n for n in dict.fromkeys(names) if n not in self._custom_layers]
        return [n for n in names if drawn_as(n) == "template"]

    def layers(self, mask_type: str, view: str, valve: bool = True) -> TemplateLayers:
        if mask_type in self._custom_layers:
            return self._custom_layers[mask_type][view]
        return builtin_layers(mask_type, view, valve)

    def _tile(self, pattern: str) -> np.ndarray:
        return self._custom_tiles[pattern] if pattern in self._custom_tiles else pattern_tile(pattern)

    # ---- choice --------------------------------------------------------------------------------------
    def choose(self, key: str, mask_type: str | None = None) -> MaskChoice:
        """Mask type, pattern and colour for an image key; depends only on (config, seed, key)."""
        cfg = self.config
        rng = rng_for(cfg.seed, key)
        mix_pick = int(self._mix_cdf.searchsorted(rng.random(), side="right")) if self._mix_entries else -1
        pattern_pick = int(rng.integers(len(self.patterns)))
        hue, sat, val = rng.random(3)
        mask_type = mask_type or cfg.mask_type
        variant = ""
        if mask_type is None:
            mask_type, variant = (
                self._mix_entries[mix_pick].partition("/")[::2] if mix_pick >= 0 else ("surgical", "")
            )
        if mask_type not in MASK_TYPES and mask_type not in self._custom_layers:
            raise ValueError(f"unknown mask type {mask_type!r}")
        if mask_type in cfg.exclude_types:
            raise ValueError(f"mask type {mask_type!r} is held out (exclude_types)")
        spec = builtin_spec(mask_type)
        if spec is not None and spec.drawing == "polygon":
            color = (
                variant
                if HEX_COLOR.match(variant)
                else cfg.color
                if cfg.color not in (None, RANDOM)
                else None
            )
            return MaskChoice(mask_type, None, color or spec.palette[pattern_pick % len(spec.palette)])
        if variant:
            is_color = bool(HEX_COLOR.match(variant))
            pattern, color = (None, variant) if is_color else (variant, None)
        else:
            pattern = self.patterns[pattern_pick] if cfg.pattern == RANDOM else cfg.pattern
            color = cfg.color
            if color == RANDOM:
                r, g, b = colorsys.hsv_to_rgb(hue, 0.3 + 0.6 * sat, 0.3 + 0.65 * val)
                color = "#{:02x}{:02x}{:02x}".format(*(round(c * 255) for c in (r, g, b)))
        return self._styled(key, mask_type, pattern, color)

    def _styled(self, key: str, mask_type: str, pattern: str | None, color: str | None) -> MaskChoice:
        """Draw the style of one mask from its own random stream (so adding a style axis never changes the
        type/pattern/colour draws). Axes that do not apply to the type are left out of the style."""
        cfg = self.config
        u = rng_for(cfg.seed, f"{key}\x00style").random(10)
        spec = builtin_spec(mask_type)
        coverage = _pick(cfg.style_weights("coverage"), u[0])
        nose, chin = COVERAGE_RANGES[coverage]
        style: dict = {
            "coverage": coverage,
            "nose_shift": _uniform(nose, u[1]),
            "chin_lift": _uniform(chin, u[2]),
            "lighting": _uniform(cfg.style.lighting, u[3]),
            "texture": _uniform(cfg.style.texture, u[4]),
            "feather": _uniform(cfg.style.feather, u[5]),
        }
        drawn_look = spec is not None and spec.printable and pattern is None and color is None
        if drawn_look:
            family = _pick(cfg.style_weights("print"), u[6])
            if family == "solid":
                color = CLOTH_SOLIDS[int(u[7] * len(CLOTH_SOLIDS))]
            else:
                names = [p for p in self.patterns if pattern_family(p) == family] or list(
                    PATTERN_FAMILIES[family]
                )
                pattern = names[int(u[7] * len(names))]
        if spec is not None and spec.printable:
            style["print"] = pattern_family(pattern) if pattern else "solid"
        if drawn_as(mask_type) == "template" and len(self.layers(mask_type, "front").straps):
            style["straps"] = _pick(cfg.style_weights("straps"), u[8])
        if spec is not None and spec.valve:
            style["valve"] = _pick(cfg.style_weights("valve"), u[9])
        return MaskChoice(mask_type, pattern, color, style, drawn_look)

    # ---- masking -------------------------------------------------------------------------------------
    def mask_bytes(self, data: bytes, key: str, **kw) -> MaskResult:
        """Decode an encoded image and mask it; decode problems become the record's status."""
        return self.mask_decoded(decode_image(data, max_pixels=self.config.max_pixels), key, **kw)

    def mask_decoded(self, decoded: DecodedImage, key: str, **kw) -> MaskResult:
        """Mask a decoded image: a failed decode is the record's status, a decode note (a conversion)
        comes first in its reason."""
        if not decoded.ok:
            return MaskResult(None, MaskRecord(key=key, status=decoded.status, reason=decoded.reason))
        result = self.mask(decoded.image, key, **kw)
        result.record.reason = join_reasons(decoded.reason, result.record.reason)
        return result

    def mask(
        self, image: np.ndarray, key: str, *, aligned: bool | None = None, mask_type: str | None = None
    ) -> MaskResult:
        """Mask every face of an RGB image (grey, RGBA and 16-bit arrays are converted)."""
        return self.mask_copies(image, [(key, mask_type)], aligned=aligned)[0]

    def mask_copies(
        self, image: np.ndarray, requests: list[tuple[str, str | None]], *, aligned: bool | None = None
    ) -> list[MaskResult]:
        """One masked copy of `image` per (key, mask_type) request; faces and landmarks are found once and
        shared by every copy (several variants of one crop cost one landmark fit)."""
        rgb, status, reason = self._as_rgb(image)
        if rgb is None:
            return [
                MaskResult(None, MaskRecord(key=key, status=status, reason=reason)) for key, _ in requests
            ]
        try:
            faces = self._locate(rgb, self.config.aligned if aligned is None else aligned, reason)
            return [self._paint(rgb, faces, key, mask_type) for key, mask_type in requests]
        except (cv2.error, RuntimeError) as exc:  # OpenCV / dlib refusing this image's content
            problem = f"masking failed: {type(exc).__name__}: {exc}"
            return [
                MaskResult(
                    None,
                    MaskRecord(
                        key=key, status="unsupported", reason=problem, width=rgb.shape[1], height=rgb.shape[0]
                    ),
                )
                for key, _ in requests
            ]

    def _as_rgb(self, image) -> tuple[np.ndarray | None, str, str]:
        """The engine's input: `to_rgb_uint8` within the pixel budget; a missing or empty image is a
        failed decode upstream."""
        if image is None:
            return None, Status.DECODE_ERROR, "no image"
        if isinstance(image, np.ndarray) and image.size == 0:
            return None, Status.DECODE_ERROR, f"empty image {image.shape}"
        return to_rgb_uint8(image, max_pixels=self.config.max_pixels)

    def _face_boxes(self, rgb: np.ndarray, grey: np.ndarray, aligned: bool) -> tuple[list[Box], str, str]:
        h, w = grey.shape
        if aligned:
            layout = self._layouts.get((w, h))
            if layout is not None:
                return [aligned_face_box(layout.face_box, w, h)], "aligned", ""
            note = f"no aligned layout for {w}x{h}, used the detector"
        else:
            note = ""
        return self.landmarker.detect(rgb, grey), self.config.detector, note

    def _locate(self, rgb: np.ndarray, aligned: bool, note: str) -> LocatedFaces:
        """Face boxes and their fitted landmarks (implausible fits on aligned crops are dropped, with a note)."""
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

    def _paint(self, rgb: np.ndarray, located: LocatedFaces, key: str, mask_type: str | None) -> MaskResult:
        cfg = self.config
        h, w = rgb.shape[:2]
        notes = list(located.notes)
        record = MaskRecord(key=key, status="no_face", detector=located.detector, width=w, height=h)
        if not located.boxes:
            tries = f"upsample {cfg.upsample}" + (
                f" then {cfg.retry_upsample}" if cfg.retry_upsample > cfg.upsample else ""
            )
            record.reason = "; ".join([*notes, f"no face found by the {located.detector} detector ({tries})"])
            return MaskResult(None, record)
        choice = self.choose(key, mask_type)
        out = rgb.copy()
        alpha = np.zeros((h, w), np.uint8)
        faces = []
        flat = drawn_as(choice.mask_type) == "polygon"
        for box, landmarks in located.fitted:
            keypoints = six_keypoints(landmarks)
            tilt = face_tilt(landmarks)
            view = "front" if flat else view_for_tilt(tilt, cfg.side_view_threshold_deg)
            if flat:
                polygon = self._paint_polygon(out, alpha, polygon_outline(landmarks), choice.color)
            else:
                style = choice.style
                worn = shifted_keypoints(keypoints, landmarks, style["nose_shift"], style["chin_lift"])
                layers = self.layers(choice.mask_type, view, style.get("valve") != "no_valve")
                polygon = self._paint_template(out, alpha, layers, choice, worn, landmarks, key)
            if polygon is None:
                notes.append("mask could not be placed (degenerate key points)")
                continue
            faces.append((box, keypoints, tilt, view, polygon))
        record.reason = "; ".join(notes)
        record.face_boxes = [[round(float(v), 2) for v in box] for box in located.boxes]
        if not faces:
            return MaskResult(None, record)
        _, keypoints, tilt, view, polygon = faces[0]
        record.status = "ok"
        record.num_faces = len(faces)
        record.mask_type, record.pattern, record.color = choice.mask_type, choice.pattern, choice.color
        record.style = choice.style_json()
        record.tilt_deg = round(tilt, 3)
        record.keypoints = np.round(keypoints, 2).tolist()
        record.polygon = np.round(polygon, 2).tolist()
        record.template_view = view
        return MaskResult(out, record, alpha)

    @staticmethod
    def _roi(points: np.ndarray, w: int, h: int) -> tuple[int, int, int, int] | None:
        if not np.isfinite(points).all():
            return None
        x0, y0 = np.floor(points.min(axis=0)).astype(int)
        x1, y1 = np.ceil(points.max(axis=0)).astype(int) + 2
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None

    def _paint_template(
        self,
        out: np.ndarray,
        alpha: np.ndarray,
        layers: TemplateLayers,
        choice: MaskChoice,
        keypoints: np.ndarray,
        landmarks: np.ndarray,
        key: str,
    ) -> np.ndarray | None:
        """Warp the template onto the six key points and blend it into `out` (in place) inside its ROI:
        ear loops under it, edges feathered, shaded by the face's own light, fabric grain, and a soft
        contact shadow on the skin around it."""
        anchors = [*range(6), *ANCHORED]  # least squares, with the bridge and chin counted twice
        homography, _ = cv2.findHomography(layers.keypoints[anchors], keypoints[anchors], 0)
        if homography is None or abs(np.linalg.det(homography[:2, :2])) < 1e-9:
            return None
        polygon = cv2.perspectiveTransform(layers.outline[None], homography)[0]
        h, w = alpha.shape
        face_size = float(np.ptp(keypoints, axis=0).max())
        if not np.isfinite(polygon).all() or float(np.ptp(polygon, axis=0).max()) > 4 * face_size + 4:
            return None
        style = choice.style
        width = float(np.linalg.norm(keypoints[2] - keypoints[1]))  # cheek to cheek, pixels
        feather = style["feather"] * width
        straps = (
            self._strap_lines(layers, homography, polygon, landmarks, width)
            if style.get("straps") == "ear_loops"
            else []
        )
        pad = int(np.ceil(3 * max(feather, SHADOW_SIGMA * width))) + 1
        extent = np.concatenate([polygon, *straps]) if straps else polygon
        roi = self._roi(
            np.concatenate([extent.min(0, keepdims=True) - pad, extent.max(0, keepdims=True) + pad]), w, h
        )
        if roi is None:
            return None
        x0, y0, x1, y1 = roi
        to_roi = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64) @ homography
        size = (x1 - x0, y1 - y0)

        def warp(layer: np.ndarray, border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
            return cv2.warpPerspective(
                layer, to_roi, size, flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0
            )

        base = warp(layers.base)
        a, mask_rgb = base[..., 3:4], base[..., :3]
        if choice.color or choice.pattern:
            fabric = warp(layers.fabric)
            fabric_rgb, light = fabric[..., :3], fabric[..., 3:4]
            cfg = self.config
            wc, wp = (DRAWN_LOOK_WEIGHT,) * 2 if choice.drawn_look else (cfg.color_weight, cfg.pattern_weight)
            if choice.color:
                color = hex_to_rgb(choice.color)
                mask_rgb = mask_rgb - wc * fabric_rgb + (wc * color) * light
                fabric_rgb = (1 - wc) * fabric_rgb + (wc * color) * light
            if choice.pattern:
                tile = warp(self._tile(choice.pattern), cv2.BORDER_WRAP)
                mask_rgb = mask_rgb - wp * fabric_rgb + wp * tile * light
        if straps:
            mask_rgb, a = self._under_straps(mask_rgb, a, straps, (x0, y0), width, self._strap_color(choice))
        if feather > 0.05:  # soft outwards only: the blur never uncovers what the sharp mask covered
            layer = np.dstack([mask_rgb, a])
            soft = cv2.GaussianBlur(layer, (0, 0), feather)
            layer = np.where(soft[..., 3:4] > a, soft, layer)
            mask_rgb, a = layer[..., :3], layer[..., 3:4]
        face_u8 = out[y0:y1, x0:x1]
        mask_rgb = self._match_light(mask_rgb, a, face_u8)
        shading = self._face_light(face_u8, a, style["lighting"]) * 255
        if style["texture"] > 0:
            shading = shading * (1 + style["texture"] * grain_patch(a.shape[:2], f"{self.config.seed}/{key}"))
        uncovered = 1 - a[..., 0]
        shadow = cv2.GaussianBlur(a, (0, 0), SHADOW_SIGMA * width) * uncovered
        keep = uncovered * (1 - SHADOW_DEPTH * shadow)
        blended = face_u8.astype(np.float32) * keep[..., None] + mask_rgb * shading[..., None]
        out[y0:y1, x0:x1] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        np.maximum(alpha[y0:y1, x0:x1], (a[..., 0] * 255 + 0.5).astype(np.uint8), out=alpha[y0:y1, x0:x1])
        return polygon

    @staticmethod
    def _strap_lines(
        layers: TemplateLayers,
        homography: np.ndarray,
        outline: np.ndarray,
        landmarks: np.ndarray,
        width: float,
    ) -> list[np.ndarray]:
        """Ear loops as polylines (image pixels): from the mask's side anchors to the ear, just outside the
        top of the jaw line (landmarks 0 and 16), sagging slightly. A loop whose ear end lies under the mask (the
        far side of a turned face) is hidden and left out."""
        if not len(layers.straps):
            return []
        ends = cv2.perspectiveTransform(layers.straps[None].astype(np.float64), homography)[0]
        centre = landmarks[27:31].mean(axis=0)
        ears = []
        for top, lower in ((0, 2), (16, 14)):
            outward = landmarks[top] - centre
            outward = outward / max(float(np.linalg.norm(outward)), 1e-6)
            up = landmarks[top] - landmarks[lower]
            ears += [
                landmarks[top] + 0.05 * up + outward * 0.05 * width,
                landmarks[top] - 0.3 * up + outward * 0.06 * width,
            ]
        lines = []
        for start, ear in zip(ends, ears, strict=True):
            if cv2.pointPolygonTest(outline, (float(ear[0]), float(ear[1])), False) >= 0:
                continue
            mid = (start + ear) / 2 + np.array([0.0, 0.025 * width])
            t = np.linspace(0, 1, 9)[:, None]
            lines.append(((1 - t) ** 2 * start + 2 * t * (1 - t) * mid + t**2 * ear).astype(np.float32))
        return lines

    def _strap_color(self, choice: MaskChoice) -> np.ndarray:
        spec = builtin_spec(choice.mask_type)
        color = (spec.strap_color if spec else None) or choice.color or (spec.color if spec else "#f4f4f2")
        return hex_to_rgb(color)

    @staticmethod
    def _under_straps(
        mask_rgb: np.ndarray, a: np.ndarray, lines: list[np.ndarray], origin, width: float, color: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Composite ear loops under the (premultiplied) mask layer."""
        cover = np.zeros(a.shape[:2], np.uint8)
        thickness = max(1, round(STRAP_WIDTH * width))
        fixed = [np.round((line - origin) * 16).astype(np.int32) for line in lines]
        cv2.polylines(cover, fixed, False, 255, thickness, cv2.LINE_AA, shift=4)
        strap = (cover.astype(np.float32) / 255)[..., None] * (1 - a)
        return mask_rgb + strap * (color * 0.85), a + strap

    @staticmethod
    def _face_light(face: np.ndarray, a: np.ndarray, strength: float) -> np.ndarray:
        """The face's own light as a multiplier for the mask: the luminance of the covered skin low-passed
        to a few cells across (light direction and falloff, not features), relative to its mean under the
        mask, raised to `strength`."""
        h, w = a.shape[:2]
        if strength <= 0 or min(h, w) < 4:
            return np.ones((h, w), np.float32)
        grey = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY).astype(np.float32)
        cells = (max(2, round(LIGHT_CELLS * w / max(h, w))), max(2, round(LIGHT_CELLS * h / max(h, w))))
        small = cv2.resize(grey, cells, interpolation=cv2.INTER_AREA)
        low = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        weight = a[..., 0]
        mean = float((low * weight).sum() / max(float(weight.sum()), 1e-6))
        relative = np.clip(low * (1 / max(mean, 1.0)), 0.3, 1.7)
        return relative if strength == 1 else cv2.exp(cv2.log(relative) * strength)

    def _match_light(self, premult: np.ndarray, a: np.ndarray, face: np.ndarray) -> np.ndarray:
        """Scale the mask's brightness and saturation by the face's (HSV value and saturation of the
        pixels under the mask) relative to a normally lit, normally saturated face, so masks are dim on
        dark photos and grey on grey ones."""
        cfg = self.config
        under = (a[..., 0] > 0.5).astype(np.uint8)
        if not (cfg.match_brightness or cfg.match_saturation) or cv2.countNonZero(under) < 4:
            return premult
        _, sat, value, _ = cv2.mean(cv2.cvtColor(face, cv2.COLOR_RGB2HSV), mask=under)
        if cfg.match_brightness:
            premult = premult * float(np.clip(value / 255 / cfg.brightness_reference, 0.35, 1.3))
        if cfg.match_saturation:
            grey = cv2.transform(premult, LUMA[None, :])[..., None]
            premult = grey + (premult - grey) * float(np.clip(sat / 255 / cfg.saturation_reference, 0.0, 1.2))
        return premult

    @staticmethod
    def _paint_polygon(
        out: np.ndarray, alpha: np.ndarray, points: np.ndarray, color: str
    ) -> np.ndarray | None:
        """Seed 003's mask: the landmark polygon filled with one flat colour (anti-aliased)."""
        h, w = alpha.shape
        roi = MaskEngine._roi(points, w, h)
        if roi is None:
            return None
        x0, y0, x1, y1 = roi
        cover = np.zeros((y1 - y0, x1 - x0), np.uint8)
        fixed = np.round((points - [x0, y0]) * 16).astype(np.int32)
        cv2.fillPoly(cover, [fixed], 255, cv2.LINE_AA, shift=4)
        a = cover.astype(np.float32)[..., None] / 255
        face = out[y0:y1, x0:x1].astype(np.float32)
        out[y0:y1, x0:x1] = np.clip(face * (1 - a) + hex_to_rgb(color) * 255 * a + 0.5, 0, 255).astype(
            np.uint8
        )
        np.maximum(alpha[y0:y1, x0:x1], cover, out=alpha[y0:y1, x0:x1])
        return points
