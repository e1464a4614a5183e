"""Requests a web page could make (server/middleware.py): any page a user visits can send requests to
a server on their machine. By default none of them can start a generation or read an answer: a
foreign Origin is refused (403), a body that is not JSON too (415: text/plain and forms are what a
page may send without asking), a Host that is not a loopback name when bound to loopback (403: DNS
rebinding), and no CORS header is sent. --allowed-hosts and --cors-origins open what they name.
The `openai` client and curl still work: tests/test_server_api.py and test_server_lifecycle.py."""
from __future__ import annotations

from test_server_support import ServingTestServer, small_config
from tetri_engine.server import create_app, wait_until_ready
from tetri_engine.server.state import ENGINE

GEN = "/v1/images/generations"
SMALL = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 1}
EVIL = "http://evil.example"


async def client_for(aiohttp_client, **overrides):
    app = create_app(small_config(**overrides))
    client = await aiohttp_client(ServingTestServer(app))
    await wait_until_ready(app)
    return app, client


async def error_code(resp, status: int) -> str:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["code"]


async def test_a_page_of_another_site_cannot_start_a_generation(aiohttp_client):
    app, client = await client_for(aiohttp_client)
    # What a page may send without a preflight: text/plain, a form, multipart (no Origin check needed).
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/json; charset=latin-1", None):
        headers = {"Content-Type": content_type} if content_type else {}
        resp = await client.post(GEN, data=b'{"prompt": "a red fox", "size": "64x64"}', headers=headers,
                                 skip_auto_headers=["Content-Type"])
        assert await error_code(resp, 415) == "unsupported_media_type"
    # With its Origin, whatever it sends, on every route, preflight included.
    for method, path in (("POST", GEN), ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"),
                         ("GET", "/dashboard"), ("OPTIONS", GEN)):
        resp = await client.request(method, path, json=SMALL if method == "POST" else None,
                                    headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
        assert await error_code(resp, 403) == "origin_not_allowed"
        assert "Access-Control-Allow-Origin" not in resp.headers
    assert app[ENGINE].stats()["states"]["completed"] == 0  # nothing ran
    # The same request from no page (a script, curl, the openai client) or from the server's own
    # pages (the dashboard: Origin is the server itself) is served, without CORS headers.
    for headers in ({}, {"Origin": str(client.make_url("")).rstrip("/")}):
        resp = await client.post(GEN, json=SMALL, headers=headers)
        assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


async def test_dns_rebinding_host_names_are_refused_on_loopback(aiohttp_client):
    _, client = await client_for(aiohttp_client)
    port = client.port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil", ""):
        for method, path in (("GET", "/health"), ("GET", "/dashboard/stream"), ("POST", GEN)):
            resp = await client.request(method, path, json=SMALL if method == "POST" else None,
                                        headers={"Host": host})
            assert await error_code(resp, 403) == "host_not_allowed", (host, path)
    for host in ("localhost", f"localhost:{port}", "LocalHost", "127.0.0.1", f"127.0.0.1:{port}", "[::1]",
                 f"[::1]:{port}"):
        assert (await client.get("/health", headers={"Host": host})).status == 200, host


async def test_allowed_hosts_and_cors_origins_open_only_what_they_name(aiohttp_client):
    app_origin = "https://app.example"
    _, client = await client_for(aiohttp_client, allowed_hosts=["gpu-box.lan", "10.0.0.7:8000", "fd00::7"],
                                 cors_origins=[app_origin], api_key="k3y")
    for host in ("gpu-box.lan", "GPU-BOX.lan:8000", "10.0.0.7", "[fd00::7]:8000", "localhost"):
        assert (await client.get("/health", headers={"Host": host})).status == 200, host
    assert await error_code(await client.get("/health", headers={"Host": "other.lan"}), 403) == "host_not_allowed"
    # The allowed site's page: its preflight (no key: browsers send none) is answered, then its request.
    preflight = await client.options(GEN, headers={"Origin": app_origin, "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == app_origin
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    resp = await client.post(GEN, json=SMALL, headers={"Origin": app_origin, "Authorization": "Bearer k3y"})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == app_origin
    assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]
    # Errors are readable by that page too; and the key is still needed.
    resp = await client.post(GEN, json=SMALL, headers={"Origin": app_origin})
    assert await error_code(resp, 401) == "invalid_api_key"
    assert resp.headers["Access-Control-Allow-Origin"] == app_origin
    # Any other site is still refused.
    resp = await client.post(GEN, json=SMALL, headers={"Origin": EVIL, "Authorization": "Bearer k3y"})
    assert await error_code(resp, 403) == "origin_not_allowed"


async def test_bound_beyond_loopback_any_host_is_accepted(aiohttp_client):
    # --host 0.0.0.0 without --allowed-hosts: the names clients use are not known (the key guards it).
    _, client = await client_for(aiohttp_client, host="0.0.0.0")
    assert (await client.get("/health", headers={"Host": "gpu-box.lan:8000"})).status == 200
    # A foreign Origin is still refused.
    resp = await client.get("/health", headers={"Host": "gpu-box.lan:8000", "Origin": EVIL})
    assert await error_code(resp, 403) == "origin_not_allowed"
