"""Hostile but well-formed-enough bodies: each field of a valid request set to typed edge values
(Unicode digits, lone surrogates, NUL, huge and tiny numbers, wrong types, containers), and whole-body
mutations (encodings, compression, truncation, nesting), against the real server (tiny model).

Bounded: a fixed seed picks FIELD_MUTATIONS of the field x value grid, plus every body mutation
(< 300 requests; about 10 s on the 2-core CPU dev box). For each answer:
- never 5xx; a 4xx carries OpenAI's envelope; a 200 is a complete image answer (or a stream ending
  with `image_generation.completed`);
- the expected outcome comes from the API's documented rules (`RULES` below, written from README and
  OpenAI's `ImageGenerateParams`, not from server/protocol.py): a value outside them must be a 4xx;
  a value inside them must be a 200. The harmless mutations, answered 200: null for an optional
  field, any valid value of the field's type and range (e.g. seed -0.0 or 0, guidance 5e-324, any
  text without lone surrogates in prompt / negative_prompt / user / safety_identifier, NUL and
  right-to-left marks included), `stream: true`, and a gzip-compressed valid body. deadline_ms and
  slo_scale in range may also be a 400 `deadline_impossible` (a tiny deadline cannot be met).
Afterwards the server is healthy, and client errors failed no request in /metrics.
"""
from __future__ import annotations

import base64
import gzip
import json
import math
import random
import zlib

import pytest

from test_server_support import ServingTestServer, parse_sse, png_size, small_config, wait_until_idle
from tetri_engine.server import create_app, wait_until_ready
from tetri_engine.server.state import ENGINE, STATE

GEN = "/v1/images/generations"
BASE = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 1, "seed": 3}
FIELD_MUTATIONS = 220
MAX_N, MAX_STEPS = 3, 20  # small_config()

VALUES = [None, True, False, 0, -1, 2.5, -0.0, 5e-324, 1e308, 10**30, 10**400,
          "", " \t\n", "a\x00b", "a \ud800 b", "\udfff", "😀 ü", "\u202e\u200b", "x" * 40000,
          "²x64", "٦٤x٦٤", "６４x６４", "1" * 5000 + "x64", "64x64", "auto", "low", "png", "tiny", "off",
          [1], {"a": 1}, [[[]]]]


def _text(value, max_chars=None) -> bool:
    if not isinstance(value, str) or (max_chars is not None and len(value) > max_chars):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _integer(value, low, high) -> bool:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value, low, high, above_low=False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int) and abs(value) > 1e300 or not math.isfinite(value):
        return False
    return (value > low if above_low else value >= low) and value <= high


def _size(value) -> bool:
    if value == "auto":
        return True
    parts = value.split("x") if isinstance(value, str) else []
    return len(parts) == 2 and all(p.isascii() and p.isdigit() and len(p) < 6 and int(p) % 16 == 0
                                   and 64 <= int(p) <= 256 for p in parts)


# field -> what the API accepts (None, i.e. absent, is accepted by every field but prompt).
RULES = {
    "prompt": lambda v: _text(v, 32000) and bool(v.strip()),
    "n": lambda v: _integer(v, 1, MAX_N),
    "size": _size,
    "response_format": lambda v: v == "b64_json",
    "model": lambda v: v == "tiny",
    "user": _text,
    "output_format": lambda v: v == "png",
    "stream": lambda v: isinstance(v, bool),
    "partial_images": lambda v: _integer(v, 0, 3),
    "background": lambda v: v in ("auto", "opaque"),
    "quality": lambda v: v in ("low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"),
    "style": lambda v: v in ("vivid", "natural"),
    "moderation": lambda v: v in ("low", "auto"),
    "safety_identifier": _text,
    "output_compression": lambda v: _integer(v, 0, 100),
    "num_inference_steps": lambda v: _integer(v, 1, MAX_STEPS),
    "guidance_scale": lambda v: _number(v, 0, 100),
    "negative_prompt": lambda v: _text(v, 32000),
    "seed": lambda v: _integer(v, 0, 2**63 - 1),
    "deadline_ms": lambda v: _number(v, 0, 86_400_000, above_low=True),
    "slo_scale": lambda v: _number(v, 0, 1000, above_low=True),
    "preview_every": lambda v: _integer(v, 0, MAX_STEPS),
    "progress_events": lambda v: isinstance(v, bool),
    "cache": lambda v: v in ("off", "auto"),
}
MAY_MISS_DEADLINE = {"deadline_ms", "slo_scale"}


def body_mutations() -> list[tuple[str, bytes, dict, set[int]]]:
    """(what, body, headers, acceptable statuses)."""
    valid = json.dumps(BASE).encode()
    json_type = {"Content-Type": "application/json"}
    cases = [
        ("not UTF-8 in a string", b'{"prompt": "caf\xe9"}', {}, {400}),
        ("UTF-16 with BOM", json.dumps(BASE).encode("utf-16"), {}, {400}),
        ("UTF-8 BOM", b"\xef\xbb\xbf" + valid, {}, {400}),
        ("raw NUL inside a string", b'{"prompt": "a\x00b"}', {}, {400}),
        ("NUL after the object", valid + b"\x00", {}, {400}),
        ("truncated", valid[:-3], {}, {400}),
        ("empty", b"", {}, {400}),
        ("array", b"[1, 2]", {}, {400}),
        ("string", b'"prompt"', {}, {400}),
        ("nested 20000 deep", b"[" * 20000 + b"]" * 20000, {}, {400}),
        ("duplicate key, last wrong", b'{"prompt": "x", "prompt": 5}', {}, {400}),
        ("1e99999 (infinity)", b'{"prompt": "x", "seed": 1e99999}', {}, {400}),
        ("5000-digit integer literal", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", {}, {400}),
        ("NaN literal", b'{"prompt": "x", "guidance_scale": NaN}', {}, {400}),
        ("key with a lone surrogate", b'{"prompt": "x", "\\ud800": 1}', {}, {400}),
        ("gzip garbage", b"not gzip at all", {"Content-Encoding": "gzip"}, {400}),
        ("deflate garbage", b"\x00\x01\x02garbage", {"Content-Encoding": "deflate"}, {400}),
        ("brotli (not installed)", valid, {"Content-Encoding": "br"}, {400, 415}),
        ("gzip of a valid body", gzip.compress(valid), {"Content-Encoding": "gzip"}, {200}),
        ("deflate of a valid body", zlib.compress(valid), {"Content-Encoding": "deflate"}, {200}),
        ("gzip bomb over the body limit", gzip.compress(b" " * (1 << 20) + valid), {"Content-Encoding": "gzip"},
         {413}),
        ("over the body limit", b'{"prompt": "' + b"x" * 70000 + b'"}', {}, {413}),
        ("text/plain", valid, {"Content-Type": "text/plain"}, {415}),
        ("JSON in UTF-16 by its charset", valid, {"Content-Type": "application/json; charset=utf-16"}, {415}),
    ]
    return [(what, body, {**json_type, **headers}, ok) for what, body, headers, ok in cases]


def field_mutations() -> list[tuple[str, object]]:
    grid = [(field, value) for field in sorted(RULES) for value in VALUES]
    grid += [(field, "<absent>") for field in sorted(RULES)]
    return random.Random(15).sample(grid, FIELD_MUTATIONS)


def expected(field: str, value) -> set[int]:
    if value == "<absent>" or value is None:
        ok = field != "prompt"
    else:
        ok = RULES[field](value)
    if not ok:
        return {400}
    return {200, 400} if field in MAY_MISS_DEADLINE else {200}


async def check_answer(resp, allowed: set[int], what: str) -> None:
    text = await resp.text()
    assert resp.status in allowed, f"{what}: {resp.status} {text[:300]}"
    if resp.status >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], what
        if resp.status == 400 and allowed == {200, 400}:
            assert error["code"] == "deadline_impossible", what
    elif resp.headers["Content-Type"].startswith("text/event-stream"):
        assert parse_sse(text)[-1][0] == "image_generation.completed", what
    else:
        body = json.loads(text)
        assert len(body["data"]) == len(body["metrics"]) >= 1, what
        assert png_size(base64.b64decode(body["data"][0]["b64_json"])) == (64, 64), what


@pytest.mark.timeout(120)
async def test_mutated_bodies_get_4xx_with_envelope_or_an_image_and_the_server_stays_healthy(aiohttp_client):
    app = create_app(small_config())
    client = await aiohttp_client(ServingTestServer(app))
    await wait_until_ready(app)
    count = 0
    for field, value in field_mutations():
        body = {k: v for k, v in BASE.items() if k != field}
        if value != "<absent>":
            body[field] = value
        resp = await client.post(GEN, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        await check_answer(resp, expected(field, value), f"{field}={str(value)[:40]!r}")
        count += 1
    for what, raw, headers, allowed in body_mutations():
        resp = await client.post(GEN, data=raw, headers=headers, skip_auto_headers=["Content-Type"])
        await check_answer(resp, allowed, what)
        count += 1
    assert count < 300
    health = await wait_until_idle(client)
    assert health["status"] == "ok"
    states = app[ENGINE].stats()["states"]
    assert states["failed"] == 0  # client errors never count as failed requests (nor miss deadlines)
    assert not [status for (_, status) in app[STATE].responses if status >= 500]
