"""The default EfficientNet-Lite0, compiled by TVM, served end to end over HTTP."""

import io

import aiohttp
import pytest
from PIL import Image
from test_preprocess import png_header_only

from fastinfer.config import Config
from fastinfer.server.main import Server

CATS = {"tabby, tabby cat", "tiger cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def config(cache_dir):
    return Config(
        http_port=0, management_port=0, binary_port=0, grpc_port=0, cache_dir=str(cache_dir), worker_start_timeout_s=300
    )


@pytest.fixture
async def http(config):
    server = Server(config)
    await server.start()
    try:
        await server.wait_ready(300)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
            yield session
    finally:
        await server.stop()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_classifies_the_photos(http, photos):
    form = aiohttp.FormData()
    form.add_field("data", (photos / "chelsea.png").read_bytes(), filename="chelsea.png")
    async with http.post("/predictions/efficientnet_lite0", data=form) as response:
        assert response.status == 200
        top = await response.json()
    assert len(top) == 5 and set(top[0]) == {"index", "class", "probability"}
    assert top[0]["class"] in CATS
    assert sum(c["probability"] for c in top if c["class"] in CATS) > 0.8

    async with http.post("/predictions/efficientnet_lite0", data=(photos / "coffee.png").read_bytes()) as response:
        top = await response.json()
    assert top[0]["class"] == "espresso" and top[0]["index"] == 967
    assert top[0]["probability"] > 0.85


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_bad_images_get_4xx_and_the_server_goes_on(http, photos):
    jpeg = io.BytesIO()
    Image.open(photos / "coffee.png").convert("RGB").save(jpeg, "JPEG")
    cases = {
        b"": "bad_image",
        b"GIF89a not really": "bad_image",
        jpeg.getvalue()[:2000]: "bad_image",
        png_header_only(10_000, 5_000): "image_too_large",
    }
    for body, code in cases.items():
        async with http.post("/predictions/efficientnet_lite0", data=body) as response:
            assert response.status == 400
            error = await response.json()
            assert error["code"] == code and error["message"]
    async with http.post("/predictions/efficientnet_lite0", data=jpeg.getvalue()) as response:
        assert response.status == 200
        assert (await response.json())[0]["class"] == "espresso"
