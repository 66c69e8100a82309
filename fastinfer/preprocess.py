"""Image preprocessing, run in workers: encoded bytes -> one normalized input sample.

JPEG ``draft()`` lets libjpeg decode at a reduced scale (1/2, 1/4, 1/8) that still covers the
resize target, which is far cheaper than decoding at full size and then shrinking.

Work after decoding is bounded by the output, not by the input's shape: only the crop's region is
resampled, so a 1x16000 image does not become a 256x4096000 one on the way. Decoding is bounded by
``max_pixels``. The image is turned upright as its EXIF orientation says, and every pixel mode is
brought to 8-bit RGB with its own scaling (Pillow's ``convert("RGB")`` clips 16-bit grey to white).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from fastinfer.errors import BadImage, ImageTooLarge

WHITE = (255, 255, 255, 255)  # what transparent pixels are composited on


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize the shorter side, center-crop, normalize ``(x - mean) / std``, lay out as NCHW or NHWC."""

    resize_shorter: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    layout: str = "NCHW"
    max_pixels: int = 40_000_000
    # Longer side over shorter side. The work is bounded either way; past this the centre crop is a
    # sliver of a line stretched to a square, and a confident answer about it would mislead.
    max_aspect_ratio: float = 100.0

    def sample_shape(self) -> tuple[int, int, int]:
        if self.layout == "NCHW":
            return (3, self.crop, self.crop)
        return (self.crop, self.crop, 3)

    def to_dict(self) -> dict:
        return {
            "kind": "image",
            "resize_shorter": self.resize_shorter,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": self.layout,
        }


def load_rgb(data: bytes | memoryview, spec: ImagePreprocess):  # -> PIL.Image.Image
    """Decode, resize and crop an encoded image as the spec says; raise BadImage or ImageTooLarge."""
    from PIL import Image

    if len(data) == 0:
        raise BadImage("the body is empty; send the encoded image bytes")
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > spec.max_pixels:
            raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {spec.max_pixels}")
        if max(width, height) > spec.max_aspect_ratio * min(width, height):
            raise BadImage(
                f"image is {width}x{height}: its longer side is more than {spec.max_aspect_ratio:g} times "
                "its shorter side, too thin to classify"
            )
        image.draft("RGB", (spec.resize_shorter, spec.resize_shorter))
        return _resize_and_crop(_to_rgb(_upright(image)), spec)
    except (BadImage, ImageTooLarge):
        raise
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(str(error)) from error
    except Image.UnidentifiedImageError:
        raise BadImage("the body is not an image in a format Pillow reads (JPEG, PNG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"cannot decode the body as an image: {error}") from error
    except Exception as error:  # a format plugin's own failure on crafted bytes (struct.error, IndexError...)
        raise BadImage(f"cannot decode the body as an image ({type(error).__name__})") from error


def _upright(image):  # PIL.Image.Image -> PIL.Image.Image
    """``image`` turned as its EXIF orientation says: phones store photos as the sensor saw them,
    with a tag saying how to turn them.

    ``ImageOps.exif_transpose`` does the same turns but also rewrites the EXIF block, which we
    throw away, and which raises ``struct.error`` on some malformed tags.
    """
    from PIL import ExifTags, Image

    turn = Image.Transpose
    method = {
        2: turn.FLIP_LEFT_RIGHT,
        3: turn.ROTATE_180,
        4: turn.FLIP_TOP_BOTTOM,
        5: turn.TRANSPOSE,
        6: turn.ROTATE_270,
        7: turn.TRANSVERSE,
        8: turn.ROTATE_90,
    }.get(image.getexif().get(ExifTags.Base.Orientation))
    return image if method is None else image.transpose(method)


def _to_rgb(image):  # PIL.Image.Image -> PIL.Image.Image
    """``image`` as 8-bit RGB, each mode scaled as its range says.

    Transparent pixels are composited on white, as a browser or viewer shows them; dropping alpha
    (what ``convert("RGB")`` does) would show whatever colour the encoder left under them, often
    black. A fully opaque image just loses its alpha channel, without the extra pass.
    """
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        image = _sixteen_bit_to_grey(image)
    elif image.mode == "F":
        raise BadImage("the image has floating-point pixels, which have no standard range; send 8- or 16-bit pixels")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
        if image.getchannel("A").getextrema()[0] < 255:
            return Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image


def _sixteen_bit_to_grey(image):  # PIL.Image.Image -> PIL.Image.Image
    """A 16-bit grey image (PNG, TIFF; 16-bit PGM opens as 32-bit mode "I") as 8-bit "L", keeping
    the high byte: what Pillow itself does with 16-bit RGB, and it maps 8-bit values stored as
    16-bit (``v * 257``) back to themselves."""
    from PIL import Image

    if image.mode == "I":  # 32-bit signed: only the 16-bit range has a meaning we know
        low, high = image.getextrema()
        if low < 0 or high > 0xFFFF:
            raise BadImage(f"the image has 32-bit pixels from {low} to {high}; send 8- or 16-bit pixels")
    return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8), "L")


def _resize_and_crop(image, spec: ImagePreprocess):  # PIL.Image.Image -> PIL.Image.Image
    """Resize the shorter side to ``spec.resize_shorter`` and take the centre ``spec.crop`` square.

    Only the crop's box, in source pixels, is resampled: the same pixels as resizing the whole image
    and cropping afterwards (Pillow samples a box at the same points, with the same filter support),
    but memory and time go with the crop, not with the resized image, which for a long thin image
    is huge.
    """
    from PIL import Image

    crop = spec.crop
    scale = spec.resize_shorter / min(image.size)
    resized = (max(crop, round(image.width * scale)), max(crop, round(image.height * scale)))
    left = (resized[0] - crop) // 2
    top = (resized[1] - crop) // 2
    x_scale = image.width / resized[0]
    y_scale = image.height / resized[1]
    box = (left * x_scale, top * y_scale, (left + crop) * x_scale, (top + crop) * y_scale)
    return image.resize((crop, crop), Image.Resampling.BILINEAR, box=box)


def preprocess_into(data: bytes | memoryview, spec: ImagePreprocess, out: np.ndarray) -> None:
    """Decode ``data`` and write the normalized float32 sample into ``out`` (shape ``spec.sample_shape()``)."""
    pixels = np.asarray(load_rgb(data, spec))
    if spec.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
        mean = np.asarray(spec.mean, np.float32)[:, None, None]
        std = np.asarray(spec.std, np.float32)[:, None, None]
    else:
        mean = np.asarray(spec.mean, np.float32)
        std = np.asarray(spec.std, np.float32)
    np.subtract(pixels, mean, out=out, dtype=np.float32)
    np.divide(out, std, out=out)
