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

from mfr_ray.imageio import (
    USABLE_STATUSES,
    Status,
    decode_image,
    encode_image,
    join_reasons,
    read_image_file,
    to_rgb_uint8,
)
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
    assert {"ok", "no_face", "decode_error", "too_large", "unsupported"} <= set(Status)
    assert tuple(Status) == (
        "ok", "ok_fallback", "no_face", "decode_error", "too_large", "unsupported", "crashed", "skipped",
        "error",
    )
    assert USABLE_STATUSES == {"ok", "ok_fallback"} and Status.OK == "ok" and f"{Status.NO_FACE}" == "no_face"


def test_arrays_become_rgb_by_the_one_rule(face):
    """Grey, alpha, 16-bit, wide-integer and float arrays of a real face keep the picture; the note says
    what was converted; what is no image is refused with a status."""
    grey = face.mean(axis=2).astype(np.uint8)
    cases = {
        "grey": (grey, "converted from grey"),
        "grey_1_channel": (grey[:, :, None], "converted from grey"),
        "rgba": (np.dstack([face, np.zeros_like(grey)]), "alpha dropped"),
        "uint16": (face.astype(np.uint16) * 257, "converted from uint16"),
        "int32_16bit": (face.astype(np.int32) * 256, "converted from int32"),
        "int64_8bit": (face.astype(np.int64), "converted from int64"),
        "float_unit": (face / 255.0, "converted from float64"),
        "float_255": (face.astype(np.float32), "converted from float32"),
    }
    for name, (array, note) in cases.items():
        rgb, status, reason = to_rgb_uint8(array)
        assert status == "ok" and note in reason, name
        assert rgb.dtype == np.uint8 and rgb.shape == face.shape and rgb.flags["C_CONTIGUOUS"], name
        reference = np.repeat(grey[:, :, None], 3, axis=2) if "grey" in name else face
        assert np.abs(rgb.astype(int) - reference).max() <= 1, name
    rgb, status, note = to_rgb_uint8(face)
    assert (rgb == face).all() and status == "ok" and note == ""  # RGB uint8 is kept as it is
    nan = face / 255.0
    nan[:10] = np.nan
    assert to_rgb_uint8(nan)[0][:10].max() == 0
    refused = {
        "none": (None, "unsupported"),
        "text": ("not an image", "unsupported"),
        "bool": (np.ones((20, 20, 3), bool), "unsupported"),
        "4d": (np.zeros((2, 20, 20, 3), np.uint8), "unsupported"),
        "five_channels": (np.zeros((20, 20, 5), np.uint8), "unsupported"),
    }
    for name, (array, status) in refused.items():
        rgb, got, reason = to_rgb_uint8(array)
        assert rgb is None and got == status and reason, name
    too_large = ("too_large", f"{face.shape[1]}x{face.shape[0]} exceeds 100 pixels")
    assert to_rgb_uint8(face, max_pixels=100)[1:] == too_large


def test_transparent_file_is_composited_on_white(face):
    """A decoded file's transparency is shown as a viewer shows it; an array's alpha is just dropped."""
    rgba = np.dstack([face, np.zeros(face.shape[:2], np.uint8)])
    rgba[:50, :, 3] = 255
    decoded = decode_image(_saved(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert decoded.ok and "alpha composited on white" in decoded.reason
    assert (decoded.image[50:] == 255).all() and (decoded.image[:50] == face[:50]).all()
    rgb, _, note = to_rgb_uint8(Image.fromarray(rgba, "RGBA"))
    assert (rgb == decoded.image).all() and note == "converted from RGBA, alpha composited on white"
    assert (to_rgb_uint8(rgba)[0] == face).all()


def test_reasons_are_joined_in_order_without_blanks():
    joined = join_reasons("converted from L", "", "centre box guessed")
    assert joined == "converted from L; centre box guessed"
    assert join_reasons("", "") == "" and join_reasons() == ""


def test_encode_rejects_unknown_format(face):
    with pytest.raises(ValueError, match="unknown image format"):
        encode_image(face, "tga")
    assert decode_image(encode_image(face, "png")).image.tolist() == face.tolist()


@pytest.mark.parametrize("fmt", ["PCX", "ICO", "SGI", "TGA"])
def test_only_the_listed_decoders_read_input_bytes(face, fmt):
    """Formats Pillow could parse but the project does not list (their parsers are attack surface) are
    refused, while the listed ones decode."""
    decoded = decode_image(_saved(Image.fromarray(face[:64, :64]), fmt))
    assert not decoded.ok and decoded.status in ("decode_error", "unsupported"), (fmt, decoded.reason)
    assert decode_image(_saved(Image.fromarray(face), "JPEG")).ok


def test_outputs_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import os

    from mfr_ray.masking.files import write_replacing

    target = tmp_path / "a.jpg"
    target.write_bytes(b"original")
    write_replacing(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]

    def killed(*_args):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError):
        write_replacing(target, b"half-written")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]
