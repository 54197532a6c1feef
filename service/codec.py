"""Request bytes → uint8 RGB pixels [32,32,3].

JPEG goes through simplejpeg (libjpeg-turbo, ~3x Pillow on small images, and it can decode large
photos straight to a smaller size in the DCT domain); PNG and everything else through Pillow.
Images that are not 32x32 are centre-cropped to a square and resized with Pillow's antialiased
bilinear filter — the same thing Triton/TorchServe image handlers do for a fixed-size model,
chosen over stretching because CIFAR-10's objects fill a square frame. Alpha is dropped and
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


def _fit(im: Image.Image) -> np.ndarray:
    if im.mode != "RGB":
        im = im.convert("RGB")
    w, h = im.size
    if (w, h) != (SIZE, SIZE):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
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


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded JPEG/PNG (or any format Pillow reads) → uint8 [32,32,3]. Raises InvalidInput
    for bytes that are not an image and PayloadTooLarge for images over ``max_pixels``."""
    if not data:
        raise InvalidInput("empty image")
    if data.startswith(JPEG_MAGIC):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            _check_pixels(width, height, max_pixels)
            if (width, height) == (SIZE, SIZE):
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=SIZE, min_width=SIZE)
            return _fit(Image.fromarray(pixels))
        except ValueError:
            pass  # progressive/CMYK/odd JPEGs that libjpeg-turbo's simple API refuses: try Pillow
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_pixels(im.width, im.height, max_pixels)
            im.draft("RGB", (SIZE, SIZE))  # JPEG only: decode at a reduced scale when possible
            return _fit(im)
    except (PayloadTooLarge, InvalidInput):
        raise
    except UnidentifiedImageError:  # Pillow's message names a BytesIO object, not the cause
        raise InvalidInput(
            f"not an image in a format the server reads ({len(data)} bytes starting {data[:8]!r}); "
            f"send {ACCEPTED_FORMATS}"
        ) from None
    except Exception as e:
        raise InvalidInput(f"cannot decode image: {type(e).__name__}: {e}") from None


def raw_to_image(data: bytes, height: int, width: int, max_pixels: int) -> np.ndarray:
    """Raw interleaved RGB uint8 bytes of ``height`` x ``width`` → uint8 [32,32,3]."""
    _check_pixels(width, height, max_pixels)
    if len(data) != height * width * 3:
        raise InvalidInput(f"raw image of {height}x{width} RGB needs {height * width * 3} bytes, got {len(data)}")
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    if (height, width) == (SIZE, SIZE):
        return pixels
    return _fit(Image.fromarray(pixels))


class Normalizer:
    """uint8 NHWC RGB → the model's float32 NCHW input, ``(x * scale - mean) / std`` per channel,
    folded at start-up into one multiply-add over the whole batch."""

    def __init__(self, scale: float, mean: list[float], std: list[float]) -> None:
        mean_a, std_a = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.mul = (scale / std_a).astype(np.float32)
        self.add = (-mean_a / std_a).astype(np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32)
        x *= self.mul
        x += self.add
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
