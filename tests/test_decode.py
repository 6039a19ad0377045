"""Decoding real-size images: reduced-size JPEG decode, the pixel budget, damaged files (issue 13).

Camera frames are 5-12 MP; the model reads 32-224 px. These tests use
real-size files (12 MP JPEG, 5 MP TIFF, 16-bit TIFF, PNG) and check that the
reduced decode is used, stays close to a full decode, keeps orientation and
bit depth, refuses what is over the pixel budget before decoding, and turns
every Pillow failure on a damaged file into the typed error.
"""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from leukoedge.decode import MAX_DECODE_PIXELS, open_pending
from leukoedge.errors import ImageTooLargeError, InvalidImageError
from leukoedge.preprocess import PreprocessSpec, decode_size, describe_image, load_image, prepare
from real_images import (FIELD_5MP, HQ_FRAME, camera_frame, encode, gray16, png_header_only, tiff_without_width_on_page,
                         two_page_tiff)

SPEC = PreprocessSpec.square(160)


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return camera_frame(HQ_FRAME)


@pytest.fixture(scope="module")
def frame_jpeg(frame) -> bytes:
    return encode(frame, "JPEG", quality=90)


def test_12mp_jpeg_is_decoded_at_one_eighth_and_matches_a_full_decode(frame, frame_jpeg):
    assert len(frame_jpeg) > 500_000  # a real camera-size file, not a thumbnail
    with open_pending(frame_jpeg, min_size=decode_size(SPEC)) as pending:
        h = pending.header
        assert (h.width, h.height) == HQ_FRAME and h.format == "JPEG"
        assert h.jpeg_scale == 8 and (h.decode_width, h.decode_height) == (507, 380)
        assert h.estimated_bytes < 3_000_000  # ~0.2 MP decoded, not 12 MP
    reduced = load_image(frame_jpeg, SPEC)
    full = prepare(np.asarray(Image.open(io.BytesIO(frame_jpeg)).convert("RGB")), SPEC)  # full decode, same resize rule
    diff = np.abs(reduced.astype(int) - full.astype(int))
    assert reduced.shape == (160, 160, 3) and diff.mean() < 1.5 and diff.max() < 40


def test_small_images_are_not_reduced():
    """Up to twice the model input nothing changes: a 224 px training image decodes in full."""
    img = camera_frame((224, 224), noise=0)
    with open_pending(encode(img, "JPEG"), min_size=decode_size(SPEC)) as pending:
        assert pending.header.jpeg_scale == 1 and pending.header.decode_pixels == 224 * 224
    np.testing.assert_array_equal(load_image(encode(img, "PNG"), SPEC), prepare(img, SPEC))


def test_exif_rotated_camera_jpeg_is_upright_after_reduction(frame):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = encode(frame, "JPEG", quality=85, exif=exif.tobytes())
    with open_pending(data, min_size=(64, 64)) as pending:
        img = pending.decode()
        assert pending.upright_size == (HQ_FRAME[1], HQ_FRAME[0])
    assert img.height > img.width  # portrait, as displayed
    upright = np.asarray(Image.fromarray(frame).transpose(Image.Transpose.ROTATE_270).resize(img.size))
    assert np.abs(np.asarray(img.convert("RGB")).astype(int) - upright.astype(int)).mean() < 6


def test_16_bit_tiff_keeps_its_bit_depth_scaling_when_reduced(frame):
    img16 = gray16(frame)
    data = encode(img16, "TIFF")
    out = load_image(data, SPEC)
    expected = prepare(np.repeat((np.asarray(img16, dtype=np.uint32) * 255 // 65535).astype(np.uint8)[:, :, None],
                                 3, axis=2), SPEC)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    dark = Image.fromarray(np.full((1200, 1600), 200, np.uint16))  # a dark 16-bit frame stays dark
    assert load_image(encode(dark, "TIFF"), SPEC).max() == 0


def test_5mp_tiff_and_png_are_box_reduced_identically():
    rgb = camera_frame(FIELD_5MP, seed=1)
    tiff = load_image(encode(rgb, "TIFF"), SPEC)
    png = load_image(encode(rgb, "PNG", compress_level=1), SPEC)
    np.testing.assert_array_equal(tiff, png)
    np.testing.assert_array_equal(tiff, prepare(rgb, SPEC))  # and a camera array of the same pixels


def test_palette_with_transparency_is_composited_after_reduction():
    rgba = np.zeros((1000, 1000, 4), np.uint8)
    rgba[..., 0] = 200  # fully transparent red
    img = Image.fromarray(rgba, "RGBA").convert("P")
    img.info["transparency"] = 0
    data = encode(img, "PNG", transparency=0)
    assert (load_image(data, SPEC) > 250).all()


def test_over_the_pixel_budget_is_refused_from_the_header_with_the_budget_stated():
    with pytest.raises(ImageTooLargeError) as err:
        load_image(png_header_only(9000, 8000), SPEC)  # 72 MP PNG: cannot be decoded at reduced size
    assert f"{MAX_DECODE_PIXELS / 1e6:.0f} MP" in err.value.message and "9000x8000" in err.value.message
    # Just inside the budget the header passes and only the (fake) body fails.
    with pytest.raises(InvalidImageError) as err:
        load_image(png_header_only(8000, 8000), SPEC)
    assert not isinstance(err.value, ImageTooLargeError)


def test_decode_estimate_reflects_what_will_be_decoded():
    with open_pending(png_header_only(8000, 8000), min_size=decode_size(SPEC)) as pending:
        assert pending.header.estimated_bytes >= 8000 * 8000 * 4  # RGB decodes to 4 bytes a pixel
    with open_pending(encode(Image.fromarray(np.zeros((2000, 3000), np.uint16)), "TIFF")) as pending:
        assert pending.header.mode == "I;16" and pending.header.estimated_bytes >= 6e6 * 6


def test_tiff_with_a_damaged_second_page_gives_its_first_page():
    first = np.full((40, 40, 3), 30, np.uint8)
    data = tiff_without_width_on_page(two_page_tiff(first, np.full((40, 40, 3), 220, np.uint8)), page=1)
    with pytest.raises(TypeError):  # what Pillow itself does: the crash behind issue 13's HTTP 500
        Image.open(io.BytesIO(data)).n_frames
    assert describe_image(data)["frames"] is None
    assert load_image(data, SPEC).mean() == pytest.approx(30, abs=1)


def test_tiff_with_a_damaged_first_page_is_a_typed_error():
    data = tiff_without_width_on_page(two_page_tiff(np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)),
                                      page=0)
    with pytest.raises(InvalidImageError):
        load_image(data, SPEC)
    with pytest.raises(InvalidImageError):
        describe_image(data)


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    rgb = camera_frame((96, 72), seed=2)
    gray = Image.fromarray((rng.random((40, 30)) * 65535).astype(np.uint16))
    return {
        "jpeg": encode(rgb, "JPEG", quality=80),
        "jpeg-progressive": encode(rgb, "JPEG", quality=80, progressive=True),
        "png": encode(rgb, "PNG"),
        "png16": encode(gray, "PNG"),
        "tiff": encode(rgb, "TIFF"),
        "tiff16": encode(gray, "TIFF"),
        "tiff-lzw": encode(rgb, "TIFF", compression="tiff_lzw"),
        "tiff-2page": two_page_tiff(rgb, rgb[::-1]),
        "bmp": encode(rgb, "BMP"),
        "gif": encode(Image.fromarray(rgb).convert("P"), "GIF"),
        "webp": encode(rgb, "WEBP"),
    }


SEEDS = _seeds()


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One of: flipped bytes, truncation, inserted or deleted runs, a header word set to an extreme."""
    buf = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 1:
        del buf[rng.randrange(1, len(buf)):]
    elif kind == 2:
        pos = rng.randrange(len(buf))
        buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == 3:
        pos = rng.randrange(len(buf))
        del buf[pos:pos + rng.randint(1, 64)]
    else:
        pos = rng.randrange(min(len(buf) - 4, 256))
        buf[pos:pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x00\x00\x01\x00"])
    return bytes(buf)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damage it skips over
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(SEEDS)), seed=st.integers(0, 2**32 - 1), spec=st.sampled_from([None, SPEC]))
def test_damaged_files_of_every_format_raise_only_the_typed_error(name, seed, spec):
    data = mutate(SEEDS[name], random.Random(seed))
    try:
        out = load_image(data, spec)
    except InvalidImageError:
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
