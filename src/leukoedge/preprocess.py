"""The ONE preprocessing path: decode, orient, RGB, resize, uint8.

Training, calibration, the parity gate and the device all call
:func:`load_image` / :func:`prepare`, so the pixels the device feeds its model
are byte-for-byte the pixels the model was trained and validated on. Pure
numpy + Pillow: no TensorFlow, no OpenCV, no normalisation constants (scaling
to [0, 1] happens inside the model's ``Rescaling`` layer).

An optional colour step (``PreprocessSpec.colour``) runs after the resize:
grayscale, Reinhard or Macenko normalisation to the fixed references in
:mod:`leukoedge.stain`. It exists because a model can score ~99 % on Taleqani
by reading stain and capture colour instead of cells (issue 7); normalising
here, in the one path, means the device removes exactly the colour variation
training removed. It runs on the small resized image, so it costs little on a Pi.

What can fail, always as :class:`~leukoedge.errors.InvalidImageError` (or its
subclass :class:`~leukoedge.errors.ImageTooLargeError`) with a message that
says why: empty input, not an image, truncated or corrupt data, absurd
dimensions, decompression bombs.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import stain
from .errors import ImageTooLargeError, InvalidImageError, UsageError

ImageSource = Union[str, Path, bytes, bytearray, BinaryIO]

#: Largest image accepted, in pixels (a 8000 x 8000 whole-slide tile is 64 MP).
#: Checked from the header, before any pixel is decoded.
MAX_PIXELS = 64_000_000
#: Longest side accepted; a 1 x 10^7 strip is absurd even if its area is small.
MAX_SIDE = 20_000

#: The one resize filter. Bilinear with Pillow's antialiasing support is
#: deterministic, fast on a Pi and smooth when shrinking camera stills.
RESIZE_METHOD = "bilinear"
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR}

#: Colour steps, applied after the resize (see :func:`apply_colour`).
COLOUR_STEPS = {
    "as-captured": "pixels as the camera delivered them",
    "grayscale": "BT.601 luma copied to all three channels: the model cannot read colour",
    "reinhard": "per-image CIELAB mean/std mapped to a fixed Taleqani reference (Reinhard 2001)",
    "macenko": "per-image stain vectors and concentrations mapped to a fixed reference (Macenko 2009)",
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw images become model input; travels inside every bundle.

    Attributes:
        height: model input height in pixels.
        width: model input width in pixels.
        resize_method: the fixed resize filter (only ``"bilinear"``).
        color_order: channel order fed to the model (only ``"RGB"``).
        fit: how the aspect ratio is handled (only ``"stretch"``: the whole
            field of view is kept, no cells are cropped away).
        colour: colour step after the resize, one of :data:`COLOUR_STEPS`
            (``"as-captured"`` = none; bundles without the field mean that).
    """

    height: int
    width: int
    resize_method: str = RESIZE_METHOD
    color_order: str = "RGB"
    fit: str = "stretch"
    colour: str = "as-captured"

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8 or self.height > 4096 or self.width > 4096:
            raise UsageError(f"input size {self.height}x{self.width} is outside 8..4096 pixels")
        if self.resize_method not in _RESAMPLE:
            raise UsageError(f"unknown resize method {self.resize_method!r}; use one of {sorted(_RESAMPLE)}")
        if self.color_order != "RGB":
            raise UsageError(f"colour order {self.color_order!r} is not supported; only RGB")
        if self.fit != "stretch":
            raise UsageError(f"fit {self.fit!r} is not supported; only 'stretch'")
        if self.colour not in COLOUR_STEPS:
            raise UsageError(f"unknown colour step {self.colour!r}; use one of {', '.join(COLOUR_STEPS)}")

    @classmethod
    def square(cls, size: int, colour: str = "as-captured") -> "PreprocessSpec":
        return cls(height=int(size), width=int(size), colour=colour)

    def geometry_only(self) -> "PreprocessSpec":
        """The same spec without the colour step (the shortcut audit perturbs pixels before it)."""
        return replace(self, colour="as-captured")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return (self.height, self.width)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        known = {"height", "width", "resize_method", "color_order", "fit", "colour"}
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"unknown preprocessing fields {sorted(unknown)}")
        return cls(**{k: data[k] for k in known if k in data})


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return "uploaded image"


def open_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, validate and fully decode the first frame of an image.

    The size is checked from the header before decoding, so a decompression
    bomb costs nothing. Multi-page TIFFs give their first page. The returned
    image is loaded (no lazy file handle) and EXIF-oriented.
    """
    name = _describe(source)
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise InvalidImageError(f"{name}: the file is empty (0 bytes)")
        stream: BinaryIO = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
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
        stream = io.BytesIO(data)
    else:
        stream = source
    with warnings.catch_warnings():
        # Pillow warns (then errors) past its own bomb limit; we enforce ours.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(stream)
        except UnidentifiedImageError:
            raise InvalidImageError(f"{name}: not an image Pillow can read (JPEG, PNG, BMP, TIFF, ...)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLargeError(f"{name}: refused as a decompression bomb") from None
        except (OSError, ValueError, SyntaxError) as err:
            raise InvalidImageError(f"{name}: corrupt image header ({err})") from None
        _check_dimensions(img, name, max_pixels)
        try:
            img.seek(0)
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLargeError(f"{name}: refused as a decompression bomb") from None
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise InvalidImageError(f"{name}: truncated or corrupt image data ({err})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001 - Pillow raises many types on bad EXIF
        raise InvalidImageError(f"{name}: unreadable EXIF orientation ({err})") from None
    return img


def _check_dimensions(img: Image.Image, name: str, max_pixels: int) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{name}: image has no pixels ({width}x{height})")
    if max(width, height) > MAX_SIDE or width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} pixels is too large "
            f"(limit {MAX_SIDE} px per side and {max_pixels / 1e6:.0f} MP)",
            hint="downscale the image before classifying it",
        )


def to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to uint8 RGB, explicitly per mode.

    - 16-bit and 32-bit integer grayscale (``I;16``, ``I``): scaled by the
      image's bit depth (not its own max, which would change contrast per
      image) to 8 bits, then replicated to three channels.
    - float (``F``): assumed in [0, 1] if its max is <= 1, else [0, 255].
    - transparency (``RGBA``, ``LA``, ``PA``, palettes with alpha): composited
      over white, the colour of an empty microscope field.
    - everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...) through
      Pillow's own conversion.
    """
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        scale = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        gray = np.clip(arr * 255 // scale, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        peak = 1.0 if np.nanmax(arr) <= 1.0 else 255.0
        gray = np.clip(np.nan_to_num(arr) / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def resize(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize a uint8 HxWx3 array to the spec's input size with the one method."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidImageError(f"expected a uint8 HxWx3 array, got {rgb.dtype} {rgb.shape}")
    if rgb.shape[:2] == spec.size:
        return np.ascontiguousarray(rgb)
    img = Image.fromarray(rgb, mode="RGB")
    out = img.resize((spec.width, spec.height), resample=_RESAMPLE[spec.resize_method])
    return np.asarray(out, dtype=np.uint8)


def prepare(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Model input from an already-decoded RGB frame (e.g. a camera array).

    Accepts uint8 HxWx3 (RGB) or HxW (grayscale) arrays; anything else is
    refused rather than guessed.
    """
    arr = np.asarray(rgb)
    if arr.ndim == 2 and arr.dtype == np.uint8:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 4 and arr.dtype == np.uint8:
        return prepare(to_rgb(Image.fromarray(arr, mode="RGBA")), spec)
    return apply_colour(resize(arr, spec), spec)


def apply_colour(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The spec's colour step on an already-resized uint8 HxWx3 array (identity for ``as-captured``)."""
    if spec.colour == "as-captured":
        return rgb
    if spec.colour == "grayscale":
        return stain.grayscale(rgb)
    if spec.colour == "reinhard":
        return stain.reinhard_normalize(rgb)
    return stain.macenko_normalize(rgb)


def load_image(source: ImageSource, spec: PreprocessSpec | None = None, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode any supported image to uint8 RGB, resized to ``spec`` if given.

    This is the function every stage calls on a file or upload.
    """
    rgb = to_rgb(open_image(source, max_pixels=max_pixels))
    return apply_colour(resize(rgb, spec), spec) if spec is not None else rgb


def describe_image(source: ImageSource) -> dict:
    """Header facts (format, mode, size, frames) without decoding pixels."""
    img = None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(source if not isinstance(source, (bytes, bytearray)) else io.BytesIO(source))
            return {
                "format": img.format,
                "mode": img.mode,
                "width": img.size[0],
                "height": img.size[1],
                "frames": getattr(img, "n_frames", 1),
            }
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise InvalidImageError(f"{_describe(source)}: not a readable image ({err})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLargeError(f"{_describe(source)}: refused as a decompression bomb") from None
        finally:
            if img is not None:
                img.close()
