"""The dashboard in a real browser: headless Chromium (Debian's chromium + chromium-driver, through
selenium; `make browser` installs them) loads /dashboard from a live tiny-model server that has an
API key, given as a user gives it (HTTP Basic, for the page, its files and its event stream), while
a burst runs. The DOM must show the queue while it is busy and, after, a block for every group that
ran, with the right request, size, degree and devices, late requests marked. Saves a screenshot
(its path is printed). Skips, saying why, where Chromium is not installed."""
from __future__ import annotations

import asyncio
import os
import random

import pytest

from browser_support import MISSING, READ_BLOCKS, find_binaries, headless_chromium, save_page_png, with_key
from test_server_support import ServingTestServer, small_config
from tetri_engine.server import create_app, wait_until_ready
from tetri_engine.server.app import ENGINE

pytest.importorskip("selenium", reason="selenium is not installed (it is in the `dev` extra)")
if find_binaries() is None:
    pytest.skip(MISSING, allow_module_level=True)

GEN = "/v1/images/generations"
KEY = "browser-key"
SIZES = ["256x256", "192x192", "128x128", "256x128"]
POLLS = 300  # DOM reads, 0.1 s apart at least: the test fails rather than waits for ever

READ_QUEUE = "return [...document.querySelectorAll('#queue tbody tr[data-request]')].map(r => r.dataset.request);"
READ_COMPLETED = "return document.getElementById('completed').textContent;"


async def poll_dom(chrome, script: str, done):
    """Run script in the page until done(result) (bounded); return the last result."""
    for _ in range(POLLS):
        result = await asyncio.to_thread(chrome.execute_script, script)
        if done(result):
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"the page never showed it; last read: {result}")


async def test_dashboard_in_headless_chromium_shows_the_burst(aiohttp_client, tmp_path):
    # fixed2: every group is two devices wide (tetri picks one device for these sizes on a CPU), so
    # the page must draw blocks that span two lanes.
    app = create_app(small_config(api_key=KEY, policy="fixed2", max_steps=200, max_queue=16,
                                  admission="best_effort"))
    client = await aiohttp_client(ServingTestServer(app))
    await wait_until_ready(app)
    auth = {"Authorization": f"Bearer {KEY}"}
    chrome = await asyncio.to_thread(headless_chromium, 1280, 860)
    try:
        await asyncio.to_thread(chrome.get, with_key(str(client.make_url("/dashboard?window=60")), KEY))
        await poll_dom(chrome, "return document.getElementById('connection').textContent;", lambda t: t == "live")

        # 1. A long request: the page shows it queued with a deadline and slack, and running.
        long = asyncio.ensure_future(client.post(GEN, headers=auth, json={
            "prompt": "long", "size": "256x256", "num_inference_steps": 200, "deadline_ms": 600_000}))
        queue = await poll_dom(chrome, READ_QUEUE, lambda ids: len(ids) == 1)
        row = await asyncio.to_thread(chrome.execute_script,
                                      "const r = document.querySelector('#queue tbody tr[data-request]');"
                                      "return [...r.cells].map(c => c.textContent);")
        assert row[1] == "256×256" and row[4].endswith(" s") and row[5].endswith(" s"), row
        await poll_dom(chrome, READ_BLOCKS, lambda blocks: any(b["running"] and queue[0] in b["requests"]
                                                               for b in blocks))

        # 2. A mixed burst, one of them with a deadline it cannot meet.
        rng = random.Random(0)
        bodies = [{"prompt": f"burst {i}", "size": SIZES[i % len(SIZES)], "seed": i,
                   "num_inference_steps": rng.choice([6, 8, 10])} for i in range(10)]
        bodies.append({"prompt": "hopeless", "size": "256x256", "num_inference_steps": 40, "deadline_ms": 1})
        answers = await asyncio.gather(long, *(client.post(GEN, headers=auth, json=b) for b in bodies))
        assert [a.status for a in answers] == [200] * len(answers)
        ids = [a.headers["X-Request-Id"] for a in answers]
        size_of = dict(zip(ids, ["256x256"] + [b["size"] for b in bodies]))
        late_id = ids[-1]

        # 3. Every group the engine ran for them is a block on the page, and nothing else is.
        await poll_dom(chrome, READ_COMPLETED, lambda text: text == str(len(ids)))
        blocks = await poll_dom(chrome, READ_BLOCKS, lambda blocks: set(ids) <= {
            rid for b in blocks if not b["running"] for rid in b["requests"]})
        ran = {(rid, g.degree, g.devices) for r in app[ENGINE].round_records() for g in r.groups
               for rid in g.request_ids}
        shown = {(rid, b["degree"], tuple(b["devices"])) for b in blocks if not b["running"]
                 for rid in b["requests"]}
        assert shown == ran
        devices = set(app[ENGINE].devices)
        for b in blocks:
            assert b["degree"] == len(b["devices"]) == 2 and set(b["devices"]) <= devices
            assert b["rects"] == 1, b  # two adjacent devices: one block two lanes tall
            assert b["size"] == size_of[b["requests"][0]].replace("x", "×"), b
        # Late requests are marked: the hopeless one, and every one that missed its deadline.
        missed = {rid for rid, a in zip(ids, answers) if not (await a.json())["metrics"][0]["deadline_met"]}
        assert late_id in missed
        assert all(b["late"] for b in blocks if missed & set(b["requests"]))
    finally:
        path = os.path.join(tmp_path, "dashboard.png")
        try:
            await asyncio.to_thread(save_page_png, chrome, path)
            print(f"dashboard screenshot: {path}")
        finally:
            await asyncio.to_thread(chrome.quit)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
