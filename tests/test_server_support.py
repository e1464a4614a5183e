"""Shared pieces of the server tests (no tests here): a small config, the app served as `serve`
serves it, raw HTTP on a socket, SSE parsing, waiting for idle.

Every server test runs the real engine with the tiny model on virtual CPU devices, on loopback.
"""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys

from aiohttp import web
from aiohttp.test_utils import TestServer

from tetri_engine.config import EngineConfig
from tetri_engine.server import ServerConfig, make_runner

CPU_DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides) -> ServerConfig:
    """Tiny model, 4 CPU devices, small limits so that bad sizes and bodies are cheap to send.
    overrides: fields of ServerConfig or of its EngineConfig."""
    values = dict(model="tiny", devices=list(CPU_DEVICES), max_width=256, max_height=256,
                  max_steps=20, max_n=3, default_size="64x64", max_queue=8,
                  max_body_bytes=64 * 1024, port=0)
    values.update(overrides)
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    engine = EngineConfig(**{k: v for k, v in values.items() if k in engine_fields})
    return ServerConfig(engine=engine, **{k: v for k, v in values.items() if k not in engine_fields})


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """Complete SSE frames of `text` as (event, data) pairs."""
    frames = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            fields[name] = value
        frames.append((fields.get("event", "message"), json.loads(fields["data"])))
    return frames


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


async def wait_until_idle(client, max_polls: int = 400) -> dict:
    """Poll /health until nothing is queued or running; return that /health body.

    Bounded in polls, not timed: the test fails if the engine never gets there."""
    for _ in range(max_polls):
        resp = await client.get("/health")
        body = await resp.json()
        if body.get("status") == "ok" and body["queue_depth"] == 0 and body["running"] == 0:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"the engine did not become idle: {body}")


class ServingTestServer(TestServer):
    """aiohttp's TestServer, running the app on the runner `tetri-engine serve` uses (its bounded
    connections): `await aiohttp_client(ServingTestServer(app))`."""

    async def _make_runner(self, **kwargs):
        return make_runner(self.app, **kwargs)


async def serve_on_loopback(app: web.Application) -> tuple[web.AppRunner, int]:
    """The app served as `tetri-engine serve` serves it, on 127.0.0.1 and a free port: (runner, port).
    Stop it with `lifecycle.stop(runner)` (the drain) or `runner.cleanup()`."""
    runner = make_runner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def raw_http(port: int, data: bytes, max_wait_s: float = 20.0) -> bytes:
    """Send raw bytes on a new connection; everything the server sends until it closes (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), max_wait_s)
    finally:
        writer.close()


def split_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP answer -> (status, headers with lower-case names, body)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def envelope(body: bytes) -> dict:
    """The OpenAI error envelope of an answer body; fails unless it is one."""
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(cwd, port: int, *flags: str) -> tuple[subprocess.Popen, list[str]]:
    """`tetri-engine serve --port PORT FLAGS...` as a user starts it, read until it prints its curl line
    (ready) or exits: the process (the caller stops it) and the lines it printed."""
    server = subprocess.Popen([sys.executable, "-m", "tetri_engine", "serve", "--port", str(port), *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                              env={**os.environ, "PYTHONPATH": REPO_ROOT})
    lines = []
    for line in server.stdout:
        lines.append(line)
        if line.startswith("curl "):
            break
    return server, lines
