"""Decoding real LFW photos stored in awkward ways: every case ends in a status and a reason, never an
exception; conversions keep the picture (compared with the RGB original)."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from mfr_ray.imageio import STATUSES, decode_image, encode_image, read_image_file
from mfr_ray.masking.quality import lfw_files


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    return np.asarray(Image.open(lfw_files(1, seed=3)[0]).convert("RGB"))


def _saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny data chunk (no pixels to speak of)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_rgb_jpeg_roundtrip(face):
    decoded = decode_image(encode_image(face, "jpg", quality=95))
    assert decoded.status == "ok" and decoded.reason == ""
    assert decoded.image.shape == face.shape and decoded.image.flags["C_CONTIGUOUS"]
    assert np.abs(decoded.image.astype(int) - face).mean() < 3


@pytest.mark.parametrize(
    ("mode", "fmt", "note"),
    [
        ("L", "JPEG", "converted from L"),
        ("CMYK", "JPEG", "converted from CMYK"),
        ("P", "PNG", "converted from P"),
        ("RGBA", "PNG", "converted from RGBA"),
        ("LA", "PNG", "converted from LA"),
    ],
)
def test_exotic_modes_become_rgb(face, mode, fmt, note):
    decoded = decode_image(_saved(Image.fromarray(face).convert(mode), fmt))
    assert decoded.status == "ok"
    assert note in decoded.reason
    assert decoded.image.dtype == np.uint8 and decoded.image.shape == face.shape
    grey_original = face.mean(axis=2)
    assert np.abs(decoded.image.mean(axis=2) - grey_original).mean() < 20  # same picture


def test_16_bit_grey_png_keeps_its_range(face):
    grey16 = (face.mean(axis=2) * 257).astype(np.uint16)
    decoded = decode_image(_saved(Image.fromarray(grey16), "PNG"))
    assert decoded.status == "ok" and "converted from I" in decoded.reason
    assert np.abs(decoded.image[..., 0].astype(int) - face.mean(axis=2).astype(int)).max() <= 2


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", "decode_error"),
        (b"hello, not an image at all", "decode_error"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "unsupported"),
    ],
)
def test_bad_bytes_get_a_status(data, status):
    decoded = decode_image(data)
    assert decoded.status == status and decoded.image is None and decoded.reason


def test_truncated_jpeg_is_a_decode_error(face):
    data = encode_image(face, "jpg")
    decoded = decode_image(data[: len(data) // 3])
    assert decoded.status == "decode_error" and "corrupt" in decoded.reason


def test_huge_header_is_rejected_before_decoding():
    start = time.perf_counter()
    decoded = decode_image(_png_header_only(20_000, 20_000))
    assert decoded.status == "too_large" and "400000000 pixels" in decoded.reason
    assert time.perf_counter() - start < 1.0  # 400 Mpx were never allocated
    assert decode_image(_png_header_only(20_000, 20), max_pixels=10_000).status == "too_large"


def test_files_with_unicode_names_and_missing_files(tmp_path, face):
    path = tmp_path / "Zoë Ñúñez 测试" / "фото_0001.jpg"
    path.parent.mkdir()
    path.write_bytes(encode_image(face))
    assert read_image_file(path).status == "ok"
    missing = read_image_file(tmp_path / "nope.jpg")
    assert missing.status == "decode_error" and "nope.jpg" in missing.reason


def test_statuses_are_the_contract():
    assert STATUSES == ("ok", "no_face", "decode_error", "too_large", "unsupported")


def test_encode_rejects_unknown_format(face):
    with pytest.raises(ValueError, match="unknown image format"):
        encode_image(face, "tga")
    assert decode_image(encode_image(face, "png")).image.tolist() == face.tolist()
