"""Decode and encode images without ever raising on bad content.

Every stage reads images through `decode_image`, so a corrupt, empty, huge or exotic file becomes a
status plus a human reason (a manifest row) instead of an exception that kills a Ray task. The pixel
budget is checked from the header before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

STATUSES = ("ok", "no_face", "decode_error", "too_large", "unsupported")
DEFAULT_MAX_PIXELS = 40_000_000

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
    status: str
    reason: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _unsupported_format(data: bytes) -> str | None:
    for offset, signature, name in _UNSUPPORTED_SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return name
    return None


def _high_depth_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer grey -> top 8 bits (values above 255 mean 16-bit data); float by 0..1 or 0..255."""
    if mode == "F":
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(array * scale, 0, 255).astype(np.uint8)
    values = np.clip(array.astype(np.int64), 0, 65535)
    if mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values >> 8
    return values.astype(np.uint8)


def _to_rgb(img: Image.Image) -> tuple[np.ndarray, str]:
    """Pillow image of any mode -> (RGB uint8 array, note on what was converted)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img), ""
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        grey = _high_depth_to_uint8(np.asarray(img), mode)
        return np.repeat(grey[:, :, None], 3, axis=2), f"converted from {mode} (high bit depth grey)"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        note = f"converted from {mode}, alpha composited on white"
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB")), note
    return np.asarray(img.convert("RGB")), f"converted from {mode}"


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Bytes of an image file -> RGB array, or a status and reason. Never raises."""
    try:
        if not data:
            return DecodedImage(None, "decode_error", "empty file")
        unsupported = _unsupported_format(data)
        if unsupported:
            return DecodedImage(None, "unsupported", f"{unsupported} images are not supported")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data))
            except UnidentifiedImageError:
                if data[:4] in (b"II*\x00", b"MM\x00*"):
                    return DecodedImage(None, "unsupported", "TIFF variant that cannot be decoded here")
                return DecodedImage(None, "decode_error", "not an image (unrecognised content)")
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                return DecodedImage(None, "too_large", f"image too large: {exc}")
            width, height = img.size
            if width <= 0 or height <= 0:
                return DecodedImage(None, "decode_error", f"invalid size {width}x{height}")
            if width * height > max_pixels:
                return DecodedImage(
                    None, "too_large", f"{width}x{height} = {width * height} pixels exceeds {max_pixels}"
                )
            fmt = img.format or "unknown"
            try:
                img.load()
            except Exception as exc:  # noqa: BLE001  truncated or corrupt pixel data
                return DecodedImage(None, "decode_error", f"corrupt {fmt} data: {exc}")
            notes = []
            try:
                rotated = ImageOps.exif_transpose(img)
                if rotated is not None and rotated is not img:
                    img = rotated
            except Exception:  # noqa: BLE001  a broken EXIF block must not lose the picture
                notes.append("EXIF orientation ignored (unreadable)")
            rgb, note = _to_rgb(img)
        if note:
            notes.insert(0, note)
        return DecodedImage(np.ascontiguousarray(rgb, dtype=np.uint8), "ok", "; ".join(notes))
    except MemoryError:
        return DecodedImage(None, "too_large", "out of memory while decoding")
    except Exception as exc:  # noqa: BLE001  anything Pillow raises on hostile input
        return DecodedImage(None, "decode_error", f"cannot decode: {type(exc).__name__}: {exc}")


def read_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Read and decode a local file (any unicode path). A missing or unreadable file is a decode_error."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return DecodedImage(None, "decode_error", f"cannot read {path}: {exc.strerror or exc}")
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
