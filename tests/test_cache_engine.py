"""End to end on the tiny model (CPU): a `cache="auto"` request reaches the scheduler as a cached
SchedRequest (planned at the cached step time) and completes; the real engine, executor and policy,
with the policy only wrapped to record what it was given."""
from __future__ import annotations

import asyncio

import pytest

from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest, RequestState
from tetri_engine.sched import make_policy

pytestmark = pytest.mark.asyncio


async def test_cache_auto_request_is_scheduled_as_cached_and_completes(tmp_path):
    added = {}
    costs = []

    def recording_tetri(num_devices, cost):
        policy = make_policy("tetri", num_devices, cost)
        add_request = policy.add_request

        def record(request):
            added[request.request_id] = request
            add_request(request)

        policy.add_request = record
        costs.append(cost)
        return policy

    config = EngineConfig(model="tiny", devices=["cpu:0", "cpu:1"], cache_dir=str(tmp_path))
    async with AsyncEngine(config, policy_factory=recording_tetri) as engine:
        common = dict(prompt="a tree", width=64, height=64, num_inference_steps=6, deadline_s=600)

        async def final(request):
            return [out async for out in engine.generate(request)][-1]

        cached, plain = await asyncio.gather(
            final(GenerationRequest(request_id="cached", seed=3, cache="auto", **common)),
            final(GenerationRequest(request_id="plain", seed=3, **common)))

    assert cached.state == plain.state == RequestState.COMPLETED, (cached.error, plain.error)
    assert cached.image.size == (64, 64) and cached.png
    assert sum(cached.metrics.steps_at_degree.values()) == 6
    assert added["cached"].cached is True and added["plain"].cached is False
    # The start-up profile measures no cache factor: cached requests are costed like the others.
    assert costs[0].cache_step_factor == 1.0
