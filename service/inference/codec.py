"""Request bytes → uint8 RGB pixels [H,W,3] at the model's size (32x32 for the bundled model).

JPEG goes through simplejpeg (libjpeg-turbo, ~3x Pillow on small images, and it can decode large
photos straight to a smaller size in the DCT domain); PNG and everything else through Pillow.
Images of another size are centre-cropped to the model's aspect ratio (a square for CIFAR-10)
and resized with Pillow's antialiased bilinear filter — the same thing Triton/TorchServe image
handlers do for a fixed-size model, chosen over stretching because CIFAR-10's objects fill a
square frame. Alpha is dropped and
greyscale/palette images are converted to RGB.

Decoding is bounded against decompression bombs: the header's width x height is checked against
``max_pixels`` before any pixel is decoded, and a request's images draw on one ``PixelBudget``.
PNG text chunks (which Pillow inflates inside ``Image.open``) are capped so that the cost of opening
a PNG stays bounded by its size in bytes.

EXIF orientation is applied (as ``ImageOps.exif_transpose`` would), so a photo is classified as it
is shown, not as its sensor stored it.
"""

from __future__ import annotations

import io
import math

import numpy as np
import simplejpeg
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge

SIZE = 32
Size = tuple[int, int]  # (height, width)
DEFAULT_SIZE: Size = (SIZE, SIZE)
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
# Pillow inflates zTXt/iTXt/iCCP chunks while opening a PNG, by default up to 1 MB each and 64 MB in
# all: a 60 KB file could cost ~100 ms. These caps bound it to ~0.3 ms; PNGs with more text than
# this are refused (400) — image data is never text.
PngImagePlugin.MAX_TEXT_CHUNK = 64 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 256 * 1024
# A sequential JPEG decoded at 1/8 scale still walks every 8x8 block of the full image: measured
# here, a 700-byte file whose header says 8192x8192 costs 0.06 s at that scale (a 16.7 Mpixel
# lossless WebP, allowed by default, costs ~0.3 s), one that says 32000x32000 0.5 s. So its header
# may hold this many times max_image_pixels (default 67 Mpixels: 50 MP phone photos), no more.
SEQUENTIAL_JPEG_FACTOR = 4
EXIF_ORIENTATION = 0x0112
APP1 = 0xE1


class PixelBudget:
    """Pixels one request may still decode, summed over its images."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def spend(self, pixels: int) -> None:
        if pixels > self.left:
            raise PayloadTooLarge(
                f"the request's images add up to more than {self.limit} decoded pixels (max_request_pixels)"
            )
        self.left -= pixels


def jpeg_decoded_pixels(width: int, height: int, size: Size = DEFAULT_SIZE) -> int:
    """Pixels libjpeg-turbo produces for a JPEG decoded at the smallest n/8 scale that keeps both
    sides at least ``size`` (height, width)."""
    dw, dh = _jpeg_decoded_size(width, height, size)
    return dw * dh


def jpeg_sequential(data: bytes) -> bool:
    """Whether a JPEG is sequential (baseline or extended Huffman, SOF0/SOF1), from its frame
    header. libjpeg-turbo decodes those a row of blocks at a time, so at a reduced scale their cost
    is the decoded pixels plus entropy decoding bounded by the file's size. Progressive and other
    JPEGs hold every coefficient of the full image in memory (2 bytes a sample), so they are
    bounded by the header's pixel count; so is anything this scan does not understand."""
    pos, end = 2, min(len(data), 1024 * 1024)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            return marker in (0xC0, 0xC1)
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in (0xDA, 0xD9) or length < 2:  # scan or end before any frame header
            return False
        pos += 2 + length
    return False


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of a JPEG from its APP1 segment; 1 when there is none. Reads only
    the marker segments before the image data (bounded by the bytes received)."""
    if data.find(b"Exif\x00\x00", 2, 256 * 1024) < 0:  # EXIF sits in the first marker segments
        return 1
    pos, end = 2, len(data)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == APP1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            exif = Image.Exif()
            try:
                exif.load(data[pos + 4 : pos + 2 + length])
                value = exif.get(EXIF_ORIENTATION, 1)
            except Exception:
                return 1  # unreadable EXIF: show as stored
            return value if isinstance(value, int) and 1 <= value <= 8 else 1
        if marker in (0xDA, 0xD9) or length < 2:  # start of scan / end of image: no EXIF before the pixels
            return 1
        pos += 2 + length
    return 1


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """[h,w,3] pixels as shown under EXIF ``orientation``: what ``ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:
        return pixels.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(pixels, -1)
    if orientation == 7:
        return pixels[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(pixels, 1)
    return pixels


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


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _fit_array(pixels: np.ndarray, size: Size = DEFAULT_SIZE) -> np.ndarray:
    if pixels.shape[:2] == tuple(size):
        return pixels
    return _fit(Image.fromarray(np.ascontiguousarray(pixels)), size)


def _check_pixels(width: int, height: int, max_pixels: int, decoded: tuple[int, int] | None = None) -> None:
    """Refuse an image whose decoding would produce more than ``max_pixels``: ``decoded`` is the
    (width, height) a sequential JPEG is decoded at (after draft scaling), else the full size."""
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image has no pixels ({width}x{height})")
    if decoded and width * height > SEQUENTIAL_JPEG_FACTOR * max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit for a sequential JPEG is "
            f"{SEQUENTIAL_JPEG_FACTOR} x max_image_pixels = {SEQUENTIAL_JPEG_FACTOR * max_pixels}"
        )
    dw, dh = decoded or (width, height)
    if dw * dh > max_pixels:
        scaled = f", decoded at {dw}x{dh} = {dw * dh}" if decoded else f" = {width * height}"
        raise PayloadTooLarge(f"image is {width}x{height}{scaled} pixels; the limit is {max_pixels}")


def _jpeg_decoded_size(width: int, height: int, size: Size) -> tuple[int, int]:
    th, tw = size
    n = min(8, max(1, math.ceil(8 * th / max(1, height)), math.ceil(8 * tw / max(1, width))))
    return math.ceil(width * n / 8), math.ceil(height * n / 8)


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


def decode_image(
    data: bytes, max_pixels: int, size: Size = DEFAULT_SIZE, budget: PixelBudget | None = None
) -> np.ndarray:
    """Encoded JPEG/PNG (or any format Pillow reads) → uint8 [H,W,3] at ``size`` (height, width),
    EXIF orientation applied. Raises InvalidInput for bytes that are not an image and
    PayloadTooLarge for images over ``max_pixels`` or past the request's ``budget``."""
    th, tw = size
    if not data:
        raise InvalidInput("empty image")
    if data.startswith(JPEG_MAGIC):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            height = width = 0  # progressive/CMYK/odd JPEGs that libjpeg-turbo's simple API refuses: Pillow
        if height and width:
            # A camera's 24 MP photo is decoded at 1/8 scale (750x500): bounded by what that costs.
            sequential = jpeg_sequential(data)
            _check_pixels(width, height, max_pixels, _jpeg_decoded_size(width, height, size) if sequential else None)
            if budget is not None:
                budget.spend(jpeg_decoded_pixels(width, height, size))
            try:
                if (width, height) == (tw, th):
                    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
                else:
                    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=th, min_width=tw)
            except ValueError:
                pixels = None
            if pixels is not None:
                return _fit_array(orient(pixels, jpeg_orientation(data)), size)
            if budget is not None:  # charged again below, at Pillow's own scale
                budget.left += jpeg_decoded_pixels(width, height, size)
    try:
        with Image.open(io.BytesIO(data)) as im:
            full = (im.width, im.height)
            # A sequential JPEG is bounded at the scale it is decoded at, anything else by its header.
            sequential = im.format == "JPEG" and jpeg_sequential(data)
            if not sequential:
                _check_pixels(im.width, im.height, max_pixels)
            im.draft("RGB", (tw, th))  # JPEG only: decode at a reduced scale when possible
            if sequential:
                _check_pixels(*full, max_pixels, decoded=im.size)
            if budget is not None:
                budget.spend(im.width * im.height)
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            if isinstance(orientation, int) and 2 <= orientation <= 8:
                return _fit(im.transpose(_TRANSPOSE[orientation]), size)
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


def raw_to_image(
    data: bytes, height: int, width: int, max_pixels: int, size: Size = DEFAULT_SIZE, budget: PixelBudget | None = None
) -> np.ndarray:
    """Raw interleaved RGB uint8 bytes of ``height`` x ``width`` → uint8 [H,W,3] at ``size``."""
    _check_pixels(width, height, max_pixels)
    if budget is not None:
        budget.spend(width * height)
    if len(data) != height * width * 3:
        raise InvalidInput(f"raw image of {height}x{width} RGB needs {height * width * 3} bytes, got {len(data)}")
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    if (height, width) == tuple(size):
        return pixels
    return _fit(Image.fromarray(pixels), size)
