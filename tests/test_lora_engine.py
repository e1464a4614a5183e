"""Per-request LoRA through the embedded engine and the HTTP server (issue 19): tiny model, 2 virtual CPU devices,
adapters made at random in the test and saved as diffusers saves them."""
from __future__ import annotations

import asyncio
import base64
import io
import math

import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient
from PIL import Image

from lora_support import save_lora
from test_server_support import ServingTestServer, small_config
from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest, RequestState
from tetri_engine.request import MAX_LORAS_PER_REQUEST, LoraRef
from tetri_engine.server import create_app, wait_until_ready

pytestmark = pytest.mark.asyncio(loop_scope="module")

DEVICES = ["cpu:0", "cpu:1"]
GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("loras")
    save_lora(str(directory), "ink", seed=1, alpha=8)
    save_lora(str(directory), "neon", seed=2, as_file=True)
    save_lora(str(directory), "broken", seed=3, layers=["transformer_blocks.0.attn.no_such_layer"])
    return str(directory)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("engine-cache"))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(lora_dir, cache_dir):
    async with AsyncEngine(EngineConfig(model="tiny", devices=DEVICES, cache_dir=cache_dir, lora_dir=lora_dir,
                                        slo_scale=20.0)) as engine:
        yield engine


def request(seed: int, lora=None, size: int = 128) -> GenerationRequest:
    return GenerationRequest(prompt="a harbour in the rain", width=size, height=size, num_inference_steps=4,
                             seed=seed, lora=lora)


async def image_of(engine, req: GenerationRequest) -> np.ndarray:
    final = None
    async for out in engine.generate(req):
        final = out
    assert final.state == RequestState.COMPLETED, final.error
    return np.asarray(final.image, dtype=np.int16)


def close(x: np.ndarray, y: np.ndarray) -> bool:
    """The same image up to float rounding between degrees (one grey level here and there)."""
    return np.abs(x - y).max() <= 2 and np.abs(x - y).mean() < 0.05


async def test_an_adapter_changes_the_image_and_scale_0_is_the_plain_model(engine):
    base = await image_of(engine, request(1))
    ink = await image_of(engine, request(1, [{"name": "ink", "scale": 1.0}]))
    assert np.abs(ink - base).mean() > 5  # visibly another image
    assert np.array_equal(await image_of(engine, request(1, [{"name": "ink", "scale": 0.0}])), base)
    assert np.array_equal(await image_of(engine, request(1)), base)  # and after it, the plain weights again


async def test_two_requests_with_different_adapters_at_once_each_get_their_own(engine):
    lora = {"ink": [LoraRef("ink", 0.8)], "neon": [{"name": "neon", "scale": 1.2}]}
    solo = {name: await image_of(engine, request(7, refs)) for name, refs in lora.items()}
    assert np.abs(solo["ink"] - solo["neon"]).mean() > 5
    before = len(engine.round_records())
    together = await asyncio.gather(*(image_of(engine, request(7, refs)) for refs in lora.values()))
    for name, image in zip(lora, together):
        assert close(image, solo[name]), name
    groups = [group for record in engine.round_records()[before:] for group in record.groups]
    assert groups and all(len(group.request_ids) == 1 for group in groups)  # never one batch


async def test_the_engine_lists_its_adapters_and_knows_the_switch_cost(engine):
    assert engine.lora_adapters() == ["broken", "ink", "neon"]  # ("broken" until a request reads it)
    assert 0 < engine.cost_model.lora_switch_s < 1.0


@pytest.mark.parametrize("lora, message", [
    ([{"name": "nope"}], "unknown LoRA adapter 'nope'"),
    ([{"name": "ink"}, {"name": "ink", "scale": 0.5}], "twice"),
    ([{"name": "ink", "scale": math.nan}], "scale"),
    ([{"name": "ink", "scale": math.inf}], "scale"),
    ([{"name": "ink", "scale": 1e6}], "scale"),
    ([{"name": "ink", "scale": True}], "scale"),
    ([{"name": "ink", "scale": "1"}], "scale"),
    ([{"name": ""}], "name"),
    ([{"name": "ink", "weight": 1}], "unknown field"),
    ("ink", "must be a list"),
    ([{"name": "ink"}] * (MAX_LORAS_PER_REQUEST + 1), "at most"),
])
async def test_bad_adapter_lists_are_refused_at_once(engine, lora, message):
    with pytest.raises(ValueError, match=message):
        async for _ in engine.generate(request(1, lora)):
            pass


async def test_an_adapter_that_does_not_fit_the_model_fails_then_is_refused(engine):
    final = None
    async for out in engine.generate(request(1, [{"name": "broken"}])):
        final = out
    assert final.state == RequestState.FAILED and "no_such_layer" in final.error
    with pytest.raises(ValueError, match="cannot be used with this model"):
        async for _ in engine.generate(request(1, [{"name": "broken"}])):
            pass
    assert "broken" not in engine.lora_adapters()


async def test_an_engine_without_lora_dir_refuses_adapters(cache_dir):
    async with AsyncEngine(EngineConfig(model="tiny", devices=["cpu:0"], cache_dir=cache_dir)) as plain:
        with pytest.raises(ValueError, match="serves no LoRA adapters"):
            async for _ in plain.generate(request(1, [{"name": "ink"}])):
                pass
        assert plain.lora_adapters() == []


# --- through the HTTP server ---------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(lora_dir, cache_dir):
    app = create_app(small_config(devices=DEVICES, lora_dir=lora_dir, cache_dir=cache_dir, slo_scale=20.0))
    async with TestClient(ServingTestServer(app, host="127.0.0.1")) as test_client:
        await wait_until_ready(app)
        yield test_client


async def test_models_lists_the_adapters(client):
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny", "broken", "ink", "neon"]
    assert all(m["object"] == "model" and m["parent"] == "tiny" for m in body["data"][1:])
    card = await (await client.get("/v1/models/ink")).json()
    assert card["id"] == "ink" and card["parent"] == "tiny"


async def test_http_generation_with_an_adapter(client):
    async def image(lora):
        resp = await client.post(GEN, json={"prompt": "a harbour", "size": "64x64", "num_inference_steps": 3,
                                            "seed": 3, **({"lora": lora} if lora is not None else {})})
        assert resp.status == 200, await resp.text()
        png = base64.b64decode((await resp.json())["data"][0]["b64_json"])
        return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)

    base, ink = await image(None), await image([{"name": "ink", "scale": 1.0}])
    assert np.abs(ink - base).mean() > 5
    assert np.array_equal(await image([{"name": "ink", "scale": 0}]), base)


@pytest.mark.parametrize("lora", [[{"name": "nope"}], [{"name": "ink", "scale": 100}], {"name": "ink"},
                                  [{"name": "ink"}, {"name": "ink"}]])
async def test_http_bad_adapters_are_a_400_naming_lora(client, lora):
    resp = await client.post(GEN, json={"prompt": "a harbour", "size": "64x64", "lora": lora})
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["param"] == "lora" and error["code"] == "invalid_value"


async def test_the_openai_client_names_adapters_and_lists_them(client):
    import openai

    base_url = str(client.make_url("/v1"))

    def use_the_openai_client():
        api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        models = [m.id for m in api.models.list()]
        image = api.images.generate(model="tiny", prompt="a harbour", size="64x64",
                                    extra_body={"num_inference_steps": 2, "seed": 1,
                                                "lora": [{"name": "neon", "scale": 0.7}]})
        with pytest.raises(openai.BadRequestError) as bad:
            api.images.generate(model="tiny", prompt="x", size="64x64", extra_body={"lora": [{"name": "nope"}]})
        return models, image, bad.value

    models, image, bad = await asyncio.to_thread(use_the_openai_client)
    assert models[0] == "tiny" and {"ink", "neon"} <= set(models)
    assert image.data[0].b64_json and image.model_extra["metrics"][0]["state"] == "completed"
    assert bad.status_code == 400 and "unknown LoRA adapter 'nope'" in bad.message


async def test_an_edit_takes_adapters_as_json_text_in_its_form(client):
    from aiohttp import FormData

    picture = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(picture, "PNG")

    async def edit(lora: str | None):
        form = FormData(default_to_multipart=True)
        for name, value in (("prompt", "a boat"), ("num_inference_steps", "4"), ("seed", "2"), ("strength", "0.9"),
                            *((("lora", lora),) if lora is not None else ())):
            form.add_field(name, value)
        form.add_field("image", picture.getvalue(), filename="image.png", content_type="image/png")
        return await client.post("/v1/images/edits", data=form)

    async def pixels(resp):
        assert resp.status == 200, await resp.text()
        png = base64.b64decode((await resp.json())["data"][0]["b64_json"])
        return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)

    plain = await pixels(await edit(None))
    ink = await pixels(await edit('[{"name": "ink", "scale": 1.0}]'))
    assert np.abs(ink - plain).mean() > 2
    for bad in ('[{"name": "nope"}]', "ink", '[{"name": "ink", "scale": NaN}]'):
        resp = await edit(bad)
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "lora", bad
