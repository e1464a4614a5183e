"""The engine on GPUs (tiny model, every visible GPU, CUDA graphs on): requests complete with the
executor's GPU measurements in their metrics, and previews are made on the executor's threads from
sharded GPU latents. Needs two CUDA GPUs (degree 2 groups)."""
from __future__ import annotations

import asyncio

import pytest

from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest, RequestState

pytestmark = [pytest.mark.multi_gpu, pytest.mark.asyncio]


async def test_requests_and_previews_on_gpus(tmp_path):
    import torch

    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    # Rounds of about one step: many group boundaries, so many previews.
    # (compile off: compiling every profiled shape at start-up would take minutes; tests/test_speed_gpu.py
    # covers compiled blocks)
    config = EngineConfig(model="tiny", devices=devices, round_steps=1, cache_dir=str(tmp_path), cuda_graphs=True,
                          compile=False)
    async with AsyncEngine(config) as engine:
        async def run(i: int, side: int):
            request = GenerationRequest(prompt=f"gpu {i}", width=side, height=side, num_inference_steps=12, seed=i,
                                        preview_every=1, deadline_s=600)
            return [out async for out in engine.generate(request)]

        results = await asyncio.gather(*(run(i, side) for i, side in enumerate((256, 512, 256))))
        assert engine.busy_devices() == []
    all_previews = 0
    for outputs in results:
        final = outputs[-1]
        assert final.state == RequestState.COMPLETED, final.error
        assert sum(final.metrics.steps_at_degree.values()) == 12
        assert final.metrics.peak_memory_bytes > 0  # measured by the executor on the GPUs
        groups = sum(o.kind == "round" for o in outputs)
        previews = [o for o in outputs if o.kind == "preview"]
        assert len(previews) == groups - 1  # one at each group boundary before the end
        assert all(p.image.size == (final.image.size[0] // 8, final.image.size[1] // 8) for p in previews)
        all_previews += len(previews)
    assert all_previews > 0
