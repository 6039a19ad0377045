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

from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image

from . import stain
from .decode import MAX_DECODE_PIXELS, MAX_SIDE, ImageSource, decode_image, read_header, reduce_towards
from .errors import InvalidImageError, UsageError

__all__ = ["PreprocessSpec", "ImageSource", "open_image", "load_image", "prepare", "resize", "apply_colour",
           "to_rgb", "describe_image", "decode_size", "MAX_PIXELS", "MAX_SIDE", "OVERSAMPLE", "COLOUR_STEPS"]

#: Largest image decoded, in pixels (a 8000 x 8000 whole-slide tile is 64 MP), counted
#: after JPEG DCT scaling; checked from the header, before any pixel is decoded.
MAX_PIXELS = MAX_DECODE_PIXELS
#: Sources are decoded (JPEG DCT scaling) and box-reduced to no less than this many
#: times the model input before the final bilinear resize.
OVERSAMPLE = 2

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
        um_per_px: micrometres per pixel of the training images as they were
            stored (before the resize; measured from red cells by
            :mod:`leukoedge.scale` or given by the user), or None when unknown
            (bundles made before it existed). Training never uses it: the
            training images define the scale. The device uses it to bring a
            capture to the training magnification before tiling it.
        field_um: (height, width) in micrometres of the field a typical
            (median) training image shows, i.e. what one model input covers;
            None when ``um_per_px`` is None. One tile of a capture covers this.
    """

    height: int
    width: int
    resize_method: str = RESIZE_METHOD
    color_order: str = "RGB"
    fit: str = "stretch"
    colour: str = "as-captured"
    um_per_px: float | None = None
    field_um: tuple[float, float] | None = None

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
        if self.um_per_px is not None:
            um = _positive_finite(self.um_per_px, "um_per_px")
            object.__setattr__(self, "um_per_px", um)
            if self.field_um is None:
                object.__setattr__(self, "field_um", (um * self.height, um * self.width))
        if self.field_um is not None:
            if self.um_per_px is None:
                raise UsageError("field_um is given without um_per_px")
            if len(self.field_um) != 2:
                raise UsageError(f"field_um must be [height, width] in micrometres, got {self.field_um!r}")
            object.__setattr__(self, "field_um", tuple(_positive_finite(v, "field_um") for v in self.field_um))

    @property
    def input_um_per_px(self) -> tuple[float, float] | None:
        """Micrometres per model-input pixel (height, width): the scale a tile is resampled to."""
        if self.field_um is None:
            return None
        return (self.field_um[0] / self.height, self.field_um[1] / self.width)

    def with_scale(self, um_per_px: float | None, source_size: tuple[int, int] | None = None) -> "PreprocessSpec":
        """This spec with a training scale: ``um_per_px`` of images of ``source_size`` (h, w) pixels.

        Without ``source_size`` the images are taken to be stored at the input size.
        """
        if um_per_px is None:
            return replace(self, um_per_px=None, field_um=None)
        h, w = source_size or self.size
        um = _positive_finite(um_per_px, "um_per_px")
        return replace(self, um_per_px=um, field_um=(um * h, um * w))

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
        out = asdict(self)
        out["field_um"] = list(self.field_um) if self.field_um is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        known = {"height", "width", "resize_method", "color_order", "fit", "colour", "um_per_px", "field_um"}
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"unknown preprocessing fields {sorted(unknown)}")
        values = {k: data[k] for k in known if k in data}
        if values.get("field_um") is not None:
            if not isinstance(values["field_um"], (list, tuple)):
                raise UsageError(f"field_um must be [height, width] in micrometres, got {values['field_um']!r}")
            values["field_um"] = tuple(values["field_um"])
        return cls(**values)


def _positive_finite(value, name: str) -> float:
    """A positive finite float, or a UsageError naming the field."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    if not (out > 0 and out < 1e4):  # also false for NaN
        raise UsageError(f"{name} must be a positive number of micrometres below 10,000, got {value!r}")
    return out


def open_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS,
               min_size: tuple[int, int] | None = None) -> Image.Image:
    """Open, validate and decode the first frame of an image (see :mod:`leukoedge.decode`).

    The size is checked from the header before decoding, so a decompression
    bomb costs nothing. Multi-page TIFFs give their first page. The returned
    image is loaded (no lazy file handle) and EXIF-oriented. With ``min_size``
    (height, width) a JPEG is decoded at the smallest DCT scale, and any image
    box-reduced by whole factors, that still give at least that size.
    """
    return decode_image(source, min_size=min_size, max_pixels=max_pixels)


def decode_size(spec: PreprocessSpec) -> tuple[int, int]:
    """The least (height, width) a source is decoded at for ``spec``: :data:`OVERSAMPLE` x the input.

    Decoding at twice the input, then resizing, keeps the bilinear resize's
    anti-aliasing meaningful while skipping most of a camera frame's pixels.
    """
    return (spec.height * OVERSAMPLE, spec.width * OVERSAMPLE)


def to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to uint8 RGB, explicitly per mode.

    - 16-bit and 32-bit integer grayscale (``I;16``, ``I``): scaled by the
      image's bit depth (not its own max, which would change contrast per
      image) to 8 bits, then replicated to three channels. A 16-bit image
      box-reduced on decode arrives as ``I`` with ``info["bit_depth"] == 16``.
    - float (``F``): assumed in [0, 1] if its max is <= 1, else [0, 255].
    - transparency (``RGBA``, ``LA``, ``PA``, palettes with alpha): composited
      over white, the colour of an empty microscope field.
    - everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...) through
      Pillow's own conversion.

    Any failure of a damaged image here is an :class:`InvalidImageError`.
    """
    try:
        return _to_rgb(img)
    except (ValueError, TypeError, OSError, OverflowError, IndexError) as err:
        raise InvalidImageError(f"cannot convert a {img.mode} image to RGB ({type(err).__name__}: {err})") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        sixteen = mode.startswith("I;16") or img.info.get("bit_depth") == 16
        scale = 65535 if sixteen or arr.max(initial=0) > 255 else 255
        gray = np.empty(arr.shape, np.uint8)
        for r in range(0, arr.shape[0], 1024):  # row blocks: a 64 MP frame never needs 8 bytes per pixel
            gray[r:r + 1024] = np.clip(arr[r:r + 1024].astype(np.int64) * 255 // scale, 0, 255)
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
    """Resize a uint8 HxWx3 array to the spec's input size with the one method.

    An array larger than :func:`decode_size` is first box-reduced by a whole
    factor (as a file is on decode), so a camera array and the same pixels
    saved as PNG give identical model input.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidImageError(f"expected a uint8 HxWx3 array, got {rgb.dtype} {rgb.shape}")
    if rgb.shape[:2] == spec.size:
        return np.ascontiguousarray(rgb)
    img = reduce_towards(Image.fromarray(np.ascontiguousarray(rgb), mode="RGB"), decode_size(spec))
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


def decode_rgb(source: ImageSource, spec: PreprocessSpec | None = None, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 RGB at the least resolution ``spec`` needs (:func:`decode_size`), or in full without a spec.

    What the app stores and displays beside the result; :func:`prepare` of it
    gives exactly :func:`load_image`'s pixels.
    """
    return to_rgb(open_image(source, max_pixels=max_pixels, min_size=decode_size(spec) if spec else None))


def load_image(source: ImageSource, spec: PreprocessSpec | None = None, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode any supported image to uint8 RGB, resized to ``spec`` if given.

    This is the function every stage calls on a file or upload. With a spec, a
    large JPEG is decoded at reduced size (DCT scaling) and any large image
    box-reduced before the resize, so a 12 MP camera frame costs little more
    than a small image.
    """
    rgb = decode_rgb(source, spec, max_pixels=max_pixels)
    return apply_colour(resize(rgb, spec), spec) if spec is not None else rgb


def describe_image(source: ImageSource) -> dict:
    """Header facts (format, mode, width, height, frames) without decoding pixels.

    ``frames`` is None when a later page of a multi-page file is damaged.
    """
    return read_header(source)
