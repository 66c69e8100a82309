"""Images that cost too much or decode wrong: long thin images, 16-bit and other pixel modes, alpha,
and photos stored sideways with an EXIF orientation."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image
from test_preprocess import SPEC, encode

from fastinfer.errors import BadImage
from fastinfer.preprocess import load_rgb, preprocess_into


@pytest.fixture
def resized_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image ``Image.resize`` makes; one larger than the crop fails the test
    before it is allocated (resizing a 1x100000 image's shorter side to 256 would take 100 GB)."""
    sizes: list[tuple[int, int]] = []
    real = Image.Image.resize

    def resize(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        assert size[0] * size[1] <= SPEC.crop * SPEC.crop, f"resized {self.size} to {size}"
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    return sizes


def tensor(data: bytes) -> np.ndarray:
    out = np.empty(SPEC.sample_shape(), np.float32)
    preprocess_into(data, SPEC, out)
    return out


@pytest.fixture(scope="module")
def cat(photos) -> Image.Image:
    return Image.open(photos / "chelsea.png").convert("RGB")  # 451x300


# --- work bounded by the output ------------------------------------------------------------------


@pytest.mark.parametrize("size", [(3, 290), (290, 3), (1800, 1400), (1, 1), (100, 50)])
def test_only_the_crop_is_resampled(size, resized_sizes):
    # 3x290 is thin but allowed: resizing it whole makes 256x24747 pixels to keep 224x224 of them.
    load_rgb(encode(Image.new("RGB", size, (10, 200, 30)), "PNG"), SPEC)
    assert resized_sizes == [(224, 224)]


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (1800, 1400), (30, 2000), (100, 50)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_the_crop_is_what_resizing_the_whole_image_gave(cat, size, fmt):
    body = encode(cat.resize(size), fmt)
    whole = Image.open(io.BytesIO(body))
    whole.draft("RGB", (256, 256))
    scale = 256 / min(whole.size)
    resized = (max(224, round(whole.width * scale)), max(224, round(whole.height * scale)))
    whole = whole.convert("RGB").resize(resized, Image.Resampling.BILINEAR)
    left, top = (whole.width - 224) // 2, (whole.height - 224) // 2
    expected = np.asarray(whole.crop((left, top, left + 224, top + 224)), np.int16)
    # Pillow rounds to 8 bits between its two passes, which may run in the other order.
    assert np.abs(np.asarray(load_rgb(body, SPEC), np.int16) - expected).max() <= 1


def test_a_line_of_100000_pixels_costs_no_more_than_a_photo(resized_sizes):
    spec = dataclasses.replace(SPEC, max_aspect_ratio=1e6)
    for size in [(1, 100_000), (100_000, 1)]:
        crop = np.asarray(load_rgb(encode(Image.new("RGB", size, (10, 200, 30)), "PNG"), spec))
        assert crop.shape == (224, 224, 3) and (crop == (10, 200, 30)).all()
    assert resized_sizes == [(224, 224)] * 2


@pytest.mark.usefixtures("resized_sizes")  # today's code would take 4 GB and 100 GB before answering
@pytest.mark.parametrize("size", [(1, 16_000), (100_000, 1), (2, 201)])
def test_absurd_aspect_ratios_are_refused(size):
    body = encode(Image.new("RGB", size), "PNG")
    assert len(body) < 1000  # the 149-byte image
    with pytest.raises(BadImage, match=rf"{size[0]}x{size[1]}: its longer side is more than 100 times"):
        load_rgb(body, SPEC)


# --- pixel modes -----------------------------------------------------------------------------------


def sixteen_bit(grey: Image.Image, fmt: str, dtype: str) -> bytes:
    """``grey`` stored with 16 bits a sample, the low byte noise as a real 16-bit sensor's would be."""
    low = np.random.default_rng(0).integers(0, 256, (grey.height, grey.width))
    return encode(Image.fromarray((np.asarray(grey, np.uint16) * 256 + low).astype(dtype)), fmt)


@pytest.mark.parametrize(
    "fmt, dtype, mode",
    [("PNG", "<u2", "I;16"), ("TIFF", "<u2", "I;16"), ("TIFF", ">u2", "I;16B"), ("PPM", "<u2", "I")],
)
def test_sixteen_bit_grey_gives_the_tensor_of_eight_bit(cat, fmt, dtype, mode):
    grey = cat.convert("L")
    body = sixteen_bit(grey, fmt, dtype)
    assert Image.open(io.BytesIO(body)).mode == mode
    # Pillow's convert("RGB") clipped every value over 255 to white: a confident answer about nothing.
    np.testing.assert_allclose(tensor(body), tensor(encode(grey, "PNG")), atol=1 / 128)


def test_eight_bit_values_stored_as_sixteen_come_back_exactly(cat):
    grey = cat.convert("L")
    body = encode(Image.fromarray(np.asarray(grey, np.uint16) * 257), "PNG")
    np.testing.assert_array_equal(tensor(body), tensor(encode(grey, "PNG")))


def test_pixels_without_a_known_range_are_refused():
    floats = Image.fromarray(np.full((300, 300), 0.5, np.float32))
    with pytest.raises(BadImage, match="floating-point pixels"):
        load_rgb(encode(floats, "TIFF"), SPEC)
    wide = Image.fromarray(np.full((300, 300), 70_000, np.int32))
    with pytest.raises(BadImage, match="32-bit pixels from 70000 to 70000"):
        load_rgb(encode(wide, "TIFF"), SPEC)


@pytest.mark.parametrize(
    "mode, fmt", [("L", "PNG"), ("1", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("LAB", "TIFF")]
)
def test_other_modes_convert_as_pillow_converts_them(cat, mode, fmt):
    stored = Image.open(io.BytesIO(encode(cat.convert(mode), fmt)))
    assert stored.mode == mode
    expected = encode(stored.convert("RGB"), "PNG")
    np.testing.assert_allclose(tensor(encode(cat.convert(mode), fmt)), tensor(expected), atol=1 / 128)


# --- alpha -----------------------------------------------------------------------------------------


def half_transparent(mode: str) -> bytes:
    """Left half fully transparent over black (what encoders leave there), right half opaque red."""
    rgba = np.zeros((300, 300, 4), np.uint8)
    rgba[:, 150:] = (255, 0, 0, 255)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
        image.info["transparency"] = image.getpixel((0, 0))
        return encode(image, "GIF")
    return encode(image.convert(mode), "PNG")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_on_white(mode):
    crop = np.asarray(load_rgb(half_transparent(mode), SPEC))
    assert tuple(crop[100, 20]) == (255, 255, 255)
    red = (255, 0, 0) if mode != "LA" else (76, 76, 76)  # LA keeps red's grey
    assert tuple(crop[100, 200]) == red


def test_an_opaque_alpha_channel_changes_nothing(cat):
    np.testing.assert_array_equal(tensor(encode(cat.convert("RGBA"), "PNG")), tensor(encode(cat, "PNG")))


# --- EXIF orientation ------------------------------------------------------------------------------

T = Image.Transpose
# How a camera stores an upright scene under each EXIF orientation (6: turned a quarter to the left,
# the tag saying to turn it a quarter to the right).
STORED = {
    2: T.FLIP_LEFT_RIGHT,
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,
    6: T.ROTATE_90,
    7: T.TRANSVERSE,
    8: T.ROTATE_270,
}


def with_orientation(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    out = io.BytesIO()
    upright.transpose(STORED[orientation]).save(out, fmt, exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_gives_the_tensor_of_the_upright_image(cat, orientation):
    np.testing.assert_array_equal(tensor(with_orientation(cat, orientation, "PNG")), tensor(encode(cat, "PNG")))


@pytest.mark.parametrize("orientation", [6, 8])
def test_phone_photo_stored_sideways_decodes_upright_through_draft(cat, orientation):
    photo = cat.resize((2000, 1330))
    body = with_orientation(photo, orientation, "JPEG")
    assert Image.open(io.BytesIO(body)).size == (1330, 2000)
    # JPEG blocks fall differently on the turned image: close, not equal. Turned the other way,
    # the mean difference is about 40.
    assert np.abs(tensor(body) - tensor(encode(photo, "JPEG"))).mean() * 128 < 4.0
