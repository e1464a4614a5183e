"""A bounded burst: 200 concurrent requests against a server whose queue holds 4.

Every request gets exactly one well-formed answer, an image or a 429 with Retry-After; afterwards
the engine is idle, its counters agree with what the clients saw, and the server still serves.
"""
from __future__ import annotations

import asyncio
import base64

from test_server_support import ServingTestServer, png_size, small_config, wait_until_idle
from tetri_engine.server import create_app, wait_until_ready

BURST = 200


async def test_burst_of_200_gets_one_answer_each(aiohttp_client):
    app = create_app(small_config(max_queue=4))
    client = await aiohttp_client(ServingTestServer(app))
    await wait_until_ready(app)

    async def one(i: int) -> tuple[int, dict, str | None]:
        resp = await client.post("/v1/images/generations", json={
            "prompt": f"burst {i}", "size": "64x64", "num_inference_steps": 2, "seed": i})
        return resp.status, await resp.json(), resp.headers.get("Retry-After")

    answers = await asyncio.gather(*(one(i) for i in range(BURST)))
    assert len(answers) == BURST
    images = [body for status, body, _ in answers if status == 200]
    refusals = [(body, retry) for status, body, retry in answers if status == 429]
    assert len(images) + len(refusals) == BURST, {status for status, _, _ in answers}
    assert images and refusals  # the queue of 4 cannot take 200 at once
    for body in images:
        assert png_size(base64.b64decode(body["data"][0]["b64_json"])) == (64, 64)
    for body, retry_after in refusals:
        # Retry-After: the engine's estimate (queue_full), or the scheduler's when it has one (busy).
        code = body["error"]["code"]
        assert code in ("queue_full", "busy")
        if code == "queue_full" or retry_after is not None:
            assert int(retry_after) >= 1
    # Seeds were distinct per request: the answers are each request's own.
    assert len({body["metrics"][0]["seed"] for body in images}) == len(images)

    await wait_until_idle(client)
    stats = app_engine_stats(app)
    assert stats["states"].get("completed", 0) == len(images)
    assert stats["states"].get("failed", 0) == 0
    # The server still serves after the burst.
    resp = await client.post("/v1/images/generations", json={
        "prompt": "after", "size": "64x64", "num_inference_steps": 2})
    assert resp.status == 200


def app_engine_stats(app) -> dict:
    from tetri_engine.server.app import ENGINE

    return app[ENGINE].stats()


async def test_n_images_the_queue_cannot_hold_are_refused_whole(aiohttp_client):
    app = create_app(small_config(max_queue=4, max_steps=1000))
    client = await aiohttp_client(ServingTestServer(app))
    await wait_until_ready(app)
    long = [asyncio.ensure_future(client.post("/v1/images/generations", json={
        "prompt": "long", "size": "256x256", "num_inference_steps": 1000, "deadline_ms": 600_000, "seed": i}))
        for i in range(2)]
    for _ in range(200):  # until both hold a queue slot (bounded polls)
        health = await (await client.get("/health")).json()
        if health["running"] + health["queue_depth"] == 2:
            break
        await asyncio.sleep(0.05)
    before = app_engine_stats(app)["states"]
    resp = await client.post("/v1/images/generations", json={"prompt": "three", "size": "64x64", "n": 3})
    assert resp.status == 429 and (await resp.json())["error"]["code"] == "queue_full"
    assert int(resp.headers["Retry-After"]) >= 1
    after = app_engine_stats(app)["states"]
    # Three engine requests refused: three rejected, none admitted and then cancelled.
    assert after["rejected"] - before["rejected"] == 3 and after["cancelled"] == before["cancelled"]
    assert (await client.post("/v1/images/generations", json={"prompt": "two", "size": "64x64", "n": 2,
                                                              "num_inference_steps": 1})).status == 200
    for task in long:
        task.cancel()
    await asyncio.gather(*long, return_exceptions=True)
    await wait_until_idle(client)
