"""Image edits through the embedded API: `AsyncEngine.generate` with a GenerationRequest that carries an input
image (PIL or uint8 array), a mask and a strength; bad edit fields are a ValueError from the first iteration,
like any bad input. Tiny model, 2 virtual CPU devices."""
from __future__ import annotations

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest, RequestState
from tetri_engine.request import edit_steps

pytestmark = pytest.mark.asyncio(loop_scope="module")

WIDTH, HEIGHT = 96, 64


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(tmp_path_factory):
    config = EngineConfig(model="tiny", devices=["cpu:0", "cpu:1"], cache_dir=str(tmp_path_factory.mktemp("cache")))
    async with AsyncEngine(config) as engine:
        yield engine


def picture() -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.stack([x * 2, y * 3, x + y], -1).astype(np.uint8)


def mask_image() -> Image.Image:
    rgba = np.full((HEIGHT, WIDTH, 4), 255, dtype=np.uint8)
    rgba[HEIGHT // 2:, :, 3] = 0  # edit the lower half
    return Image.fromarray(rgba)


async def final_of(engine, request):
    outputs = [out async for out in engine.generate(request)]
    return outputs


async def test_an_edit_from_a_pil_image_or_an_array_with_a_mask(engine):
    common = dict(prompt="a boat", width=WIDTH, height=HEIGHT, num_inference_steps=8, seed=5, deadline_s=600)
    from_pil = await final_of(engine, GenerationRequest(image=Image.fromarray(picture()), mask=mask_image(),
                                                        strength=0.5, **common))
    from_array = await final_of(engine, GenerationRequest(image=picture(), mask=np.asarray(mask_image()),
                                                          strength=0.5, **common))
    final = from_pil[-1]
    assert final.state == RequestState.COMPLETED, final.error
    assert final.image.size == (WIDTH, HEIGHT)
    assert sum(final.metrics.steps_at_degree.values()) == edit_steps(8, 0.5) == 4
    assert [o.total_steps for o in from_pil if o.kind == "step"] == [4] * 4  # progress counts the steps that run
    assert from_array[-1].png == final.png  # the same edit, given as arrays


async def test_the_default_strength_and_an_unmasked_edit(engine):
    outputs = await final_of(engine, GenerationRequest(prompt="a boat", width=64, height=64, image=picture(),
                                                       num_inference_steps=10, seed=1, deadline_s=600))
    final = outputs[-1]
    assert final.state == RequestState.COMPLETED and final.image.size == (64, 64)  # resized to the request's size
    assert sum(final.metrics.steps_at_degree.values()) == edit_steps(10, 0.6) == 6


BAD = {
    "a mask without an image": (dict(mask=mask_image()), "send an image too"),
    "a strength without an image": (dict(strength=0.5), "send an image too"),
    "a strength of 0": (dict(image=picture(), strength=0), "greater than 0"),
    "a strength above 1": (dict(image=picture(), strength=1.2), "at most 1"),
    "a float image": (dict(image=picture().astype(np.float32)), "uint8"),
    "a grey array": (dict(image=picture()[:, :, 0]), "height x width x 3"),
    "a mask of another size": (dict(image=picture(), mask=np.zeros((HEIGHT, WIDTH + 16), dtype=bool)), "same size"),
    "a mask without alpha": (dict(image=picture(), mask=Image.fromarray(picture())), "alpha channel"),
    "a CMYK image": (dict(image=Image.fromarray(picture()).convert("CMYK")), "pixel mode"),
    "not an image": (dict(image="boat.png"), "PIL image or a numpy uint8 array"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_edit_fields_are_a_value_error(engine, case):
    fields, message = BAD[case]
    before = engine.stats()["states"]
    with pytest.raises(ValueError, match=message):
        await final_of(engine, GenerationRequest(prompt="a boat", width=WIDTH, height=HEIGHT,
                                                 num_inference_steps=4, **fields))
    assert engine.stats()["states"]["failed"] == before["failed"]  # refused at once, never run
