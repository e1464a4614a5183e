"""Engine replicas on Ray Serve, end to end: a local Ray cluster on loopback, 2 replicas of the tiny
model on 2 virtual CPU devices each, behind the same aiohttp server (`tetri-engine serve --replicas 2
--devices-per-replica 2`), with deadline-aware routing.

One cluster serves the module (Ray start + two model loads: ~15 s on a 2-core machine). Every wait is
bounded. The last test kills a replica's process.
"""
from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import signal

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient

from test_server_support import ServingTestServer, parse_sse, png_size, small_config
from tetri_engine.cluster import ClusterConfig
from tetri_engine.cluster.engine import ClusterEngine
from tetri_engine.server import create_app, wait_until_ready
from tetri_engine.server.app import ENGINE

# Not imported here: a local cluster binds loopback only if Ray is first imported after its set-up.
if importlib.util.find_spec("ray") is None:
    pytest.skip("the cluster tests need the `cluster` extra (ray[serve])", allow_module_level=True)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow, pytest.mark.timeout(600)]

GEN = "/v1/images/generations"
LONG_DEADLINE_MS = 600_000  # every request fits: these tests are about routing and faults, not SLOs


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client():
    config = small_config(devices=None, max_queue=32, max_steps=100, dashboard=False, drain_timeout_s=20.0)
    cluster = ClusterConfig(replicas=2, devices_per_replica=2, ray_num_cpus=4)
    app = create_app(config, lambda engine_config: ClusterEngine(engine_config, cluster, drain_timeout_s=20.0))
    async with TestClient(ServingTestServer(app, host="127.0.0.1")) as test_client:
        await asyncio.wait_for(wait_until_ready(app), 300)
        yield test_client


def cluster_of(client) -> ClusterEngine:
    return client.server.app[ENGINE]


async def generate(client, **body) -> dict:
    body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 4, "deadline_ms": LONG_DEADLINE_MS,
            **body}
    resp = await client.post(GEN, json=body)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_the_local_cluster_is_on_loopback_and_serves_every_route(client):
    import ray

    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    health = await (await client.get("/health")).json()
    replicas = cluster_of(client).replicas
    assert health["status"] == "ok" and len(replicas) == 2
    assert sorted(health["devices"]) == sorted(f"{r}/cpu:{i}" for r in replicas for i in (0, 1))
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


async def test_twenty_concurrent_requests_are_all_answered_by_both_replicas(client):
    bodies = await asyncio.gather(*(generate(client, seed=i) for i in range(20)))
    served = [body["metrics"][0]["replica"] for body in bodies]
    assert set(served) == set(cluster_of(client).replicas), served
    for body in bodies:
        assert body["metrics"][0]["state"] == "completed"
        assert png_size(base64.b64decode(body["data"][0]["b64_json"])) == (64, 64)
    # /metrics sums the replicas (polled every 0.5 s): all 20 show up as completed.
    for _ in range(100):
        text = await (await client.get("/metrics")).text()
        if _sample(text, 'tetri_requests_total{state="completed"}') >= 20:
            break
        await asyncio.sleep(0.1)
    assert _sample(text, 'tetri_requests_total{state="completed"}') >= 20
    assert _sample(text, "tetri_step_latency_seconds_count") >= 20  # (a sample per group of steps)
    assert _sample(text, "tetri_deadline_total") >= 20


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


async def test_streaming_names_the_replica_and_completes(client):
    resp = await client.post(GEN, json={"prompt": "a lighthouse", "size": "256x256", "num_inference_steps": 10,
                                        "stream": True, "preview_every": 1, "deadline_ms": LONG_DEADLINE_MS})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(await resp.text())
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "tetri.queued" and kinds[-1] == "image_generation.completed", kinds
    assert [data["step"] for kind, data in events if kind == "tetri.step"] == list(range(1, 11))
    replica = events[-1][1]["metrics"]["replica"]
    assert replica in cluster_of(client).replicas
    rounds = [data for kind, data in events if kind == "tetri.round"]
    assert rounds and all(d.startswith(replica + "/cpu:") for r in rounds for d in r["devices"])
    # A preview (PNG bytes made on the replica) at every round boundary before the last, as on one host.
    partials = [data for kind, data in events if kind == "image_generation.partial_image"]
    assert [p["partial_image_index"] for p in partials] == list(range(len(rounds) - 1))
    assert all(png_size(base64.b64decode(p["b64_json"])) == (32, 32) for p in partials)
    assert png_size(base64.b64decode(events[-1][1]["b64_json"])) == (256, 256)


async def test_a_client_that_leaves_cancels_its_request_on_the_replica(client):
    cluster = cluster_of(client)
    before = cluster.stats()["states"]["cancelled"]
    resp = await client.post(GEN, json={"prompt": "left", "size": "256x256", "num_inference_steps": 100,
                                        "stream": True, "deadline_ms": LONG_DEADLINE_MS})
    async for line in resp.content:
        if line.startswith(b"event: tetri.step"):
            break
    resp.close()  # the client goes away mid-stream
    for _ in range(300):  # bounded: the replica cancels it at its next step and frees its devices
        stats = cluster.stats()
        if stats["states"]["cancelled"] > before and stats["running"] == 0 and not cluster.busy_devices():
            break
        await asyncio.sleep(0.1)
    assert stats["states"]["cancelled"] == before + 1 and stats["running"] == 0, stats["states"]


async def test_a_request_no_replica_can_take_is_refused_by_every_replica(client):
    # A deadline no replica can meet even alone: every replica refuses it, and the answer says so.
    resp = await client.post(GEN, json={"prompt": "x", "size": "256x256", "num_inference_steps": 100,
                                        "deadline_ms": 1})
    assert resp.status == 400, await resp.text()  # not even alone: retrying cannot help
    body = await resp.json()
    assert body["error"]["code"] == "deadline_impossible"
    assert "every replica (2) refused" in body["error"]["message"]


async def _stream(client, index: int) -> list[tuple[str, dict]]:
    resp = await client.post(GEN, json={"prompt": f"request {index}", "size": "256x256", "num_inference_steps": 100,
                                        "stream": True, "deadline_ms": LONG_DEADLINE_MS, "seed": index})
    assert resp.status == 200, await resp.text()
    events = []
    async for line in resp.content:  # event by event, so the test sees progress as it happens
        if line.startswith(b"data: "):
            events.extend(parse_sse("event: x\n" + line.decode() + "\n"))
    return [(data.get("type", ""), data) for _, data in events]


async def test_a_killed_replica_loses_only_its_running_requests(client, caplog):
    cluster = cluster_of(client)
    victim, survivor = cluster.replicas
    pid = cluster._stats.live[victim].pid
    streams = [asyncio.create_task(_stream(client, i)) for i in range(12)]
    # Kill the victim's process while its devices run steps and requests wait for them (bounded wait).
    for _ in range(600):
        status = cluster._stats.live[victim]
        if status.busy_devices and status.stats["queue_depth"] >= 2:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the victim replica never ran a request with others waiting")
    os.kill(pid, signal.SIGKILL)
    results = await asyncio.wait_for(asyncio.gather(*streams), 300)

    lost = completed = 0
    for events in results:
        last_type, last = events[-1]
        ran_on = {d.split("/")[0] for t, data in events if t == "tetri.round" for d in data["devices"]}
        if last_type == "image_generation.completed":
            completed += 1
            assert ran_on == {last["metrics"]["replica"]}, (ran_on, last["metrics"])  # re-routed: never ran on the victim
        else:
            # Only requests that had started on the victim fail, with an error that says what happened.
            assert last_type == "error", events[-1]
            assert ran_on == {victim}, ran_on
            assert f"replica {victim}" in last["error"]["message"] and "lost" in last["error"]["message"]
            lost += 1
    assert lost >= 1 and completed + lost == 12
    # The victim's requests that had not started yet were routed again (and completed above).
    assert any("routing it again" in r.getMessage() for r in caplog.records)

    # Later requests succeed, and Ray Serve replaces the dead replica (bounded wait).
    bodies = await asyncio.gather(*(generate(client, seed=100 + i) for i in range(4)))
    assert all(b["metrics"][0]["state"] == "completed" for b in bodies)
    for _ in range(600):
        if len(cluster.replicas) == 2 and victim not in cluster.replicas:
            break
        await asyncio.sleep(0.2)
    assert len(cluster.replicas) == 2 and victim not in cluster.replicas and survivor in cluster.replicas
    body = await generate(client, seed=200)
    assert body["metrics"][0]["state"] == "completed"


async def test_shutdown_drains_the_requests_in_flight(client):
    # Last in the module: it takes the cluster down.
    cluster = cluster_of(client)
    stream = asyncio.create_task(_stream(client, 300))
    for _ in range(600):  # bounded: until the request runs somewhere
        if cluster.busy_devices():
            break
        await asyncio.sleep(0.05)
    shutdown = asyncio.create_task(cluster.shutdown(drain=True))
    await asyncio.sleep(0.2)
    resp = await client.post(GEN, json={"prompt": "too late", "size": "64x64"})
    assert resp.status == 503, await resp.text()
    events = await asyncio.wait_for(stream, 300)
    assert events[-1][0] == "image_generation.completed", events[-1]
    await asyncio.wait_for(shutdown, 120)
    assert not cluster.is_ready and cluster.stats()["phase"] == "stopped"
