"""Decode and encode images without ever raising on bad content, and the vocabulary of an image's row.

Every stage reads images through `decode_image`, so a corrupt, empty, huge or exotic file becomes a
status plus a human reason (a manifest row) instead of an exception that kills a Ray task. The pixel
budget is checked from the header before any pixel is decoded. Arrays handed to the aligner or the mask
engine go through the same `to_rgb_uint8`, so every stage turns grey, alpha and 16-bit input into RGB by
one rule.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class Status(StrEnum):
    """What became of one input image: the `status` of its row in every manifest (prepare's shards,
    evaluation's crops, `mfr mask`'s manifest). A member equals its string, so rows stay plain text."""

    OK = "ok"
    OK_FALLBACK = "ok_fallback"  # no face found, the centre box was guessed: a crop, never plain ok
    NO_FACE = "no_face"
    DECODE_ERROR = "decode_error"  # unreadable, corrupt, empty or missing file
    TOO_LARGE = "too_large"  # over the byte or pixel budget; never decoded in full
    UNSUPPORTED = "unsupported"  # an image, but not one we can use (HEIC, 5 channels, too small, ...)
    CRASHED = "crashed"  # killed its worker `compute.max_image_attempts` times; not tried again
    SKIPPED = "skipped"  # `mfr mask`: not an image, or a symlink not followed; never read
    ERROR = "error"  # `mfr mask`: an unexpected failure; `--resume` tries it again


OK_FALLBACK = Status.OK_FALLBACK
# Statuses of a row that carries a crop: a detected or pre-aligned face, or the centre-box guess.
USABLE_STATUSES = frozenset({Status.OK, Status.OK_FALLBACK})
# The variant of the crops without a mask: prepare's reference rows and evaluation's reference source.
UNMASKED = "unmasked"
# Suffixes of the files read as images (prepare's index and `mfr mask`); others are not images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
DEFAULT_MAX_PIXELS = 40_000_000
# The only decoders Pillow may use on input bytes (the formats of IMAGE_SUFFIXES; camera MPO files open
# through JPEG's): hostile bytes never reach its rarer parsers (EPS, FITS, PSD, ICNS, ...).
DECODE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF", "PPM")

# Container signatures of image formats Pillow cannot decode here: they are images, just not ours.
_UNSUPPORTED_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (0, b"8BPS", "Photoshop PSD"),
    (0, b"II\xbc", "JPEG XR"),
)

_ENCODE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}


@dataclass
class DecodedImage:
    """`image` is HxWx3 uint8 RGB (C-contiguous) when status is "ok", else None."""

    image: np.ndarray | None
    status: Status
    reason: str

    @property
    def ok(self) -> bool:
        return self.status == Status.OK


def _unsupported_format(data: bytes) -> str | None:
    for offset, signature, name in _UNSUPPORTED_SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return name
    return None


def join_reasons(*reasons: str) -> str:
    """The reasons of the steps one image went through, in order, as its row's one `reason` text."""
    return "; ".join(reason for reason in reasons if reason)


_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def to_rgb_uint8(image, max_pixels: int | None = None) -> tuple[np.ndarray | None, Status, str]:
    """Any image -> (HxWx3 uint8 C-contiguous RGB, ok, note on what was converted), or (None, status,
    reason) for input that is no image. Never raises. The one rule every stage converts by:

    - a Pillow image: transparency (RGBA, LA, PA, P with a transparent colour) is composited on white, as
      a viewer shows it; other modes (L, P, CMYK, ...) are converted by Pillow; 16/32-bit integer and
      float grey modes go through the array rule. The note names the mode ("converted from L").
    - an array: HxW, HxWx1, HxWx3 or HxWx4 of an integer or float dtype (else `unsupported`); grey is
      repeated to three channels, a fourth (alpha) channel is dropped: an array's alpha has no agreed
      meaning. The note names the dtype and what was done ("converted from uint16; converted from grey").
    - bit depth: uint8 is kept; uint16, and any integer array with values above 255 (16-bit data in a
      wider type), keeps its top 8 bits; other integers are clipped to 0..255; floats are scaled by 255
      when they lie within 0..1, else clipped, NaN -> 0.
    - `max_pixels`: a larger array is `too_large`, refused before any conversion.
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if not isinstance(image, np.ndarray) or image.dtype.kind not in "uif" or image.ndim not in (2, 3):
        what = f"{type(image).__name__} {getattr(image, 'shape', '')}"
        return None, Status.UNSUPPORTED, f"not an image array: {what}"
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in (1, 3, 4):
        return None, Status.UNSUPPORTED, f"{channels} channels"
    if max_pixels is not None and height * width > max_pixels:
        return None, Status.TOO_LARGE, f"{width}x{height} exceeds {max_pixels} pixels"
    notes = []
    if image.dtype != np.uint8:
        notes.append(f"converted from {image.dtype}")
        image = _uint8_values(image)
    if channels == 1:
        notes.append("converted from grey")
        image = np.repeat(image.reshape(height, width, 1), 3, axis=2)
    elif channels == 4:
        notes.append("alpha dropped")
        image = image[:, :, :3]
    return np.ascontiguousarray(image), Status.OK, "; ".join(notes)


def _uint8_values(values: np.ndarray) -> np.ndarray:
    """The bit-depth part of `to_rgb_uint8`'s rule, for a non-uint8 integer or float array."""
    if values.dtype.kind in "ui":
        sixteen_bit = (values.dtype.kind == "u" and values.dtype.itemsize == 2) or values.max(initial=0) > 255
        if sixteen_bit:
            return (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.clip(values, 0, 255).astype(np.uint8)
    unit_range = float(np.nan_to_num(values).max(initial=0.0)) <= 1.0
    finite = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(finite * (255.0 if unit_range else 1.0), 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> tuple[np.ndarray | None, Status, str]:
    mode = img.mode
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(img)), Status.OK, ""
    if mode in _HIGH_DEPTH_MODES:
        rgb, status, reason = to_rgb_uint8(np.asarray(img))
        return rgb, status, f"converted from {mode} (high bit depth grey)" if rgb is not None else reason
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
        return np.ascontiguousarray(flat), Status.OK, f"converted from {mode}, alpha composited on white"
    return np.ascontiguousarray(np.asarray(img.convert("RGB"))), Status.OK, f"converted from {mode}"


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Bytes of an image file -> RGB array, or a status and reason. Never raises."""
    try:
        if not data:
            return DecodedImage(None, Status.DECODE_ERROR, "empty file")
        unsupported = _unsupported_format(data)
        if unsupported:
            return DecodedImage(None, Status.UNSUPPORTED, f"{unsupported} images are not supported")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
            except UnidentifiedImageError:
                if data[:4] in (b"II*\x00", b"MM\x00*"):
                    return DecodedImage(None, Status.UNSUPPORTED, "TIFF variant that cannot be decoded here")
                return DecodedImage(None, Status.DECODE_ERROR, "not an image (unrecognised content)")
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                return DecodedImage(None, Status.TOO_LARGE, f"image too large: {exc}")
            width, height = img.size
            if width <= 0 or height <= 0:
                return DecodedImage(None, Status.DECODE_ERROR, f"invalid size {width}x{height}")
            if width * height > max_pixels:
                return DecodedImage(
                    None, Status.TOO_LARGE, f"{width}x{height} = {width * height} pixels exceeds {max_pixels}"
                )
            fmt = img.format or "unknown"
            try:
                img.load()
            except Exception as exc:  # noqa: BLE001  truncated or corrupt pixel data
                return DecodedImage(None, Status.DECODE_ERROR, f"corrupt {fmt} data: {exc}")
            notes = []
            try:
                rotated = ImageOps.exif_transpose(img)
                if rotated is not None and rotated is not img:
                    img = rotated
            except Exception:  # noqa: BLE001  a broken EXIF block must not lose the picture
                notes.append("EXIF orientation ignored (unreadable)")
            rgb, status, note = to_rgb_uint8(img)
        if rgb is None:
            return DecodedImage(None, status, note)
        return DecodedImage(rgb, Status.OK, join_reasons(note, *notes))
    except MemoryError:
        return DecodedImage(None, Status.TOO_LARGE, "out of memory while decoding")
    except Exception as exc:  # noqa: BLE001  anything Pillow raises on hostile input
        return DecodedImage(None, Status.DECODE_ERROR, f"cannot decode: {type(exc).__name__}: {exc}")


def read_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Read and decode a local file (any unicode path). A missing or unreadable file is a decode_error."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return DecodedImage(None, Status.DECODE_ERROR, f"cannot read {path}: {exc.strerror or exc}")
    return decode_image(data, max_pixels=max_pixels)


def encode_image(image: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
    """RGB (or grey) uint8 array -> encoded bytes. Deterministic for identical input."""
    name = _ENCODE_FORMATS.get(fmt.lower().lstrip("."))
    if name is None:
        raise ValueError(f"unknown image format {fmt!r}; use one of {sorted(_ENCODE_FORMATS)}")
    buffer = io.BytesIO()
    options = {"quality": quality} if name in ("JPEG", "WEBP") else {}
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format=name, **options)
    return buffer.getvalue()
