import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fastinfer.errors import BadImage, ImageTooLarge
from fastinfer.preprocess import ImagePreprocess, load_rgb, preprocess_into

SPEC = ImagePreprocess()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares its size and stops: enough for a decoder to learn how big it would be."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def test_resize_shorter_side_then_center_crop():
    # Left half red, right half blue, 600x300: after resizing to 512x256 and cropping 224 around
    # the centre, the left half of the crop is red and the right half blue.
    image = Image.new("RGB", (600, 300), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 300, 300))
    crop = np.asarray(load_rgb(encode(image, "PNG"), SPEC))
    assert crop.shape == (224, 224, 3)
    assert tuple(crop[100, 50]) == (255, 0, 0)
    assert tuple(crop[100, 170]) == (0, 0, 255)


def test_normalizes_into_nchw():
    image = Image.new("RGB", (300, 300), (255, 127, 0))
    out = np.empty((3, 224, 224), np.float32)
    preprocess_into(encode(image, "PNG"), SPEC, out)
    np.testing.assert_allclose(out[:, 10, 10], [(255 - 127) / 128, 0.0, -127 / 128])


def test_jpeg_draft_decodes_close_to_a_full_decode(photos):
    jpeg = encode(Image.open(photos / "chelsea.png").convert("RGB").resize((1800, 1400)), "JPEG")
    fast = np.asarray(load_rgb(jpeg, SPEC), np.float32)
    full = Image.open(io.BytesIO(jpeg)).convert("RGB")
    scale = 256 / min(full.size)
    full = full.resize((round(full.width * scale), round(full.height * scale)), Image.Resampling.BILINEAR)
    left, top = (full.width - 224) // 2, (full.height - 224) // 2
    slow = np.asarray(full.crop((left, top, left + 224, top + 224)), np.float32)
    assert np.abs(fast - slow).mean() < 4.0


@pytest.mark.parametrize(
    "body, error",
    [
        (b"", "empty"),
        (b"this is not an image", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "image"),
    ],
)
def test_bad_bodies_are_named(body, error):
    with pytest.raises(BadImage, match=error):
        load_rgb(body, SPEC)


def test_truncated_jpeg_is_refused(photos):
    jpeg = encode(Image.open(photos / "coffee.png").convert("RGB"), "JPEG")
    with pytest.raises(BadImage, match="truncated"):
        load_rgb(jpeg[: len(jpeg) // 2], SPEC)


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageTooLarge, match="50000000 pixels"):
        load_rgb(png_header_only(10_000, 5_000), SPEC)
