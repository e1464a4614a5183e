"""Per-request LoRA (issue 19) through the server and the embedded engine: one app (tiny model, 2 CPU devices,
a lora_dir with adapters made in the test) for the module. /v1/models lists the adapters; "lora" in a
generation request changes the image, scale 0 does not; requests with different adapters at once each get
their solo image; bad "lora" values are 400s (ValueError embedded)."""
from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient

from lora_support import save_lora
from test_server_support import ServingTestServer, small_config
from tetri_engine import GenerationRequest
from tetri_engine.server import create_app, wait_until_ready
from tetri_engine.server.state import ENGINE

pytestmark = pytest.mark.asyncio(loop_scope="module")

GEN = "/v1/images/generations"
BASE = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 3, "seed": 11}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("loras"))
    save_lora(directory, "style", seed=1, alpha=8)
    save_lora(directory, "ink", seed=2, as_file=True)
    return directory


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(lora_dir):
    app = create_app(small_config(devices=["cpu:0", "cpu:1"], lora_dir=lora_dir))
    async with TestClient(ServingTestServer(app, host="127.0.0.1")) as test_client:
        await wait_until_ready(app)
        yield test_client


def pixels(body: dict) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))), dtype=np.int16)


async def generate(client, **extra) -> np.ndarray:
    resp = await client.post(GEN, json={**BASE, **extra})
    assert resp.status == 200, await resp.text()
    return pixels(await resp.json())


def same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a rounding of the float pixels (degree 1 and 2 sum in different orders)."""
    return int(np.abs(a - b).max()) <= 1


async def test_models_lists_the_adapters(client):
    body = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == ["tiny", "ink", "style"]
    assert all(m["object"] == "model" for m in body["data"])
    assert [m.get("parent") for m in body["data"]] == [None, "tiny", "tiny"]
    card = await (await client.get("/v1/models/style")).json()
    assert card["id"] == "style" and card["parent"] == "tiny"
    assert (await client.get("/v1/models/nope")).status == 404


async def test_lora_changes_the_image_and_scale_zero_does_not(client):
    plain = await generate(client)
    styled = await generate(client, lora=[{"name": "style", "scale": 1.0}])
    assert np.abs(styled - plain).mean() > 2.0
    assert same_image(await generate(client, lora=[{"name": "style", "scale": 0.0}]), plain)
    assert same_image(await generate(client, lora=[{"name": "style"}]), styled)  # scale defaults to 1


async def test_different_adapters_at_once_each_get_their_solo_image(client):
    sets = [[{"name": "style", "scale": 0.7}], [{"name": "ink", "scale": 1.0}], [],
            [{"name": "ink", "scale": 0.5}, {"name": "style", "scale": 0.5}]]
    solo = [await generate(client, lora=lora, seed=20 + i) for i, lora in enumerate(sets)]
    together = await asyncio.gather(*(generate(client, lora=lora, seed=20 + i) for i, lora in enumerate(sets)))
    for alone, mixed in zip(solo, together):
        assert same_image(mixed, alone)
    assert len({a.tobytes() for a in solo}) == len(solo)


@pytest.mark.parametrize("lora, message", [
    ([{"name": "nope"}], "unknown LoRA adapter 'nope'"),
    ([{"name": "style"}, {"name": "style", "scale": 0.5}], "twice"),
    ([{"name": "style", "scale": 1e9}], "scale"),
    ([{"name": "style", "scale": "big"}], "scale"),
    ([{"name": "style", "weight": 1}], "unknown field"),
    ({"name": "style"}, "must be a list"),
    ([{"name": ""}], "name"),
])
async def test_bad_lora_is_a_400_naming_it(client, lora, message):
    resp = await client.post(GEN, json={**BASE, "lora": lora})
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["param"] == "lora" and message in error["message"]


async def test_embedded_api_takes_lora_and_refuses_unknown_adapters(client):
    engine = client.server.app[ENGINE]
    assert engine.lora_adapters() == ["ink", "style"]
    request = GenerationRequest(prompt="x", width=64, height=64, num_inference_steps=2, seed=3,
                                lora=[{"name": "ink", "scale": 0.9}])
    finals = [out async for out in engine.generate(request) if out.finished]
    assert finals[0].state == "completed", finals[0].error
    with pytest.raises(ValueError, match="unknown LoRA adapter 'gone'"):
        async for _ in engine.generate(GenerationRequest(prompt="x", width=64, height=64, lora=[{"name": "gone"}])):
            pass


async def test_the_openai_client_sends_lora(client):
    import openai

    base_url = str(client.make_url("/v1"))

    def use_the_openai_client():
        api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        image = api.images.generate(model="tiny", prompt=BASE["prompt"], size="64x64",
                                    extra_body={"num_inference_steps": 3, "seed": 11,
                                                "lora": [{"name": "style", "scale": 1.0}]})
        with pytest.raises(openai.BadRequestError) as bad:
            api.images.generate(model="tiny", prompt="x", size="64x64", extra_body={"lora": [{"name": "nope"}]})
        return image, bad.value, [m.id for m in api.models.list()]

    image, bad, models = await asyncio.to_thread(use_the_openai_client)
    assert same_image(pixels({"data": [{"b64_json": image.data[0].b64_json}]}),
                      await generate(client, lora=[{"name": "style", "scale": 1.0}]))
    assert bad.status_code == 400 and "unknown LoRA adapter" in bad.message
    assert models == ["tiny", "ink", "style"]


async def test_an_edit_takes_lora_as_a_json_form_field(client):
    from aiohttp import FormData
    from PIL import Image

    source = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(source, format="PNG")

    async def edit(lora: str | None):
        data = FormData(default_to_multipart=True)
        for name, value in (("prompt", "a boat"), ("num_inference_steps", "4"), ("seed", "3")):
            data.add_field(name, value)
        if lora is not None:
            data.add_field("lora", lora)
        data.add_field("image", source.getvalue(), filename="image.png", content_type="image/png")
        return await client.post("/v1/images/edits", data=data)

    plain = await edit(None)
    styled = await edit('[{"name": "style", "scale": 1.0}]')
    assert plain.status == 200 and styled.status == 200, await styled.text()
    assert np.abs(pixels(await styled.json()) - pixels(await plain.json())).mean() > 2.0
    bad = await edit('[{"name": "nope"}]')
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "lora"
    assert (await edit("style")).status == 400  # not JSON: the protocol says what "lora" must be


async def test_a_file_that_does_not_fit_the_model_fails_once_then_is_refused(client, lora_dir):
    save_lora(lora_dir, "wrong", seed=5, layers=["transformer_blocks.0.attn.no_such_proj"])
    assert "wrong" in [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
    first = await client.post(GEN, json={**BASE, "lora": [{"name": "wrong"}]})
    assert first.status == 500 and "does not have" in (await first.json())["error"]["message"]
    again = await client.post(GEN, json={**BASE, "lora": [{"name": "wrong"}]})
    error = (await again.json())["error"]
    assert again.status == 400 and error["param"] == "lora" and "cannot be used with this model" in error["message"]
    assert "wrong" not in [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
    assert same_image(await generate(client), await generate(client))  # the engine works on
