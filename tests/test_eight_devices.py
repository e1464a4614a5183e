"""Eight virtual CPU devices: what an 8-GPU host needs from the communicator cache and the engine,
checked where no such host is lent (the paper's machine has 8 GPUs)."""
from __future__ import annotations

import asyncio

import torch

from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest, ops
from tetri_engine.sched.placement import all_groups

from rank_threads import run_ranks

DEVICES = [f"cpu:{i}" for i in range(8)]


def test_cache_warms_every_aligned_group_of_eight_devices_and_exchanges_over_all_eight():
    groups = [tuple(DEVICES[d] for d in g) for g in all_groups(8, (1, 2, 4, 8))]
    assert len(groups) == 4 + 2 + 1  # C(8,k) is not needed: aligned blocks of 2, 4 and 8
    cache = ops.CommCache(capacity=64, timeout_s=30.0)
    cache.warmup(groups)
    assert cache.stats()["created"] == len(groups)
    comm = cache.get(groups[-1])  # all eight: a hit, not a second creation
    assert cache.stats()["created"] == len(groups) and cache.stats()["hits"] == 1

    # Ulysses exchange: rank r sends chunk j (value 10 r + j) to rank j; rank j gets 10 r + j from each r.
    def body(rank: int) -> torch.Tensor:
        x = torch.cat([torch.full((2, 3), 10.0 * rank + j) for j in range(8)])
        return comm.all_to_all(rank, x)

    for j, out in enumerate(run_ranks(body, range(8))):
        expected = torch.cat([torch.full((2, 3), 10.0 * r + j) for r in range(8)])
        assert torch.equal(out, expected), j


async def _final(engine: AsyncEngine, i: int, side: int):
    devices = set()
    async for out in engine.generate(GenerationRequest(prompt=f"eight {i}", width=side, height=side,
                                                       num_inference_steps=16, seed=i, deadline_s=120.0)):
        devices.update(out.devices)
        if out.finished:
            return out, devices


async def test_engine_serves_on_eight_virtual_devices_with_groups_on_the_upper_half(tmp_path):
    # fixed4: every request runs at degree 4 (the tiny model has 4 heads, so 4 is its widest degree),
    # two at a time: one group must use cpu:4..cpu:7.
    config = EngineConfig(model="tiny", num_cpu_devices=8, policy="fixed4", cache_dir=str(tmp_path))
    async with AsyncEngine(config) as engine:
        assert engine.devices == DEVICES
        assert max(engine.cost_model.degrees) == 4  # degree 8 is not offered for a 4-head model
        results = await asyncio.gather(*(_final(engine, i, side) for i, side in enumerate((128, 256, 128, 256))))
        for out, _ in results:
            assert out.state.value == "completed", out.error
            assert out.image.size in ((128, 128), (256, 256))
            assert out.metrics.steps_at_degree == {4: 16}
        used = set().union(*(devices for _, devices in results))
        assert {"cpu:4", "cpu:5", "cpu:6", "cpu:7"} <= used
        assert engine.busy_devices() == []
