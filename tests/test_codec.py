"""Image decoding limits without a server: what a JPEG's decoding costs is bounded at the scale it
is decoded at, other formats by their header's pixel count."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from service.errors import PayloadTooLarge
from service.inference import codec


def _jpeg(width: int, height: int, **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 200)).save(buf, format="JPEG", **save)
    return buf.getvalue()


def _claiming(data: bytes, side: int) -> bytes:
    """The JPEG with its frame header claiming side x side pixels (the body stays tiny)."""
    out = bytearray(data)
    sof = out.index(b"\xff\xc0")
    out[sof + 5 : sof + 9] = side.to_bytes(2, "big") * 2
    return bytes(out)


def test_sequential_and_progressive_jpegs_are_told_apart():
    assert codec.jpeg_sequential(_jpeg(64, 48))
    assert not codec.jpeg_sequential(_jpeg(64, 48, progressive=True))
    assert not codec.jpeg_sequential(b"\xff\xd8\xff\xe0\x00")  # truncated: treated as decoding fully


def test_a_sequential_jpeg_is_bounded_by_its_decoded_size_and_its_header_by_a_factor():
    limit = 1000 * 1000
    # 1600x1200 (1.9 M pixels) is decoded at 1/8 scale, 200x150: allowed under a 1 M limit.
    assert codec.decode_image(_jpeg(1600, 1200), limit).shape == (32, 32, 3)
    # The same through Pillow (progressive) decodes fully: refused by the header.
    with pytest.raises(PayloadTooLarge, match="1600x1200 = 1920000 pixels; the limit is 1000000"):
        codec.decode_image(_jpeg(1600, 1200, progressive=True), limit)
    # A tiny file claiming a huge image walks every block even at 1/8 scale: bounded by a factor.
    tiny = _claiming(_jpeg(64, 64), 2048)  # 4.2 M pixels > 4 x 1 M
    with pytest.raises(PayloadTooLarge, match="limit for a sequential JPEG is 4 x max_image_pixels"):
        codec.decode_image(tiny, limit)
    # Decoded at a scale that still exceeds the limit (a model of a larger input): refused, saying so.
    with pytest.raises(PayloadTooLarge, match="decoded at 1600x1200"):
        codec.decode_image(_jpeg(1600, 1200), limit, size=(1200, 1600))


def test_the_request_budget_counts_jpegs_at_their_decoded_scale():
    budget = codec.PixelBudget(200 * 150 * 2)
    for _ in range(2):
        codec.decode_image(_jpeg(1600, 1200), 10**7, budget=budget)
    with pytest.raises(PayloadTooLarge, match="max_request_pixels"):
        codec.decode_image(_jpeg(1600, 1200), 10**7, budget=budget)
