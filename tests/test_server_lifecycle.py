"""Server life cycle and access: API key (401), draining (503), an engine that fails to start
(503), the drain with a short timeout, and `tetri-engine serve` as a user runs it: the printed curl
line works, SIGTERM drains."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys

import aiohttp
import pytest

from test_server_support import (REPO_ROOT, ServingTestServer, envelope, free_port, parse_sse, serve_on_loopback,
                                 small_config, split_answer, start_serve)
from tetri_engine.server import create_app, lifecycle, wait_until_ready
from tetri_engine.server.state import ENGINE

GEN = "/v1/images/generations"
SMALL = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 2}


async def test_api_key_then_draining(aiohttp_client):
    app = create_app(small_config(api_key="s3cret"))
    client = await aiohttp_client(ServingTestServer(app))
    await wait_until_ready(app)

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        resp = await client.post(GEN, json=SMALL, headers=headers)
        assert resp.status == 401
        body = await resp.json()
        assert body["error"]["code"] == "invalid_api_key"
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert (await client.get("/v1/models")).status == 401
    assert (await client.get("/health")).status == 200  # probes need no key
    good = {"Authorization": "Bearer s3cret"}
    assert (await client.post(GEN, json=SMALL, headers=good)).status == 200

    await app.shutdown()  # what aiohttp runs on SIGTERM once it stops listening: the server drains
    resp = await client.post(GEN, json=SMALL, headers=good)
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "server_draining"
    assert (await (await client.get("/health")).json())["status"] == "draining"


async def test_engine_that_fails_to_start_answers_503(aiohttp_client, tmp_path):
    app = create_app(small_config(model=str(tmp_path / "no-such-model")))
    client = await aiohttp_client(ServingTestServer(app))
    with pytest.raises(Exception):
        await wait_until_ready(app)
    health = await client.get("/health")
    assert health.status == 503
    body = await health.json()
    assert body["status"] == "failed" and body["error"]
    resp = await client.post(GEN, json=SMALL)
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "engine_failed"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_serve_prints_a_curl_line_that_works_and_sigterm_drains(tmp_path):
    port = free_port()
    server, lines = start_serve(tmp_path, port, "--devices", "cpu:0,cpu:1", "--max-width", "256", "--max-height", "256")
    try:
        curl = lines[-1].strip()
        assert curl.startswith(f"curl -s http://127.0.0.1:{port}/"), "".join(lines)
        done = subprocess.run(["bash", "-c", curl], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "image.png").read_bytes().startswith(b"\x89PNG")
        server.send_signal(signal.SIGTERM)
        rest = server.communicate(timeout=60)[0]
        assert server.returncode == 0, rest
        assert "stopped" in rest
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "tetri_engine", "serve", "--help"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert out.returncode == 0
    flags = set(re.findall(r"--[a-z][a-z0-9-]+", out.stdout))
    assert {"--host", "--port", "--model", "--devices", "--profile", "--max-queue",
            "--api-key"} <= flags


async def test_drain_cuts_what_is_left_at_its_timeout_with_503_and_an_error_event():
    """One drain timeout, applied once: requests still running at it are cut, a JSON client gets a
    503 in the envelope, a stream an `error` event and a clean end; meanwhile the port stays open
    (/health 503 "draining", new generation 503), a request that ends in time is served, and an
    upload that stalls is cut at once rather than holding the drain."""
    timeout_s = 1.5
    app = create_app(small_config(drain_timeout_s=timeout_s, max_steps=1000, keepalive_timeout_s=30))
    runner, port = await serve_on_loopback(app)
    await wait_until_ready(app)
    long = {"prompt": "long", "size": "256x256", "num_inference_steps": 1000, "deadline_ms": 600_000}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        waiting = asyncio.ensure_future(session.post(GEN, json=long))
        stream = await session.post(GEN, json={**long, "stream": True})
        assert (await stream.content.readuntil(b"event: tetri.step")).startswith(b"event: tetri.queued")
        for _ in range(200):  # until both are in the engine (bounded polls)
            if (await (await session.get("/health")).json())["running"] == 2:
                break
            await asyncio.sleep(0.05)
        stalled = await asyncio.open_connection("127.0.0.1", port)
        stalled[1].write(f"POST {GEN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         "Content-Length: 100\r\n\r\n{\"pro".encode())
        short = asyncio.ensure_future(session.post(GEN, json=SMALL))
        await asyncio.sleep(0.05)

        loop = asyncio.get_running_loop()
        started_s = loop.time()
        stopping = asyncio.ensure_future(lifecycle.stop(runner))
        await asyncio.sleep(0.1)
        # The stalled upload is answered at once; the port still answers during the drain.
        status, _, body = split_answer(await asyncio.wait_for(stalled[0].readuntil(b"}}"), 10))
        stalled[1].close()
        assert status == 503 and envelope(body)["code"] == "server_shutting_down"
        health = await session.get("/health")
        assert health.status == 503 and (await health.json())["status"] == "draining"
        refused = await session.post(GEN, json=SMALL)
        assert refused.status == 503 and (await refused.json())["error"]["code"] == "server_draining"
        assert (await short).status == 200  # in flight, and done within the timeout
        # At the timeout: the JSON client gets a 503, the stream an error event and its end.
        cut = await waiting
        assert cut.status == 503 and (await cut.json())["error"]["code"] == "server_shutting_down"
        frames = parse_sse((await stream.content.read()).decode().partition("\n\n")[2])
        assert frames[-1][0] == "error" and frames[-1][1]["error"]["code"] == "server_shutting_down"
        assert all(event.startswith("tetri.") for event, _ in frames[:-1])
        await stopping
        elapsed_s = loop.time() - started_s
    assert timeout_s <= elapsed_s < 2 * timeout_s, elapsed_s  # applied once, not twice
    states = app[ENGINE].stats()["states"]
    assert states["cancelled"] == 2 and states["failed"] == 0
