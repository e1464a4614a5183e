"""The engine with parallel layouts (issue 16), end to end on tiny-sd3 and 4 virtual CPU devices: with a
profile that has CFG-parallel and patch-parallel decode rows, `tetri` runs an SD3 request with its
guidance branches side by side, its "round" outputs say so, and the image is the one-device image."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest, RequestState

pytestmark = pytest.mark.asyncio

DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


def profile_with_layouts(path) -> str:
    """A made-up tiny-sd3 profile (the scheduler plans with it; the CPU's own times do not matter here):
    the guidance branches side by side are the fastest on 2 and 4 devices, and so is a 4-device decode."""
    steps, decodes = [], []
    for side, scale in ((64, 1.0), (256, 2.0), (512, 6.0)):
        for degree, cfg, ms in ((1, 1, 100), (2, 1, 90), (2, 2, 40), (4, 1, 80), (4, 2, 30)):
            steps.append({"width": side, "height": side, "degree": degree, "ms": ms * scale,
                          **({"cfg": cfg} if cfg > 1 else {})})
        decodes += [{"width": side, "height": side, "ms": 10.0 * scale},
                    {"width": side, "height": side, "degree": 4, "ms": 4.0 * scale}]
    path.write_text(json.dumps({"model": "tiny-sd3", "machine": "test", "step_ms": steps, "decode_ms": decodes,
                                "encode_ms": 1.0}))
    return str(path)


async def final_and_rounds(engine, request):
    rounds = []
    async for out in engine.generate(request):
        if out.kind == "round":
            rounds.append(out)
        if out.finished:
            return out, rounds


async def test_tetri_runs_sd3_cfg_parallel_and_the_image_is_the_one_device_image(tmp_path):
    config = EngineConfig(model="tiny-sd3", devices=DEVICES, profile=profile_with_layouts(tmp_path / "p.json"),
                          cache_dir=str(tmp_path), policy="tetri")
    common = dict(prompt="a lighthouse", width=256, height=256, num_inference_steps=6, seed=4)
    async with AsyncEngine(config) as engine:
        # 6 steps by 0.5 s: 1.2 s on one device, 1.08 s in Ulysses-2, 0.48 s with the branches side by side
        final, rounds = await final_and_rounds(engine, GenerationRequest(deadline_s=0.5, **common))
        assert final.state == RequestState.COMPLETED, final.error
        assert rounds and all(r.layout["cfg"] == 2 and r.layout["sp"] * 2 == r.degree for r in rounds)
        assert rounds[-1].layout["decode"] == 4  # the last group decodes on 4 devices: the fastest here
        await engine.switch_policy("fixed1")
        reference, ref_rounds = await final_and_rounds(engine, GenerationRequest(deadline_s=600, **common))
        assert [r.layout for r in ref_rounds] == [{"cfg": 1, "sp": 1, "decode": 1}]
        # guidance 1: no true CFG, so no CFG layout, whatever the profile says
        await engine.switch_policy("tetri")
        plain, plain_rounds = await final_and_rounds(engine, GenerationRequest(
            deadline_s=600, guidance_scale=1.0, **{**common, "seed": 5}))
        assert plain.state == RequestState.COMPLETED and all(r.layout["cfg"] == 1 for r in plain_rounds)
    a = np.asarray(final.image, dtype=np.int16)
    b = np.asarray(reference.image, dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # float round-off may flip the last bit of a pixel
