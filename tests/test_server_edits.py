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
MAX_EDITS_HELD = 300 * 1024  # edit bodies held at once (server --max-edit-bytes-in-flight)


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


async def test_strength_0_returns_nearly_the_input(client):
    """Strength 0 runs the schedule's last step alone: the answer is nearer the input's own VAE round trip
    (what an edit that changed nothing would give) than a strength 1 edit is."""
    from tetri_engine.model.image_input import encode_image

    image = png(picture())

    def edits():
        api = openai_client(client)
        return {s: api.images.edit(image=image, prompt="a boat", extra_body={"num_inference_steps": 10, "seed": 2,
                                                                             "strength": s}) for s in (0, 1)}

    out = await asyncio.to_thread(edits)
    assert [sum(out[s].model_extra["metrics"][0]["steps_at_degree"].values()) for s in (0, 1)] == [1, 10]
    runtime = client.server.app[ENGINE].executor.runtime
    rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    round_trip = np.asarray(runtime.decode(encode_image(runtime, rgb, WIDTH, HEIGHT), WIDTH, HEIGHT), dtype=np.int16)
    error = {s: np.abs(pixels(out[s].data[0].b64_json) - round_trip).mean() for s in (0, 1)}
    assert error[0] < 0.85 * error[1], error  # (the tiny random VAE maps latents far apart to near colours)


async def test_the_default_size_is_the_input_rounded_to_the_size_rule(client):
    image = png(picture(100, 70))  # not multiples of 16: made at 96x64, the input resized to it

    def edits():
        api = openai_client(client)
        return [api.images.edit(image=image, prompt="a boat", size=size, extra_body={"num_inference_steps": 2})
                for size in (None, "auto")]

    for answer in await asyncio.to_thread(edits):
        assert answer.size == "96x64"
        assert png_size(base64.b64decode(answer.data[0].b64_json)) == (96, 64)


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


def form(image=None, mask=None, images=(), other_files=(), **fields) -> FormData:
    data = FormData(default_to_multipart=True)
    for name, content in other_files:
        data.add_field(name, content, filename=f"{name}.bin")
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
    "a size the model cannot make": (form(png(picture(300, 200))), "size", "300x200, 304x208 to the nearest"),
    "an input too small": (form(png(picture(40, 40))), "size", "below the minimum"),
    "strength out of range": (form(png(picture()), strength=1.5), "strength", "strength"),
    "strength not a number": (form(png(picture()), strength="lots"), "strength", "strength"),
    "n not an integer": (form(png(picture()), n="two"), "n", "integer"),
    "an unknown field": (form(png(picture()), colour="red"), "colour", "Unknown parameter"),
    "an unknown file field": (form(png(picture()), other_files=[("markup", b"<svg/>")]), "markup",
                              "Unknown parameter: 'markup', sent as a file"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
async def test_bad_uploads_get_a_400_envelope(client, case):
    data, param, message = BAD_UPLOADS[case]
    resp = await client.post(EDITS, data=data)
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"], error


async def test_a_photo_is_edited_upright_as_its_exif_orientation_says(client):
    """A phone stores a portrait photo as landscape pixels with an EXIF orientation tag: the edit, its default
    size and its mask are those of the picture as viewers show it."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view
    buffer = io.BytesIO()
    picture().save(buffer, format="JPEG", exif=exif)  # stored 96x64, seen 64x96
    upright_mask = png(left_half_mask(HEIGHT, WIDTH))  # the mask is drawn on the upright picture
    resp = await client.post(EDITS, data=form(buffer.getvalue(), upright_mask, num_inference_steps=2, seed=1))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["size"] == f"{HEIGHT}x{WIDTH}"
    assert png_size(base64.b64decode(body["data"][0]["b64_json"])) == (HEIGHT, WIDTH)


async def test_uploads_held_at_once_are_bounded():
    """A body whose bytes would take the edit uploads held at once past --max-edit-bytes-in-flight is refused
    with a 503 the client retries; once the other upload is gone, it goes through."""
    app = create_app(small_config(max_edit_body_bytes=MAX_EDIT_BODY, max_edit_bytes_in_flight=MAX_EDITS_HELD))
    async with TestClient(ServingTestServer(app, host="127.0.0.1")) as client:
        await wait_until_ready(app)
        await uploads_held_at_once(client, app[STATE])


async def uploads_held_at_once(client, state):
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:  # an upload that stalls with 200 kB of its 240 kB sent
        writer.write(f"POST {EDITS} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                     f"boundary=b\r\nContent-Length: {240_000}\r\n\r\n".encode()
                     + b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
                     + bytes(200_000))
        await writer.drain()
        for _ in range(400):  # bounded polls: the server has read it
            if state.upload_bytes >= 190_000:
                break
            await asyncio.sleep(0.01)
        assert state.upload_bytes >= 190_000
        noise = png(Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200, 3), np.uint8)))
        assert MAX_EDITS_HELD - 200_000 < len(noise) < MAX_EDIT_BODY  # alone it fits, beside the other not
        resp = await client.post(EDITS, data=form(noise, num_inference_steps=2, seed=1))
        assert resp.status == 503 and resp.headers["Retry-After"] == "1", await resp.text()
        assert (await resp.json())["error"]["code"] == "too_many_uploads"
    finally:
        writer.close()
    for _ in range(400):
        if state.upload_bytes == 0:
            break
        await asyncio.sleep(0.01)
    assert state.upload_bytes == 0
    resp = await client.post(EDITS, data=form(png(picture()), num_inference_steps=2, seed=1))
    assert resp.status == 200, await resp.text()


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
