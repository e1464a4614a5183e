"""The baselines of deadline-aware routing are Ray Serve's own routers: power of two choices on queue
length (Serve's default) and round robin. Both serve the same replicas (tiny model, 1 CPU device each)
through a ClusterEngine; one local Ray cluster (loopback) for the module, one deployment per router. And a
deployment whose replicas cannot start fails with the replicas' own error."""
from __future__ import annotations

import asyncio
import importlib.util

import pytest
import pytest_asyncio

from tetri_engine.cluster import ClusterConfig
from tetri_engine.cluster.engine import ClusterEngine
from tetri_engine.config import EngineConfig
from tetri_engine.request import GenerationRequest

if importlib.util.find_spec("ray") is None:
    pytest.skip("the cluster tests need the `cluster` extra (ray[serve])", allow_module_level=True)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow, pytest.mark.timeout(600)]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def ray_running():
    from tetri_engine.cluster import ray_cluster

    connection = await asyncio.to_thread(ray_cluster.connect, ClusterConfig(replicas=2, ray_num_cpus=4))
    yield
    await asyncio.to_thread(ray_cluster.disconnect, *connection)


async def run(engine: ClusterEngine, seed: int) -> str:
    async for out in engine.generate(GenerationRequest(prompt="a red fox", width=64, height=64,
                                                       num_inference_steps=2, seed=seed, deadline_s=600.0)):
        if out.finished:
            assert out.state == "completed", out.error
            return out.metrics.replica
    raise AssertionError("no final output")


@pytest.mark.parametrize("routing", ["round-robin", "pow2"])
async def test_ray_serve_routers_serve_every_request(ray_running, routing):
    engine = ClusterEngine(EngineConfig(model="tiny", max_width=128, max_height=128, max_steps=10),
                           ClusterConfig(replicas=2, devices_per_replica=1, routing=routing))
    await asyncio.wait_for(engine.start(), 300)
    try:
        replicas = set(engine.replicas)
        one_by_one = [await run(engine, seed) for seed in range(6)]
        together = await asyncio.gather(*(run(engine, 10 + seed) for seed in range(8)))
        assert set(together) == replicas, together
        if routing == "round-robin":  # strictly in turn
            assert all(a != b for a, b in zip(one_by_one, one_by_one[1:])), one_by_one
        assert engine.stats()["routing"] == routing
    finally:
        await engine.shutdown()


async def test_replicas_that_cannot_start_say_why(ray_running):
    engine = ClusterEngine(EngineConfig(model="/no/such/model"), ClusterConfig(replicas=1, devices_per_replica=1))
    with pytest.raises(RuntimeError, match="replicas failed to start: ValueError: unknown model '/no/such/model'"):
        await asyncio.wait_for(engine.start(), 300)
    assert not engine.is_ready and engine.stats()["phase"] == "stopped"
