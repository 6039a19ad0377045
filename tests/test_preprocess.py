"""The one preprocessing path on every image mode and every kind of bad input."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from leukoedge.errors import ImageTooLargeError, InvalidImageError, UsageError
from leukoedge.preprocess import PreprocessSpec, describe_image, load_image, prepare
from real_images import png_header_only

SPEC = PreprocessSpec.square(32)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(mode_size=(40, 30)) -> np.ndarray:
    w, h = mode_size
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :].repeat(h, 0)
    return np.stack([x, x[::-1, ::-1], np.full_like(x, 128)], axis=2).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF"])
def test_rgb_formats_decode_to_uint8_rgb_of_the_model_size(fmt):
    out = load_image(_encode(Image.fromarray(_gradient()), fmt), SPEC)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "LA", "RGBA", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    img = Image.fromarray(_gradient()).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    out = load_image(_encode(img, fmt), SPEC)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_grayscale_is_replicated_to_three_equal_channels():
    out = load_image(_encode(Image.fromarray(_gradient()[:, :, 0]), "PNG"))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_rgba_is_composited_over_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red, but fully transparent
    out = load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (out == 255).all()


def test_16_bit_tiff_is_scaled_by_bit_depth_not_by_its_own_max():
    arr = np.full((10, 10), 32768, dtype=np.uint16)
    arr[0, 0] = 65535
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = load_image(_encode(img, "TIFF"))
    assert out[5, 5, 0] == 127 and out[0, 0, 0] == 255


def test_multipage_tiff_gives_the_first_page():
    first = Image.fromarray(np.full((10, 10, 3), 10, np.uint8))
    second = Image.fromarray(np.full((10, 10, 3), 240, np.uint8))
    buf = io.BytesIO()
    first.save(buf, format="TIFF", save_all=True, append_images=[second])
    assert describe_image(buf.getvalue())["frames"] == 2
    assert load_image(buf.getvalue()).mean() == pytest.approx(10, abs=1)


def test_exif_orientation_is_applied():
    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = load_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.shape[:2] == (40, 20)


def test_resize_is_deterministic_box_reduce_then_bilinear():
    """Larger than twice the input: box reduction by a whole factor (min(200//64, 150//64) = 2), then bilinear."""
    data = _encode(Image.fromarray(_gradient((200, 150))), "PNG")
    a, b = load_image(data, SPEC), load_image(data, SPEC)
    assert np.array_equal(a, b)
    ref = np.asarray(Image.fromarray(_gradient((200, 150))).reduce(2).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(a, ref)
    # A camera array of the same pixels takes the same path.
    assert np.array_equal(prepare(_gradient((200, 150)), SPEC), a)
    # Up to twice the input size there is no reduction: plain bilinear.
    small = _gradient((60, 50))
    plain = np.asarray(Image.fromarray(small).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(load_image(_encode(Image.fromarray(small), "PNG"), SPEC), plain)


def test_prepare_accepts_camera_arrays():
    frame = _gradient((64, 48))
    assert prepare(frame, SPEC).shape == (32, 32, 3)
    assert prepare(frame[:, :, 0], SPEC).shape == (32, 32, 3)
    with pytest.raises(InvalidImageError):
        prepare(frame.astype(np.float32), SPEC)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "empty"),
        (b"hello, I am a text file\n", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "image"),
    ],
)
def test_bad_bytes_raise_typed_errors(data, words):
    with pytest.raises(InvalidImageError) as err:
        load_image(data)
    assert words in str(err.value)


def test_truncated_jpeg_is_refused():
    data = _encode(Image.fromarray(_gradient((300, 300))), "JPEG", quality=95)
    with pytest.raises(InvalidImageError) as err:
        load_image(data[: len(data) // 2])
    assert "truncated" in str(err.value) or "corrupt" in str(err.value)


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageTooLargeError):
        load_image(png_header_only(30000, 30000))


def test_absurd_side_is_refused():
    with pytest.raises(ImageTooLargeError):
        load_image(png_header_only(1, 25000))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InvalidImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(InvalidImageError, match="directory"):
        load_image(tmp_path)


def test_spec_round_trip_and_validation():
    spec = PreprocessSpec(height=96, width=128)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(UsageError):
        PreprocessSpec(height=96, width=96, resize_method="nearest")
    with pytest.raises(UsageError):
        PreprocessSpec.from_dict({"height": 9, "width": 9, "mean": 0.5})
