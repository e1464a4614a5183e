"""Every way a client can hold a connection is bounded (server/connection.py), one slow client per
timeout, on raw sockets against the app served as `tetri-engine serve` serves it: headers that never
complete, a body that never arrives, an idle keep-alive connection, an answer nobody reads, one
connection too many. And HTTP that aiohttp's parser refuses is answered in OpenAI's envelope, with
one log line and no traceback. Every wait is bounded (raw_http's max_wait_s, polls)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket

import pytest

from test_server_support import envelope, raw_http, serve_on_loopback, small_config, split_answer
from tetri_engine.server import create_app, wait_until_ready
from tetri_engine.server.state import STATE

GEN = "/v1/images/generations"
SMALL = json.dumps({"prompt": "a red fox", "size": "64x64", "num_inference_steps": 1}).encode()


def post(body: bytes, *headers: str, content_length: int | None = None) -> bytes:
    head = [f"POST {GEN} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(body) if content_length is None else content_length}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@contextlib.asynccontextmanager
async def served(**overrides):
    """A server on loopback with these settings: (app, port)."""
    app = create_app(small_config(**overrides))
    runner, port = await serve_on_loopback(app)
    try:
        await wait_until_ready(app)
        yield app, port
    finally:
        await runner.cleanup()


async def until(predicate, polls: int = 200) -> None:
    for _ in range(polls):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("never happened")


async def test_request_headers_must_complete_in_time(caplog):
    caplog.set_level(logging.INFO, logger="tetri_engine.server")
    async with served(header_timeout_s=0.3, keepalive_timeout_s=30) as (app, port):
        # Headers sent slowly but in time are served.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\n")
        await asyncio.sleep(0.1)
        writer.write(b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        status, _, _ = split_answer(await asyncio.wait_for(reader.read(), 20))
        writer.close()
        assert status == 200
        # Headers that never complete: 408 in the envelope, and the connection is closed.
        status, headers, body = split_answer(await raw_http(port, b"POST /v1/images/generations HTTP/1.1\r\nHost: x"))
        assert status == 408 and headers["connection"] == "close"
        assert envelope(body)["code"] == "header_timeout"
        await until(lambda: app[STATE].open_connections == 0)
    assert "no complete request headers within 0.3 s" in caplog.text


async def test_a_body_that_never_arrives_is_a_408():
    async with served(body_timeout_s=0.3) as (app, port):
        status, _, body = split_answer(await raw_http(port, post(b'{"prompt": "x"', content_length=100)))
        assert status == 408 and envelope(body)["code"] == "body_timeout"
        await until(lambda: app[STATE].open_connections == 0)  # then the connection goes


async def test_idle_connections_are_closed_after_the_keepalive_timeout():
    async with served(keepalive_timeout_s=0.3, header_timeout_s=30) as (app, port):
        # One that never sends a byte, and one idle after its answer: both closed by the server.
        silent = await asyncio.open_connection("127.0.0.1", port)
        used = await asyncio.open_connection("127.0.0.1", port)
        used[1].write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = await asyncio.wait_for(used[0].readuntil(b"}"), 20)
        assert first.startswith(b"HTTP/1.1 200")
        for reader, writer in (silent, used):
            rest = await asyncio.wait_for(reader.read(), 20)  # b"" once the server closes
            assert b"HTTP/" not in rest
            writer.close()
        assert app[STATE].open_connections == 0


async def test_an_answer_nobody_reads_is_cut_after_the_write_timeout(caplog):
    caplog.set_level(logging.INFO, logger="tetri_engine.server")
    # Two 1024x1024 PNGs of noise are ~6.6 MB of base64: more than the kernel buffers on loopback
    # take (about 3 MB here), so the rest waits in the server, which must not hold it for ever.
    async with served(write_timeout_s=0.5, keepalive_timeout_s=60, max_width=1024, max_height=1024) as (app, port):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(post(json.dumps({"prompt": "x", "size": "1024x1024", "n": 2, "num_inference_steps": 1}).encode()))
        await writer.drain()
        await until(lambda: app[STATE].open_connections == 1)
        await until(lambda: app[STATE].open_connections == 0, polls=400)  # never read: aborted
        received = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(1 << 16), 20):
                received += chunk
        writer.close()
        _, headers, body = split_answer(received)
        assert len(body) < int(headers["content-length"])  # the rest was never sent, and is freed
    assert "read nothing of its answer for 0.5 s" in caplog.text


async def test_the_connection_cap_closes_idle_connections_first_then_answers_503(caplog):
    caplog.set_level(logging.INFO, logger="tetri_engine.server")
    async with served(max_connections=3, keepalive_timeout_s=30, header_timeout_s=30, body_timeout_s=30) as (app, port):
        # Idle sockets (a client's pool, or someone holding descriptors) cannot lock requests out:
        # a new connection closes the oldest idle one.
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await until(lambda: app[STATE].open_connections == 3)
        status, _, _ = split_answer(await raw_http(port, post(SMALL, "Connection: close")))
        assert status == 200
        assert await asyncio.wait_for(idle[0][0].read(), 20) == b""  # the oldest idle one was closed
        for _, writer in idle:
            writer.close()
        # Every connection with a request in progress (bodies still coming): one more gets a 503.
        busy = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(b'{"pro', content_length=100))
            busy.append((reader, writer))
        await until(lambda: len(app[STATE].in_flight.reading) == 3)  # three handlers reading their bodies
        status, headers, body = split_answer(await raw_http(port, b""))
        assert status == 503 and headers["retry-after"] == "1"
        assert envelope(body)["code"] == "too_many_connections"
        assert app[STATE].open_connections == 3  # the refused one was never counted, nor kept
        for _, writer in busy:
            writer.close()
        await until(lambda: app[STATE].open_connections == 0)
    assert "each with a request in progress (--max-connections)" in caplog.text


BAD_HTTP = [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414, "uri_too_long"),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, "header_too_large"),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(80)) + b"\r\n",
     431, "header_too_large"),
    (b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n", 400,
     "malformed_request"),
    (b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
     400, "malformed_request"),
    (b"G@T /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "malformed_request"),
    (b"BREW /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "malformed_request"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400, "malformed_request"),  # TLS hello
    (b"GET /health HTTP/1.1\r\n\r\n", 400, "malformed_request"),  # HTTP/1.1 without Host
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: x\r\n\r\n", 400, "malformed_request"),
]


async def test_malformed_http_is_answered_in_the_envelope_with_one_line_and_no_traceback(caplog):
    caplog.set_level(logging.DEBUG)
    async with served() as (app, port):
        for raw, status, code in BAD_HTTP:
            caplog.clear()
            answer, headers, body = split_answer(await raw_http(port, raw))
            assert (answer, envelope(body)["code"]) == (status, code), raw[:60]
            assert headers["content-type"].startswith("application/json")
            lines = [r for r in caplog.records if r.name.startswith(("tetri_engine.server", "aiohttp"))
                     and r.name != "aiohttp.access"]
            assert len(lines) == 1 and lines[0].exc_info is None, [r.getMessage() for r in lines]
        counted = sum(n for (route, _), n in app[STATE].responses.items() if route == "malformed")
        assert counted == len(BAD_HTTP)


async def test_unreadable_bodies_and_keys_are_4xx_not_500(caplog):
    caplog.set_level(logging.INFO)
    async with served(api_key="s3cret") as (app, port):
        key = "Authorization: Bearer s3cret"
        garbage = post(b"not gzip at all", key, "Content-Encoding: gzip", "Connection: close")
        status, _, body = split_answer(await raw_http(port, garbage))
        assert status == 400 and envelope(body)["code"] == "invalid_body"
        chunked = (f"POST {GEN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{key}\r\n"
                   "Transfer-Encoding: chunked\r\n\r\nzz\r\n").encode()
        status, _, body = split_answer(await raw_http(port, chunked))
        assert status == 400
        # A byte that is not UTF-8 in the key: refused as a wrong key, before anything else.
        status, _, body = split_answer(await raw_http(port, post(SMALL, "Authorization: Bearer s3cr\xffet",
                                                                 "Connection: close").replace(b"\xc3\xbf", b"\xff")))
        assert status == 401 and envelope(body)["code"] == "invalid_api_key"
        assert not any(status >= 500 for (_, status) in app[STATE].responses)
    assert not [r for r in caplog.records if r.exc_info and r.name != "tetri_engine.engine"]


async def test_a_client_that_leaves_mid_body_is_no_server_error(caplog):
    """Nobody is left to answer and nothing failed here: no 500 in the counts, no traceback, and the
    connection is freed."""
    caplog.set_level(logging.INFO, logger="tetri_engine.server")
    async with served(body_timeout_s=30) as (app, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post(b'{"prompt": "a', content_length=1000))
        await writer.drain()
        await until(lambda: app[STATE].open_connections == 1)
        await asyncio.sleep(0.2)  # the handler is reading the body
        writer.close()
        await until(lambda: app[STATE].open_connections == 0)
        await until(lambda: app[STATE].responses[("client_gone", 499)] == 1)
        assert not [key for key in app[STATE].responses if key[1] >= 500]
    assert "left before its request had been read" in caplog.text
    assert "Traceback" not in caplog.text and "unhandled error" not in caplog.text
