"""The live dashboard over HTTP (no browser: tests/test_server_dashboard_browser.py has that): the page
and its files, the event stream's content against what the engine ran, the API key, --no-dashboard,
bad input, bounded memory, and streams that end when the server shuts down."""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re

from test_server_support import ServingTestServer, small_config, wait_until_idle
from tetri_engine.server import ServerConfig, create_app, wait_until_ready
from tetri_engine.server import dashboard_feed
from tetri_engine.server.app import ENGINE

GEN = "/v1/images/generations"


async def read_event(resp) -> tuple[str, dict]:
    """The next SSE frame of a dashboard stream as (event, body)."""
    fields = {}
    while True:
        line = (await resp.content.readline()).decode()
        if not line:
            raise AssertionError("the stream ended")
        if line == "\n":
            if fields:
                return fields["event"], json.loads(fields["data"])
            continue
        name, _, value = line.rstrip("\n").partition(": ")
        fields[name] = value


async def read_until(resp, predicate, max_events: int = 120) -> dict:
    """Events until one whose body satisfies predicate (bounded in events: 0.5 s each)."""
    for _ in range(max_events):
        _, body = await read_event(resp)
        if predicate(body):
            return body
    raise AssertionError("the stream never showed it")


async def snapshot_once(client, predicate, window_s: str = "120") -> tuple[dict, object]:
    """The snapshot a page connecting now gets, once a page saw the feed satisfy predicate (the feed
    publishes every 0.5 s: what just ended shows within one publish). Returns it and its stream."""
    first = await client.get("/dashboard/stream", params={"window_s": window_s})
    await read_until(first, predicate)
    first.close()
    stream = await client.get("/dashboard/stream", params={"window_s": window_s})
    event, body = await read_event(stream)
    assert event == "snapshot"
    return body, stream


def basic(user: str, key: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


async def test_page_loads_only_files_the_server_serves(aiohttp_client):
    app = create_app(small_config())
    client = await aiohttp_client(ServingTestServer(app))
    resp = await client.get("/dashboard")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert resp.headers["Content-Security-Policy"] == "default-src 'self'"
    html = await resp.text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(not re.match(r"[a-z]+:|//", ref) for ref in refs), refs  # relative: no CDN
    for ref in refs:  # each resolves (from /dashboard) to a route that serves it
        asset = await client.get(f"/{ref}")
        assert asset.status == 200, ref
        assert asset.content_type in ("text/javascript", "text/css")
    script = await (await client.get("/dashboard/dashboard.js")).text()
    assert "dashboard/stream" in script and not re.search(r"(?:fetch|import)\(\s*['\"`]https?:", script)
    assert (await client.get("/dashboard/nothing.js")).status == 404


async def test_stream_shows_the_groups_queue_and_counters_of_what_ran(aiohttp_client):
    app = create_app(small_config(max_steps=200, admission="best_effort"))
    client = await aiohttp_client(ServingTestServer(app))
    await wait_until_ready(app)
    sizes = {"a": (256, 256), "b": (128, 128), "c": (192, 128)}
    answers = await asyncio.gather(*(client.post(GEN, json={
        "prompt": name, "size": f"{w}x{h}", "num_inference_steps": 8, "seed": i})
        for i, (name, (w, h)) in enumerate(sizes.items())))
    assert [a.status for a in answers] == [200] * 3
    ids = {a.headers["X-Request-Id"]: sizes[name] for a, name in zip(answers, sizes)}

    snapshot, stream = await snapshot_once(client, lambda b: b["counters"]["states"]["completed"] == 3)
    assert stream.status == 200 and stream.headers["Content-Type"] == "text/event-stream"
    assert snapshot["window_s"] == 120
    assert snapshot["devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"] and snapshot["phase"] == "ready"
    engine = app[ENGINE]
    expected = {(rid, g.degree, g.devices, g.start_s) for r in engine.round_records() for g in r.groups
                for rid in g.request_ids if rid in ids}
    shown = {(rid, g["degree"], tuple(g["devices"]), g["start_s"]) for g in snapshot["groups"]
             for rid in g["request_ids"] if rid in ids}
    assert shown == expected and {rid for rid, *_ in shown} == set(ids)
    for g in snapshot["groups"]:
        if g["request_ids"][0] in ids:
            assert (g["width"], g["height"]) == ids[g["request_ids"][0]]
            assert g["degree"] == len(g["devices"]) and g["steps"] >= 1 and not g["running"]
    counters = snapshot["counters"]
    assert counters["states"]["completed"] == 3 and counters["queue_depth"] == 0
    assert counters["met_window"] + counters["missed_window"] == counters["deadline_total"] == 3
    assert counters["comm_cache"]["size"] >= 1 and set(counters["busy_window"]) == set(snapshot["devices"])
    assert any(f > 0 for f in counters["busy_window"].values())
    assert (await read_event(stream))[0] == "tick"

    # While a long request and a hopeless one run: the queue with deadlines and slack, the group
    # running now, the late one marked late; then their blocks, and the miss counted.
    long = asyncio.ensure_future(client.post(GEN, json={
        "prompt": "long", "size": "256x256", "num_inference_steps": 200, "deadline_ms": 600_000}))
    hopeless = asyncio.ensure_future(client.post(GEN, json={
        "prompt": "hopeless", "size": "256x256", "num_inference_steps": 200, "deadline_ms": 1}))
    body = await read_until(stream, lambda b: len(b["queue"]) == 2)
    rows = {r["request_id"]: r for r in body["queue"]}
    late = [r for r in rows.values() if r["late"]]
    on_time = [r for r in rows.values() if not r["late"]]
    assert len(late) == 1 and late[0]["slack_s"] < 0
    assert len(on_time) == 1 and 0 < on_time[0]["slack_s"] < on_time[0]["deadline_in_s"] < 600
    assert body["queue"][0] is late[0]  # ordered by deadline
    body = await read_until(stream, lambda b: any(not g["ended"] for g in b["running"]))
    running = [g for g in body["running"] if not g["ended"]]
    assert all(g["running"] for g in body["running"])
    assert all(g["degree"] == len(g["devices"]) and set(g["request_ids"]) <= set(rows) for g in running)
    late_id = late[0]["request_id"]
    answers = await asyncio.gather(long, hopeless)
    assert [a.status for a in answers] == [200, 200]
    again, _ = await snapshot_once(client, lambda b: b["counters"]["states"]["completed"] == 5)
    late_groups = [g for g in again["groups"] if late_id in g["request_ids"]]
    assert late_groups and all(late_id in g["late"] for g in late_groups)
    assert again["counters"]["missed_window"] >= 1 and again["counters"]["sar_window"] < 1


async def test_api_key_covers_page_files_and_stream(aiohttp_client):
    app = create_app(small_config(api_key="k3y"))
    client = await aiohttp_client(ServingTestServer(app))
    for path in ("/dashboard", "/dashboard/dashboard.js", "/dashboard/dashboard.css", "/dashboard/stream"):
        for headers in ({}, basic("me", "wrong"), {"Authorization": "Bearer wrong"},
                        {"Authorization": "Basic !!notbase64"}, basic("k3y", "")):
            resp = await client.get(path, headers=headers)
            assert resp.status == 401, (path, headers)
            assert resp.headers["WWW-Authenticate"].startswith('Basic realm="tetri-engine dashboard"')
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
    # A browser sends Basic (any user name, the key as password); a script may send Bearer.
    assert (await client.get("/dashboard", headers=basic("anyone", "k3y"))).status == 200
    assert (await client.get("/dashboard/dashboard.js", headers={"Authorization": "Bearer k3y"})).status == 200
    stream = await client.get("/dashboard/stream", headers=basic("", "k3y"))
    assert stream.status == 200 and (await read_event(stream))[0] == "snapshot"
    stream.close()
    assert (await client.get("/health")).status != 401  # probes still need no key


async def test_no_dashboard_flag_leaves_the_routes_out(aiohttp_client):
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    assert ServerConfig.from_args(parser.parse_args([])).dashboard is True
    config = ServerConfig.from_args(parser.parse_args(["--no-dashboard"]))
    assert config.dashboard is False
    client = await aiohttp_client(ServingTestServer(create_app(small_config(dashboard=False))))
    for path in ("/dashboard", "/dashboard/stream", "/dashboard/dashboard.js"):
        assert (await client.get(path)).status == 404


async def test_bad_window_is_a_400_that_says_what_to_send(aiohttp_client):
    client = await aiohttp_client(ServingTestServer(create_app(small_config())))
    for value in ("5", "301", "abc", "nan", "inf", ""):
        resp = await client.get("/dashboard/stream", params={"window_s": value})
        assert resp.status == 400, value
        error = (await resp.json())["error"]
        assert error["param"] == "window_s" and "10 to 300" in error["message"]


async def test_memory_stays_bounded_and_streams_end_on_shutdown(aiohttp_client, monkeypatch):
    monkeypatch.setattr(dashboard_feed, "MAX_GROUPS", 3)
    monkeypatch.setattr(dashboard_feed, "MAX_KNOWN", 2)
    app = create_app(small_config())
    client = await aiohttp_client(ServingTestServer(app))
    await wait_until_ready(app)
    for i in range(6):
        resp = await client.post(GEN, json={"prompt": f"r{i}", "size": "128x128", "num_inference_steps": 4})
        assert resp.status == 200
    await wait_until_idle(client)
    snapshot, stream = await snapshot_once(client, lambda b: b["counters"]["states"]["completed"] == 6, "300")
    assert 1 <= len(snapshot["groups"]) <= 3  # only the most recent groups are kept
    assert snapshot["counters"]["rounds"] >= 6
    feed = app[dashboard_feed_key()]
    assert len(feed._known) <= 2 and len(feed._late) <= 2

    await app.shutdown()  # what aiohttp runs on SIGTERM: open streams end instead of holding the drain
    rest = await asyncio.wait_for(stream.content.read(), timeout=30)
    assert stream.content.at_eof(), rest[-200:]


def dashboard_feed_key():
    from tetri_engine.server.dashboard import FEED

    return FEED
