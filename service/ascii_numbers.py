"""Numbers a client sends (headers, query parameters, JSON strings), parsed strictly.

Python's ``int()``/``float()`` and ``str.isdigit()`` accept far more than a wire protocol means:
Unicode digits (``'٥'``, ``'²'`` passes ``isdigit`` but not ``int``), underscores (``'1_0'``),
surrounding blanks, ``'nan'``/``'inf'``, and integers of thousands of digits (slow, then refused
with ValueError past Python's 4,300-digit limit). Every number a client sends goes through
these two functions: plain ASCII digits or a domain error (400/422 by the error class chosen).
"""

from __future__ import annotations

import re

from service.errors import InvalidInput, ServiceError

_UINT = re.compile(r"[0-9]{1,18}")  # 18 digits: always fits an int64, parsed in constant time
_DECIMAL = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,15})?")


def parse_uint(text: str | bytes | None, what: str, error: type[ServiceError] = InvalidInput) -> int:
    """A non-negative integer written as 1-18 ASCII digits, else ``error`` naming ``what``."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if text is None or _UINT.fullmatch(text) is None:
        raise error(f"{what} must be a non-negative integer in ASCII digits, got {text!r}")
    return int(text)


def parse_decimal(text: str | bytes | None, what: str, error: type[ServiceError] = InvalidInput) -> float:
    """A non-negative decimal number (``12``, ``0.5``; no sign, exponent, blanks, nan or inf)."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if text is None or _DECIMAL.fullmatch(text) is None:
        raise error(f"{what} must be a non-negative decimal number in ASCII digits, got {text!r}")
    return float(text)
