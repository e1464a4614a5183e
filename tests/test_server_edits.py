"""POST /v1/images/edits end to end: the official `openai` client's `images.edit` against the live server
(tiny model, 4 CPU devices), sizes, seeds, strength, inpainting at degree 1 and 2, streaming, and a 400
envelope (413 beyond the body cap) for every kind of bad upload."""
from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import numpy as np
import pytest
import pytest_asyncio
from aiohttp import FormData
from aiohttp.test_utils import TestClient
from PIL import Image

from test_server_support import ServingTestServer, png_size, small_config, wait_until_idle
from tetri_engine.request import edit_steps
from tetri_engine.server import create_app, wait_until_ready
from tetri_engine.server.state import CONFIG, ENGINE, STATE

pytestmark = pytest.mark.asyncio(loop_scope="module")

EDITS = "/v1/images/edits"
WIDTH, HEIGHT = 96, 64
MAX_EDIT_BODY = 256 * 1024


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client():
    app = create_app(small_config(max_edit_body_bytes=MAX_EDIT_BODY))
    async with TestClient(ServingTestServer(app, host="127.0.0.1")) as test_client:
        await wait_until_ready(app)
        yield test_client


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(width=WIDTH, height=HEIGHT) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1).astype(np.uint8))


def left_half_mask(width=WIDTH, height=HEIGHT) -> Image.Image:
    """OpenAI's mask: opaque where the image is kept, fully transparent (alpha 0) where it is edited."""
    rgba = np.full((height, width, 4), 255, dtype=np.uint8)
    rgba[:, :width // 2, 3] = 0
    return Image.fromarray(rgba)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def openai_client(client):
    import openai

    return openai.OpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)


async def test_edits_through_the_openai_client(client):
    image, mask = png(picture()), png(left_half_mask())

    def edits():
        api = openai_client(client)
        steps = {"num_inference_steps": 10}
        return {
            "default_size": api.images.edit(model="tiny", image=image, prompt="a boat", extra_body={**steps, "seed": 7}),
            "again": api.images.edit(image=("in.png", image, "image/png"), prompt="a boat",
                                     extra_body={**steps, "seed": 7}),
            "other_seed": api.images.edit(image=image, prompt="a boat", extra_body={**steps, "seed": 8}),
            "resized": api.images.edit(image=image, prompt="a boat", size="64x64", n=2,
                                       extra_body={**steps, "seed": 7, "strength": 0.3}),
            "inpaint": api.images.edit(image=image, mask=mask, prompt="a boat", response_format="b64_json",
                                       extra_body={**steps, "seed": 7, "strength": 1.0}),
        }

    out = await asyncio.to_thread(edits)
    assert png_size(base64.b64decode(out["default_size"].data[0].b64_json)) == (WIDTH, HEIGHT)
    assert out["default_size"].size == f"{WIDTH}x{HEIGHT}"
    assert out["again"].data[0].b64_json == out["default_size"].data[0].b64_json  # same seed, same image
    assert out["other_seed"].data[0].b64_json != out["default_size"].data[0].b64_json
    assert [png_size(base64.b64decode(d.b64_json)) for d in out["resized"].data] == [(64, 64)] * 2
    assert [m["seed"] for m in out["resized"].model_extra["metrics"]] == [7, 8]
    # The steps that ran: strength's share of the schedule, as diffusers' pipelines run it.
    for name, strength in (("default_size", 0.6), ("resized", 0.3), ("inpaint", 1.0)):
        for metrics in out[name].model_extra["metrics"]:
            assert sum(metrics["steps_at_degree"].values()) == edit_steps(10, strength)
    assert pixels(out["inpaint"].data[0].b64_json).shape == (HEIGHT, WIDTH, 3)


async def test_inpainting_gives_the_same_image_at_degree_1_and_2(client):
    engine = client.server.app[ENGINE]
    image, mask = png(picture()), png(left_half_mask())
    results = {}
    for policy in ("fixed1", "fixed2"):
        await wait_until_idle(client)
        await engine.switch_policy(policy)
        results[policy] = await asyncio.to_thread(lambda: openai_client(client).images.edit(
            image=image, mask=mask, prompt="a boat", extra_body={"num_inference_steps": 10, "seed": 3}))
    await wait_until_idle(client)
    await engine.switch_policy(client.server.app[CONFIG].engine.policy)  # back to the module's policy
    one, two = (results[p].model_extra["metrics"][0]["steps_at_degree"] for p in ("fixed1", "fixed2"))
    assert one == {"1": 6} and two == {"2": 6}
    difference = np.abs(pixels(results["fixed1"].data[0].b64_json) - pixels(results["fixed2"].data[0].b64_json))
    assert difference.max() <= 1  # float rounding of the exchanges, at most one step of 8-bit colour


async def test_a_streamed_edit(client):
    def stream():
        return list(openai_client(client).images.edit(image=png(picture()), prompt="a boat", stream=True,
                                                      extra_body={"num_inference_steps": 4, "seed": 1}))

    events = await asyncio.to_thread(stream)
    assert events[0].type == "tetri.queued" and events[-1].type == "image_edit.completed"
    assert png_size(base64.b64decode(events[-1].b64_json)) == (WIDTH, HEIGHT)
    assert [e.step for e in events if e.type == "tetri.step"] == [1, 2, 3]  # edit_steps(4, 0.6)


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its data is one pixel's): refused before decoding."""
    data = bytearray(png(Image.new("L", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def form(image=None, mask=None, images=(), **fields) -> FormData:
    data = FormData(default_to_multipart=True)
    data.add_field("prompt", fields.pop("prompt", "a boat"))
    for name, value in fields.items():
        data.add_field(name, str(value))
    for content in ([image] if image is not None else []) + list(images):
        data.add_field("image", content, filename="image.png", content_type="image/png")
    if mask is not None:
        data.add_field("mask", mask, filename="mask.png", content_type="image/png")
    return data


BAD_UPLOADS = {
    "not an image": (form(b"GIF? no, plain text"), "image", "not a PNG, JPEG or WEBP"),
    "a format not served": (form(encoded(picture(), "GIF")), "image", "not a PNG, JPEG or WEBP"),
    "CMYK": (form(encoded(picture().convert("CMYK"), "JPEG")), "image", "pixel mode 'CMYK'"),
    "16-bit grey": (form(png(Image.new("I;16", (WIDTH, HEIGHT)))), "image", "pixel mode 'I;16'"),
    "too many pixels": (form(huge_png_header(5000, 5000)), "image", "5000x5000"),
    "a decompression bomb": (form(huge_png_header(20000, 20000)), "image", "more than 16777216 pixels"),
    "truncated": (form(png(picture())[:200]), "image", "could not be decoded"),
    "empty": (form(b""), "image", "empty"),
    "no image": (form(), "image", "Missing required parameter"),
    "two images": (form(images=[png(picture()), png(picture())]), "image", "one image per request"),
    "mask of another size": (form(png(picture()), png(left_half_mask(64, 64))), "mask", "same size"),
    "mask without alpha": (form(png(picture()), png(picture())), "mask", "alpha channel"),
    "mask not an image": (form(png(picture()), b"\x89PNG\r\n\x1a\n broken"), "mask", "not a PNG"),
    "a size the model cannot make": (form(png(picture(100, 100))), "size", "100x100"),
    "strength out of range": (form(png(picture()), strength=1.5), "strength", "strength"),
    "strength not a number": (form(png(picture()), strength="lots"), "strength", "strength"),
    "n not an integer": (form(png(picture()), n="two"), "n", "integer"),
    "an unknown field": (form(png(picture()), colour="red"), "colour", "Unknown parameter"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
async def test_bad_uploads_get_a_400_envelope(client, case):
    data, param, message = BAD_UPLOADS[case]
    resp = await client.post(EDITS, data=data)
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"], error


async def test_bodies_beyond_the_cap_and_json_bodies_are_refused(client):
    noise = np.random.default_rng(0).integers(0, 255, (320, 320, 3), dtype=np.uint8)
    big = png(Image.fromarray(noise))
    assert len(big) > MAX_EDIT_BODY
    resp = await client.post(EDITS, data=form(big))
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "request_too_large"
    resp = await client.post(EDITS, json={"prompt": "a boat", "image": "aGVsbG8="})
    assert resp.status == 415 and "multipart/form-data" in (await resp.json())["error"]["message"]
    # Nothing above was a server error, and the engine still edits.
    resp = await client.post(EDITS, data=form(png(picture()), num_inference_steps=2, seed=1))
    assert resp.status == 200, await resp.text()
    answers = client.server.app[STATE].responses
    assert not [status for (route, status) in answers if route == EDITS and status >= 500]
