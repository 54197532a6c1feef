"""Request bytes → uint8 RGB pixels [H,W,3] at the model's size (32x32 for the bundled model).

JPEG goes through simplejpeg (libjpeg-turbo, ~3x Pillow on small images, and it can decode large
photos straight to a smaller size in the DCT domain); PNG and everything else through Pillow.
Images of another size are centre-cropped to the model's aspect ratio (a square for CIFAR-10)
and resized with Pillow's antialiased bilinear filter — the same thing Triton/TorchServe image
handlers do for a fixed-size model, chosen over stretching because CIFAR-10's objects fill a
square frame. Alpha is dropped and
greyscale/palette images are converted to RGB.

Decoding is bounded against decompression bombs: the header's width x height is checked against
``max_pixels`` before any pixel is decoded.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge

SIZE = 32
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Pillow raises DecompressionBombError only above 2x its own limit; we check sizes ourselves.
Image.MAX_IMAGE_PIXELS = None
Image.init()  # register every format plugin now, so the list below is complete
#: What an error about unreadable bytes tells the client: the tested formats first, then the
#: other common ones this Pillow reads.
ACCEPTED_FORMATS = (
    "JPEG or PNG (also " + ", ".join(f for f in ("GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA") if f in Image.OPEN) + ")"
)


Size = tuple[int, int]  # (height, width)
DEFAULT_SIZE: Size = (SIZE, SIZE)


def _fit(im: Image.Image, size: Size = DEFAULT_SIZE) -> np.ndarray:
    if im.mode != "RGB":
        im = im.convert("RGB")
    th, tw = size
    w, h = im.size
    if (w, h) != (tw, th):
        # The largest centred box of the target's aspect ratio (a square for a square model).
        if w * th >= h * tw:
            ch, cw = h, round(h * tw / th)
        else:
            ch, cw = round(w * th / tw), w
        left, top = (w - cw) // 2, (h - ch) // 2
        im = im.resize((tw, th), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    return np.asarray(im, dtype=np.uint8)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")


def peek_pixels(data: bytes) -> int | None:
    """width x height from a PNG or JPEG header without decoding (None: unknown format or
    unreadable header). Lets the caller choose where to decode before paying for it."""
    if data.startswith(PNG_MAGIC) and len(data) >= 24:
        return int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")
    if data.startswith(JPEG_MAGIC):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return None
        return height * width
    return None


def decode_image(data: bytes, max_pixels: int, size: Size = DEFAULT_SIZE) -> np.ndarray:
    """Encoded JPEG/PNG (or any format Pillow reads) → uint8 [H,W,3] at ``size`` (height, width).
    Raises InvalidInput for bytes that are not an image and PayloadTooLarge for images over
    ``max_pixels``."""
    th, tw = size
    if not data:
        raise InvalidInput("empty image")
    if data.startswith(JPEG_MAGIC):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            _check_pixels(width, height, max_pixels)
            if (width, height) == (tw, th):
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=th, min_width=tw)
            return _fit(Image.fromarray(pixels), size)
        except ValueError:
            pass  # progressive/CMYK/odd JPEGs that libjpeg-turbo's simple API refuses: try Pillow
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_pixels(im.width, im.height, max_pixels)
            im.draft("RGB", (tw, th))  # JPEG only: decode at a reduced scale when possible
            return _fit(im, size)
    except (PayloadTooLarge, InvalidInput):
        raise
    except UnidentifiedImageError:  # Pillow's message names a BytesIO object, not the cause
        raise InvalidInput(
            f"not an image in a format the server reads ({len(data)} bytes starting {data[:8]!r}); "
            f"send {ACCEPTED_FORMATS}"
        ) from None
    except Exception as e:
        raise InvalidInput(f"cannot decode image: {type(e).__name__}: {e}") from None


def raw_to_image(data: bytes, height: int, width: int, max_pixels: int, size: Size = DEFAULT_SIZE) -> np.ndarray:
    """Raw interleaved RGB uint8 bytes of ``height`` x ``width`` → uint8 [H,W,3] at ``size``."""
    _check_pixels(width, height, max_pixels)
    if len(data) != height * width * 3:
        raise InvalidInput(f"raw image of {height}x{width} RGB needs {height * width * 3} bytes, got {len(data)}")
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    if (height, width) == tuple(size):
        return pixels
    return _fit(Image.fromarray(pixels), size)
