"""The masking engine: faces -> landmarks -> six key points + tilt -> template view -> homography warp ->
alpha blend with brightness/saturation matched to the face. One engine per process (or Ray actor); it
ties together face location (`locate`), what to draw (`sampling`), how to draw it (`render`) and the
manifest record (`records`)."""

from __future__ import annotations

import cv2
import numpy as np

from mfr_ray.imageio import DecodedImage, Status, decode_image, join_reasons, to_rgb_uint8
from mfr_ray.masking.config import VIEWS, MaskingConfig
from mfr_ray.masking.landmarks import face_tilt, shifted_keypoints, six_keypoints, view_for_tilt
from mfr_ray.masking.layers import TemplateLayers, builtin_layers, custom_layers, drawn_as
from mfr_ray.masking.locate import FaceLocator, LocatedFaces
from mfr_ray.masking.patterns import load_pattern_file, pattern_tile
from mfr_ray.masking.records import MaskRecord, MaskResult
from mfr_ray.masking.render import MaskRenderer, paint_polygon, polygon_outline
from mfr_ray.masking.sampling import MaskChoice, MaskSampler
from mfr_ray.registry import MASK_TYPES


class MaskEngine:
    """Puts masks on every face of an image. Construct once (loads the dlib models); `mask` never raises
    for bad image content: problems come back as a record status and reason."""

    def __init__(self, config: MaskingConfig | None = None):
        self.config = config or MaskingConfig()
        cfg = self.config
        self.locator = FaceLocator(cfg)
        self._custom_layers = {name: custom_layers(spec) for name, spec in cfg.custom_masks.items()}
        self._custom_tiles = {name: load_pattern_file(path) for name, path in cfg.custom_patterns.items()}
        self.sampler = MaskSampler(cfg, self.layers)
        self.renderer = MaskRenderer(cfg, self._tile)
        for mask_type in self._types_in_use() if cfg.preload_templates else ():
            for view in VIEWS:
                for valve in (True, False) if MASK_TYPES.get(mask_type).valve else (True,):
                    self.layers(mask_type, view, valve)

    def _types_in_use(self) -> list[str]:
        if self.config.mask_type:
            names = [self.config.mask_type]
        elif self.config.mix:
            names = [entry.partition("/")[0] for entry in self.sampler.mix_entries]
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

    def choose(self, key: str, mask_type: str | None = None) -> MaskChoice:
        """Mask type, pattern and colour for an image key; depends only on (config, seed, key)."""
        return self.sampler.choose(key, mask_type)

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
            faces = self.locator.locate(rgb, self.config.aligned if aligned is None else aligned, reason)
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

    def _paint(self, rgb: np.ndarray, located: LocatedFaces, key: str, mask_type: str | None) -> MaskResult:
        """One masked copy: every fitted face painted with the key's choice; the record describes the
        first."""
        h, w = rgb.shape[:2]
        notes = list(located.notes)
        record = MaskRecord(key=key, status="no_face", detector=located.detector, width=w, height=h)
        if not located.boxes:
            record.reason = "; ".join([*notes, self._no_face_note(located.detector)])
            return MaskResult(None, record)
        choice = self.choose(key, mask_type)
        out = rgb.copy()
        alpha = np.zeros((h, w), np.uint8)
        faces = []
        for _, landmarks in located.fitted:
            painted = self._paint_face(out, alpha, choice, landmarks, key)
            if painted is None:
                notes.append("mask could not be placed (degenerate key points)")
            else:
                faces.append(painted)
        record.reason = "; ".join(notes)
        record.face_boxes = [[round(float(v), 2) for v in box] for box in located.boxes]
        if not faces:
            return MaskResult(None, record)
        keypoints, tilt, view, polygon = faces[0]
        record.status = "ok"
        record.num_faces = len(faces)
        record.mask_type, record.pattern, record.color = choice.mask_type, choice.pattern, choice.color
        record.style = choice.style_json()
        record.tilt_deg = round(tilt, 3)
        record.keypoints = np.round(keypoints, 2).tolist()
        record.polygon = np.round(polygon, 2).tolist()
        record.template_view = view
        return MaskResult(out, record, alpha)

    def _no_face_note(self, detector: str) -> str:
        cfg = self.config
        retry = f" then {cfg.retry_upsample}" if cfg.retry_upsample > cfg.upsample else ""
        return f"no face found by the {detector} detector (upsample {cfg.upsample}{retry})"

    def _paint_face(
        self, out: np.ndarray, alpha: np.ndarray, choice: MaskChoice, landmarks: np.ndarray, key: str
    ) -> tuple | None:
        """Paint one face in place: (key points, tilt, view, outline drawn), or None where it cannot be
        placed."""
        keypoints = six_keypoints(landmarks)
        tilt = face_tilt(landmarks)
        if drawn_as(choice.mask_type) == "polygon":
            polygon = paint_polygon(out, alpha, polygon_outline(landmarks), choice.color)
            view = "front"
        else:
            style = choice.style
            view = view_for_tilt(tilt, self.config.side_view_threshold_deg)
            worn = shifted_keypoints(keypoints, landmarks, style["nose_shift"], style["chin_lift"])
            layers = self.layers(choice.mask_type, view, style.get("valve") != "no_valve")
            polygon = self.renderer.paint_template(out, alpha, layers, choice, worn, landmarks, key)
        return None if polygon is None else (keypoints, tilt, view, polygon)
