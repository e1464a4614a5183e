"""The live dashboard's routes: the page, its script and style, and its event stream.

  GET /dashboard                        the page (static/dashboard.html: plain HTML, JS and CSS)
  GET /dashboard/dashboard.js, .css     its script and style
  GET /dashboard/stream?window_s=60     Server-Sent Events: `snapshot` (the whole window: 10..300 s),
                                        then `tick` (what changed) every 0.5 s; bodies are JSON
                                        (dashboard_feed.py says what is in them)

`setup(app, ...)` adds them (the `serve` flag --no-dashboard leaves them out). Everything the page
loads comes from these routes: no CDN, users may be offline, and a Content-Security-Policy of 'self'
makes the browser refuse anything else.

Host, Origin and CORS rules are the app's (middleware.py), as for every route. API key: when the
server has one, every route here needs it, as `Authorization: Bearer KEY`
(scripts, curl) or HTTP Basic with the key as the password, any user name (browsers). Basic because
a browser asks for it itself and then sends it with every request of the page, the EventSource
stream included (an EventSource cannot set headers): the key never goes into a URL, where it would
end up in logs, history and Referer headers, and the server keeps no session. Like Bearer, it is
plain text on the wire: put TLS in front of a server that is reachable from other machines.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from tetri_engine.server.dashboard_feed import HISTORY_S, DashboardFeed
from tetri_engine.server.middleware import key_matches, presented_key
from tetri_engine.server.protocol import APIError, bad_request

STATIC_DIR = Path(__file__).parent / "static"
PAGE = ("dashboard.html", "text/html")
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
DEFAULT_WINDOW_S = 60.0
MIN_WINDOW_S = 10.0
REALM = "tetri-engine dashboard"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'",  # nothing from elsewhere, no inline script
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

FEED = web.AppKey("dashboard_feed", DashboardFeed)


def setup(app: web.Application, *, get_engine: Callable[[], Any], api_key: str | None) -> None:
    """Add the dashboard's routes and its feed (a sampling task while the app runs)."""
    app[FEED] = DashboardFeed(get_engine)
    guard = functools.partial(_guarded, api_key)
    app.router.add_get("/dashboard", guard(functools.partial(_static_file, *PAGE)))
    app.router.add_get("/dashboard/stream", guard(_stream))
    for name, content_type in ASSETS.items():
        app.router.add_get(f"/dashboard/{name}", guard(functools.partial(_static_file, name, content_type)))
    app.cleanup_ctx.append(_feed_context)
    # On shutdown the streams end at once: open ones would otherwise hold the drain for its timeout.
    app.on_shutdown.append(_close_feed)


async def _feed_context(app: web.Application) -> AsyncIterator[None]:
    feed = app[FEED]
    task = asyncio.create_task(feed.run(), name="dashboard feed")
    try:
        yield
    finally:
        feed.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _close_feed(app: web.Application) -> None:
    app[FEED].close()


# --- access ---------------------------------------------------------------------------------------


def _guarded(api_key: str | None, handler):
    async def guarded(request: web.Request) -> web.StreamResponse:
        if api_key:
            check_key(request, api_key)
        return await handler(request)

    return guarded


def check_key(request: web.Request, api_key: str) -> None:
    if not key_matches(presented_key(request, basic=True), api_key):
        raise APIError(401, "The dashboard needs the server's API key: give it as the password (any "
                       "user name) when the browser asks, or send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key",
                       headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})


# --- handlers -------------------------------------------------------------------------------------


async def _static_file(name: str, content_type: str, request: web.Request) -> web.Response:
    body = (STATIC_DIR / name).read_bytes()  # a few kB, read per request: edits show on reload
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS)


async def _stream(request: web.Request) -> web.StreamResponse:
    feed = request.app[FEED]
    window_s = parse_window(request.query.get("window_s"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})  # proxies: pass each event on
    await response.prepare(request)
    seen = None
    with contextlib.suppress(ConnectionResetError):  # the page went away
        while not feed.closed:
            seq = feed.seq
            if seen is not None and seq == seen + 1:
                event, body = "tick", feed.tick(window_s)
            else:  # first, or fell behind: the whole window again, never a backlog
                event, body = "snapshot", feed.snapshot(window_s)
            seen = seq
            await response.write(sse_frame(event, body))
            await feed.wait_after(seen)
    return response


def parse_window(text: str | None) -> float:
    if text is None:
        return DEFAULT_WINDOW_S
    try:
        window_s = float(text)
    except ValueError:
        window_s = math.nan
    if not MIN_WINDOW_S <= window_s <= HISTORY_S:  # NaN fails too
        raise bad_request(f"window_s must be a number of seconds from {MIN_WINDOW_S:g} to {HISTORY_S:g}, "
                          f"got {text!r}", param="window_s")
    return window_s


def sse_frame(event: str, body: dict) -> bytes:
    data = json.dumps(body, separators=(",", ":"), allow_nan=False)
    return f"event: {event}\ndata: {data}\n\n".encode()
