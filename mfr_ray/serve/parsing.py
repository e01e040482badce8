"""Request bodies and parameters of the service, checked before anything is embedded.

Every malformed input becomes a `RequestError` (a 4xx with `error` and `reason`), never an exception the
service did not expect: JSON nested past any sane depth, numbers of thousands of digits, infinities and
NaN, names with control or invisible characters are refused here."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import unicodedata
from typing import Any

MAX_NUMBER_DIGITS = 32  # a FAR or a k never needs more; Python refuses to parse ints past 4,300 digits
MAX_IDENTITY_CHARS = 200
_DIGITS = re.compile(r"\s*\d{1,9}\s*")


class RequestError(Exception):
    """A client error: HTTP status, a short machine-readable error and a reason for a person."""

    def __init__(self, status: int, error: str, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.error, self.reason, self.headers = status, error, reason, headers or {}


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise ValueError(f"a number of {len(text)} digits")
    return int(text)


def _bounded_float(text: str) -> float:
    if len(text) > 2 * MAX_NUMBER_DIGITS:
        raise ValueError(f"a number of {len(text)} characters")
    return float(text)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number this API takes")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a flat JSON object: values are strings, numbers, booleans or null (no nesting)."""
    try:
        doc = json.loads(body, parse_int=_bounded_int, parse_float=_bounded_float, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError(400, "bad_json", "the body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise RequestError(400, "bad_json", f"the body is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(doc, dict):
        raise RequestError(400, "bad_json", "the body must be a JSON object")
    nested = sorted(k for k, v in doc.items() if isinstance(v, dict | list))
    if nested:
        raise RequestError(400, "bad_json", f"field {nested[0][:50]!r} must be a string or a number")
    return doc


def decode_images(doc: dict[str, Any], fields: tuple[str, ...]) -> dict[str, bytes]:
    """Pop each base64 image field of `doc`, decoded."""
    images = {}
    for name in fields:
        value = doc.pop(name, None)
        if not isinstance(value, str):
            raise RequestError(400, "missing_image", f"field {name!r} (base64 image) is missing")
        try:
            images[name] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "bad_base64", f"field {name!r} is not valid base64") from None
    return images


def parse_far(value: Any, name: str = "far") -> float:
    """A false accept rate (or, `name` fpir, a per-search one): a finite number in (0, 1), from JSON or a
    query string."""
    if isinstance(value, bool):
        value = None
    try:
        far = float(value if not isinstance(value, str) else value[: 2 * MAX_NUMBER_DIGITS + 1])
    except (TypeError, ValueError, OverflowError):
        far = math.nan
    if not (math.isfinite(far) and 0 < far < 1):
        raise RequestError(400, f"bad_{name}", f"{name} must be a number between 0 and 1, got {str(value)[:40]!r}")
    return far


def parse_k(value: Any, max_k: int) -> int:
    """How many candidates to list: a whole number in 1..max_k, from JSON or a query string."""
    whole_float = isinstance(value, float) and math.isfinite(value) and value.is_integer()
    digits = isinstance(value, str) and _DIGITS.fullmatch(value)
    k = int(value) if (isinstance(value, int) and not isinstance(value, bool)) or whole_float or digits else None
    if k is None or not 1 <= k <= max_k:
        raise RequestError(400, "bad_k", f"k must be a whole number between 1 and {max_k}, got {str(value)[:40]!r}")
    return k


def parse_identity(value: Any) -> str:
    """An enrolment name: text normalised to NFC, without '/', control or invisible (format) characters,
    1 to MAX_IDENTITY_CHARS long. The name is a folder name in galleries and appears in answers and logs."""
    name = unicodedata.normalize("NFC", value).strip() if isinstance(value, str) else ""
    bad = [c for c in name if unicodedata.category(c) in {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"} or c == "/"]
    if not name or bad or len(name) > MAX_IDENTITY_CHARS or name in {".", ".."}:
        raise RequestError(400, "bad_identity", "identity must be a non-empty name of at most "
                           f"{MAX_IDENTITY_CHARS} characters, without '/', control or invisible characters")
    return name
