"""Images that cost too much or decode wrong, sent over HTTP and the binary protocol to a served
image model: both fronts hand the bytes to the worker's one decoder, so both answer the same."""

import io
from typing import Any

import aiohttp
import numpy as np
import onnx
import pytest
from conftest import running_server
from onnx import TensorProto, helper
from PIL import Image

from fastinfer.archive.pack import BuildOptions, build_archive
from fastinfer.client import AsyncClient, InferenceServerError

QUADRANTS = 12  # 3 channels x 4 quadrants


@pytest.fixture(scope="module")
def quadrants(tmp_path_factory) -> str:
    """An image model whose "classes" are the mean of each channel in each quadrant of the crop:
    cheap to compile, and its answer changes when an image is decoded turned, clipped or garbled."""
    folder = tmp_path_factory.mktemp("quadrants")
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[112, 112], strides=[112, 112]),
            helper.make_node("Flatten", ["pooled"], ["y"]),
        ],
        "quadrants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, QUADRANTS])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "q.onnx"))
    labels = folder / "labels.txt"
    labels.write_text(
        "".join(f"{c} {q}\n" for c in "RGB" for q in ("top left", "top right", "bottom left", "bottom right"))
    )
    options = BuildOptions(
        name="quadrants", labels_path=str(labels), top_k=QUADRANTS, preprocess="imagenet", cache_dir=str(folder)
    )
    build_archive(folder / "q.onnx", folder / "q.fia", options)
    return str(folder / "q.fia")


def png(image: Image.Image, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **params)
    return out.getvalue()


def sideways(upright: Image.Image) -> bytes:
    """A phone's photo: stored turned a quarter to the left, its EXIF orientation (6) saying so."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return png(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def by_index(classes: list[dict]) -> np.ndarray:
    assert len(classes) == QUADRANTS
    return np.array([c["probability"] for c in sorted(classes, key=lambda c: c["index"])])


@pytest.fixture
async def fronts(quadrants, tmp_path):
    """Send an image over HTTP, or over the binary protocol: ``(status, classes or error)``."""
    async with (
        running_server(tmp_path, models=(f"quadrants={quadrants}",)) as server,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session,
        AsyncClient(f"tcp://127.0.0.1:{server.binary.port}", timeout_s=60) as client,
    ):

        async def over_http(body: bytes) -> tuple[int, Any]:
            async with session.post("/predictions/quadrants", data=body) as response:
                return response.status, await response.json()

        async def over_binary(body: bytes) -> tuple[int, Any]:
            try:
                return 200, await client.classify("quadrants", body)
            except InferenceServerError as error:
                return error.status, {"code": error.code, "message": error.message}

        yield over_http, over_binary


@pytest.fixture(scope="module")
def cat(photos) -> Image.Image:
    return Image.open(photos / "chelsea.png").convert("RGB")


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_photo_stored_sideways_answers_as_upright(fronts, cat):
    for send in fronts:
        status, upright = await send(png(cat))
        assert status == 200
        status, turned = await send(sideways(cat))
        assert status == 200
        np.testing.assert_allclose(by_index(turned), by_index(upright), rtol=1e-5)
        # ... which could fail: the same pixels without the tag answer otherwise.
        _, unturned = await send(png(cat.transpose(Image.Transpose.ROTATE_90)))
        assert np.abs(by_index(unturned) - by_index(upright)).max() > 1e-3


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_sixteen_bit_png_answers_as_its_eight_bit_twin(fronts, cat):
    grey = cat.convert("L")
    for send in fronts:
        _, eight_bit = await send(png(grey))
        status, sixteen_bit = await send(png(Image.fromarray(np.asarray(grey, np.uint16) * 257)))
        assert status == 200
        np.testing.assert_allclose(by_index(sixteen_bit), by_index(eight_bit), rtol=1e-5)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_line_of_pixels_is_refused_and_the_server_goes_on(fronts, cat):
    thin = png(Image.new("RGB", (1, 16_000)))  # 149 bytes; resized whole, it took 4 GB
    for send in fronts:
        status, error = await send(thin)
        assert status == 400
        assert error["code"] == "bad_image" and "1x16000" in error["message"]
        status, _ = await send(png(cat))
        assert status == 200
