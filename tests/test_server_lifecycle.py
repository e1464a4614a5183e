"""Server life cycle and access: API key (401), draining (503), an engine that fails to start
(503), and `tetri-engine serve` as a user runs it: the printed curl line works, SIGTERM drains."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from test_server_support import small_config
from tetri_engine.server import create_app, wait_until_ready

GEN = "/v1/images/generations"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 2}


async def test_api_key_then_draining(aiohttp_client):
    app = create_app(small_config(api_key="s3cret"))
    client = await aiohttp_client(app)
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
    client = await aiohttp_client(app)
    with pytest.raises(Exception):
        await wait_until_ready(app)
    health = await client.get("/health")
    assert health.status == 503
    body = await health.json()
    assert body["status"] == "failed" and body["error"]
    resp = await client.post(GEN, json=SMALL)
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "engine_failed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_serve_prints_a_curl_line_that_works_and_sigterm_drains(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tetri_engine", "serve", "--port", str(port), "--devices",
         "cpu:0,cpu:1", "--max-width", "256", "--max-height", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": REPO_ROOT})
    try:
        lines = []
        for line in server.stdout:  # until the server says it is ready (or exits)
            lines.append(line)
            if line.startswith("curl "):
                break
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
