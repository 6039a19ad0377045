"""Decode an image file within a pixel budget, at no more resolution than the model needs.

Why this module exists: a lab's images are camera frames (a Raspberry Pi HQ
camera still is 4056x3040, an ALL-IDB field 2592x1944), while the model reads
128-224 px. Decoding a 12 MP JPEG in full costs ~100x the model's invoke and
~50 MB; JPEG's DCT scaling (Pillow's :meth:`~PIL.Image.Image.draft`) decodes
it at 1/2, 1/4 or 1/8 size for a fraction of that. Other formats are decoded in
full and immediately box-reduced (:meth:`~PIL.Image.Image.reduce`) before any
conversion, so the full-size buffer lives only for a moment.

The rule, used by every stage through :mod:`leukoedge.preprocess` so that
training, calibration, the parity gate and the device see the same pixels:

1. read the header; refuse absurd sides (:data:`MAX_SIDE`) and decompression
   bombs before any pixel is decoded;
2. JPEG only: ask the decoder for the smallest DCT scale that still gives at
   least ``min_size`` (``preprocess`` asks for twice the model input);
3. refuse what would still decode to more than ``max_pixels``
   (:data:`MAX_DECODE_PIXELS`, the stated pixel budget);
4. decode, then box-reduce by the largest whole factor (one for both axes)
   that keeps at least ``min_size`` (:func:`reduce_factor`);
5. apply the EXIF orientation on the small image.

Any failure inside Pillow or numpy -- and Pillow raises many types on damaged
files (``TypeError`` for a TIFF page without ``ImageWidth``, ``struct.error``,
``IndexError``, ``ZeroDivisionError`` ...) -- becomes
:class:`~leukoedge.errors.InvalidImageError` (or
:class:`~leukoedge.errors.ImageTooLargeError`), never an unhandled exception.

numpy + Pillow only: this runs on the Raspberry Pi.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

from PIL import Image, UnidentifiedImageError

from .errors import ImageTooLargeError, InvalidImageError

ImageSource = Union[str, Path, bytes, bytearray, memoryview, BinaryIO]

#: Longest side accepted in a header; a 1 x 10^7 strip is absurd even if its area is small.
MAX_SIDE = 20_000
#: The pixel budget: the most pixels decoded for one image, counted AFTER JPEG DCT
#: scaling (a 64 MP PNG, or a JPEG of up to Pillow's own 89 MP bomb limit that
#: scales down to 64 MP). Checked from the header, before any pixel is decoded.
MAX_DECODE_PIXELS = 64_000_000
#: JPEG DCT scales libjpeg offers (1/1 .. 1/8).
JPEG_SCALES = (8, 4, 2, 1)

#: Bytes per pixel of Pillow's own buffer for each mode (for the memory estimate).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
#: Modes that Image.reduce cannot average directly, and what they become first.
_REDUCIBLE_AS = {"1": "L", "P": "RGB", "PA": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I", "I;16N": "I"}
#: Errors Pillow and numpy raise on damaged data (besides the ones with a clear meaning).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, TypeError, KeyError, IndexError,
                  ZeroDivisionError, AttributeError, OverflowError, ArithmeticError, RuntimeError)


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, and what decoding it will cost.

    Attributes:
        format: Pillow's format name (``JPEG``, ``PNG``, ``TIFF``, ...).
        mode: Pillow's mode of the first frame (``RGB``, ``I;16``, ...).
        width, height: the stored size in pixels (before EXIF orientation).
        decode_width, decode_height: the size the decoder will produce
            (after DCT scaling; equal to the stored size for other formats).
        jpeg_scale: the DCT scale denominator used (1 = full size).
    """

    format: str | None
    mode: str
    width: int
    height: int
    decode_width: int
    decode_height: int
    jpeg_scale: int = 1

    @property
    def decode_pixels(self) -> int:
        return self.decode_width * self.decode_height

    @property
    def estimated_bytes(self) -> int:
        """Peak memory of decoding: Pillow's buffer, a mode conversion before reducing, the small result."""
        pixels = self.decode_pixels
        own = _BYTES_PER_PIXEL.get(self.mode, 4)
        convert = 4 if self.mode in _REDUCIBLE_AS else 0
        return pixels * (own + convert) + 1_000_000


def describe(source: ImageSource) -> str:
    """How a source is named in messages (uploads have no useful name here)."""
    if isinstance(source, (str, Path)):
        return str(source)
    return "uploaded image"


def as_stream(source: ImageSource) -> BinaryIO:
    """A seekable binary stream over any accepted source, or InvalidImageError saying why not."""
    name = describe(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InvalidImageError(f"{name}: the file is empty (0 bytes)")
        return io.BytesIO(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InvalidImageError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise InvalidImageError(f"{name}: is a directory, not an image") from None
        except OSError as err:
            raise InvalidImageError(f"{name}: cannot read ({err.strerror or err})") from None
        if not data:
            raise InvalidImageError(f"{name}: the file is empty (0 bytes)")
        return io.BytesIO(data)
    return source


class PendingImage:
    """An opened image whose header has been checked and whose pixels are not decoded yet.

    Use it as a context manager; :attr:`header` says what :meth:`decode` will cost,
    so a caller that shares memory between requests can wait for room first.
    """

    def __init__(self, img: Image.Image, header: ImageHeader, name: str, min_size: tuple[int, int] | None) -> None:
        self._img = img
        self.header = header
        self.name = name
        self._min_size = min_size
        #: (width, height) of the full image as displayed (EXIF orientation applied); set by decode().
        self.upright_size: tuple[int, int] = (header.width, header.height)

    def __enter__(self) -> "PendingImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._img is not None:
            self._img.close()
            self._img = None

    def decode(self) -> Image.Image:
        """The first frame, loaded, reduced towards ``min_size`` and EXIF-oriented."""
        if self._img is None:
            raise InvalidImageError(f"{self.name}: already decoded")
        img, self._img = self._img, None
        name = self.name
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img.seek(0)
                img.load()
                orientation = _orientation(img)
                if self._min_size is not None:
                    img = reduce_towards(img, _oriented_target(self._min_size, orientation))
                img = _orient(img, orientation, name)
                if orientation in (5, 6, 7, 8):
                    self.upright_size = (self.header.height, self.header.width)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
                raise ImageTooLargeError(f"{name}: too large to decode") from None
            except InvalidImageError:
                raise
            except _DECODE_ERRORS as err:
                raise InvalidImageError(f"{name}: truncated or corrupt image data ({_reason(err)})") from None
        if img.width <= 0 or img.height <= 0:
            raise InvalidImageError(f"{name}: image has no pixels ({img.width}x{img.height})")
        return img


def open_pending(source: ImageSource, *, min_size: tuple[int, int] | None = None,
                 max_pixels: int = MAX_DECODE_PIXELS) -> PendingImage:
    """Open ``source``, check its header and set up a reduced decode; no pixel is decoded yet.

    Args:
        source: bytes, a path or a binary file object.
        min_size: ``(height, width)`` the caller needs at least; JPEG DCT scaling and
            box reduction stop before going below it. None: full size.
        max_pixels: the pixel budget for what the decoder will produce.
    """
    name = describe(source)
    stream = as_stream(source)
    with warnings.catch_warnings():
        # Pillow warns (then errors) past its own bomb limit; we enforce ours.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(stream)
        except UnidentifiedImageError:
            raise InvalidImageError(f"{name}: not an image Pillow can read (JPEG, PNG, BMP, TIFF, ...)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLargeError(f"{name}: refused as a decompression bomb",
                                     hint="downscale the image before classifying it") from None
        except MemoryError:
            raise ImageTooLargeError(f"{name}: too large to open") from None
        except _DECODE_ERRORS as err:
            raise InvalidImageError(f"{name}: corrupt image header ({_reason(err)})") from None
        try:
            header = _plan(img, name, min_size, max_pixels)
        except (InvalidImageError, ImageTooLargeError):
            img.close()
            raise
        except _DECODE_ERRORS as err:
            img.close()
            raise InvalidImageError(f"{name}: corrupt image header ({_reason(err)})") from None
    return PendingImage(img, header, name, min_size)


def decode_image(source: ImageSource, *, min_size: tuple[int, int] | None = None,
                 max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """Open, check and decode in one call (see :func:`open_pending`)."""
    with open_pending(source, min_size=min_size, max_pixels=max_pixels) as pending:
        return pending.decode()


def read_header(source: ImageSource) -> dict:
    """Header facts (format, mode, size) without decoding pixels; typed errors on bad input.

    The frame count is read only where it is cheap and safe: a damaged later
    page of a TIFF makes Pillow raise on ``n_frames`` (issue 13), so it is
    reported as None then, and never needed for classification.
    """
    with open_pending(source, max_pixels=MAX_SIDE * MAX_SIDE) as pending:
        h = pending.header
        try:
            frames = int(getattr(pending._img, "n_frames", 1))
        except _DECODE_ERRORS:
            frames = None
        return {"format": h.format, "mode": h.mode, "width": h.width, "height": h.height, "frames": frames}


def reduce_factor(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The whole box-reduction factor, the same on both axes, that keeps at least ``target`` = (height, width).

    ``size`` is Pillow's ``(width, height)``. One factor for both axes keeps the
    aspect ratio, so thumbnails and heatmap overlays drawn from the reduced
    image look like the field; only the final resize stretches to the model.
    """
    (w, h), (th, tw) = size, target
    return max(1, min(w // max(1, tw), h // max(1, th)))


def reduce_towards(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Box-reduce a loaded image by a whole factor, keeping at least ``target`` (height, width)."""
    factor = reduce_factor(img.size, target)
    if factor == 1:
        return img
    mode = _REDUCIBLE_AS.get(img.mode)
    if mode == "RGB" and img.mode == "P" and "transparency" in img.info:
        mode = "RGBA"
    work = img.convert(mode) if mode else img
    out = work.reduce(factor)
    if img.mode.startswith("I;16"):
        out.info["bit_depth"] = 16  # to_rgb scales by the source's depth, not by the reduced image's max
    return out


def _plan(img: Image.Image, name: str, min_size: tuple[int, int] | None, max_pixels: int) -> ImageHeader:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{name}: image has no pixels ({width}x{height})")
    if max(width, height) > MAX_SIDE:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} pixels is too large (limit {MAX_SIDE} px per side)",
            hint="downscale the image before classifying it",
        )
    scale = 1
    if img.format == "JPEG" and min_size is not None:
        target_h, target_w = _oriented_target(min_size, _orientation(img))
        img.draft(img.mode, (max(1, target_w), max(1, target_h)))
        scale = max(1, round(width / img.size[0])) if img.size[0] else 1
    dw, dh = img.size
    if dw * dh > max_pixels:
        extra = " even at 1/8 size" if img.format == "JPEG" and min_size is not None else ""
        raise ImageTooLargeError(
            f"{name}: {width}x{height} pixels decodes to {dw * dh / 1e6:.0f} MP{extra}, "
            f"more than the {max_pixels / 1e6:.0f} MP this tool decodes at once",
            hint="downscale the image (or save it as JPEG, which decodes at reduced size) before classifying it",
        )
    return ImageHeader(format=img.format, mode=img.mode, width=width, height=height,
                       decode_width=dw, decode_height=dh, jpeg_scale=scale)


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1-8 (1 when absent or unreadable: a damaged EXIF block must not refuse the image)."""
    try:
        value = img.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _oriented_target(min_size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``min_size`` in stored-pixel terms: orientations 5-8 swap the axes on display."""
    h, w = min_size
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


#: EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _orient(img: Image.Image, orientation: int, name: str) -> Image.Image:
    """Upright by the orientation read before reducing (a reduced copy has no EXIF of its own)."""
    method = _TRANSPOSE.get(orientation)
    if method is None:
        return img
    try:
        return img.transpose(method)
    except _DECODE_ERRORS as err:
        raise InvalidImageError(f"{name}: cannot apply the EXIF orientation ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}"[:200] if text else type(err).__name__


__all__ = ["ImageHeader", "PendingImage", "open_pending", "decode_image", "read_header", "reduce_factor",
           "reduce_towards", "MAX_SIDE", "MAX_DECODE_PIXELS"]
