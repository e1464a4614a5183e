"""What every request passes through around its handler: who may call (Host, Origin, API key,
Content-Type), errors in OpenAI's envelope, and one log line per refused, failed or cancelled request.

Order (outermost first): `error_middleware` (envelope, /metrics counts, the log line), then
`access_middleware` (the checks below), then the route's handler.

Browsers are the reason for most checks: any page a user visits can send requests to a server on
their machine. A page may POST text/plain or a form without asking (a "simple" request), so a body
must say it is JSON; it sends an Origin header naming its site, so a foreign Origin is refused unless
--cors-origins lists it; and through DNS rebinding it can make its own domain name point at
127.0.0.1, so a server bound to loopback accepts only loopback names (and --allowed-hosts) in Host.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import logging

from aiohttp import web

from tetri_engine.server.config import ServerConfig
from tetri_engine.server.protocol import APIError, shown
from tetri_engine.server.state import CONFIG, REQUEST_ID, STATE

log = logging.getLogger("tetri_engine.server")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
# Routes whose body is multipart/form-data, as OpenAI defines them (file uploads). A page of another site
# may send a form without asking, but its browser says so in Origin, which is refused unless allowed.
MULTIPART_PATHS = frozenset({"/v1/images/edits"})
CORS_MAX_AGE_S = 600
MAX_LOGGED_CHARS = 300  # of an error message in the log (client values in it are capped already)


# --- errors ------------------------------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every error leaves in OpenAI's envelope; every answer is counted for /metrics; every refused,
    failed or cancelled request gets one log line with its reason."""
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    try:
        response = await handler(request)
    except APIError as exc:
        response = error_response(request, exc)
    except web.HTTPException as exc:  # aiohttp's own: 404, 405, 413 ...
        if exc.status < 400:
            raise
        response = error_response(request, _from_http_exception(exc))
    except (asyncio.CancelledError, ConnectionResetError):
        log.info("%s: the client went away; its request was cancelled", _describe(request))
        raise
    except Exception:  # a bug of ours: the one case that logs a traceback
        log.exception("%s: unhandled error", _describe(request))
        response = error_response(request, APIError(500, "Internal server error; see the server log.",
                                                    type="server_error", code="internal_error"))
    state = request.app[STATE]
    state.responses[(route_name, response.status)] += 1
    if state.draining or (request.body_exists and not request.content.is_eof()):
        # Answered before its body was read (or the server is about to close): say the connection
        # closes, so a keep-alive client does not send its next request on it.
        response.force_close()
    return response


def error_response(request: web.Request, exc: APIError) -> web.Response:
    log_error(request, exc, str(exc.status))
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


def log_error(request: web.Request, exc: APIError, answer: str) -> None:
    """The one log line of a refused or failed request: what was asked, the answer, its reason."""
    level = logging.WARNING if exc.status >= 500 and exc.status != 503 else logging.INFO
    log.log(level, "%s -> %s %s%s: %s", _describe(request), answer, exc.code or exc.type,
            f" (param {exc.param})" if exc.param else "", exc.message[:MAX_LOGGED_CHARS])


def _describe(request: web.Request) -> str:
    """Method, path (capped) and request id: what a log line says of a request, never its body."""
    request_id = request.get(REQUEST_ID)
    return f"{request.method} {shown(request.path)[1:-1]}" + (f" [{request_id}]" if request_id else "")


def _from_http_exception(exc: web.HTTPException) -> APIError:
    if exc.status == 413:
        return APIError(413, f"The request body is too large ({exc.text}).", code="request_too_large")
    if exc.status == 404:
        return APIError(404, "Not found. Routes: POST /v1/images/generations, POST /v1/images/edits, GET /v1/models, "
                        "GET /health, GET /metrics, GET /dashboard.", code="not_found")
    if exc.status == 405:
        return APIError(405, f"Method not allowed: {exc.text}", code="method_not_allowed",
                        headers={"Allow": exc.headers.get("Allow", "")})
    return APIError(exc.status, exc.reason, code=None)


# --- access --------------------------------------------------------------------------------------------


@web.middleware
async def access_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Host, Origin (and CORS preflight), the API key on /v1/*, a JSON body."""
    config = request.app[CONFIG]
    check_host(request, config)
    origin = request.headers.get("Origin")
    if origin is not None and not same_origin(request, origin):
        if not cors_allows(config, origin):
            raise APIError(403, f"Requests from web pages of other sites are refused (Origin {shown(origin)}). "
                           "Start the server with --cors-origins to allow a site.", code="origin_not_allowed")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return preflight_response(origin)
    if config.api_key and request.path.startswith("/v1/"):
        if not key_matches(presented_key(request, basic=False), config.api_key):
            raise APIError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if request.method in BODY_METHODS:
        check_json_body_type(request)
    return await handler(request)


def check_host(request: web.Request, config: ServerConfig) -> None:
    """Bound to loopback (or with --allowed-hosts): Host must name this machine or an allowed name."""
    allowed = allowed_host_names(config)
    host = request.headers.get("Host")
    if allowed is None or host is None:  # no Host: HTTP/1.0, never a browser
        return
    if host_name(host) not in allowed:
        raise APIError(403, f"Host {shown(host)} is not a name of this server. Use http://127.0.0.1 or "
                       "http://localhost, or start the server with --allowed-hosts naming it.",
                       param=None, code="host_not_allowed")


def allowed_host_names(config: ServerConfig) -> frozenset[str] | None:
    """The Host names accepted, or None when any is (bound beyond loopback, no --allowed-hosts)."""
    extra = {_configured_name(h) for h in config.allowed_hosts or ()}
    if not extra and not is_loopback(config.host):
        return None
    return LOOPBACK_NAMES | extra


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '[::1]', 'LocalHost' -> 'localhost'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.partition(":")[0]


def _configured_name(name: str) -> str:
    """An --allowed-hosts entry as host_name() gives it: 'gpu-box:8000' -> 'gpu-box', 'fe80::1' -> '[fe80::1]'."""
    name = name.strip().lower()
    if name.count(":") > 1 and not name.startswith("["):  # a bare IPv6 address
        return f"[{name}]"
    return host_name(name)


def same_origin(request: web.Request, origin: str) -> bool:
    """Origin names the server itself (the page was served from here: the dashboard)."""
    host = request.headers.get("Host", "").strip().lower()
    return bool(host) and origin.strip().lower() in (f"http://{host}", f"https://{host}")


def cors_allows(config: ServerConfig, origin: str) -> bool:
    origins = config.cors_origins or ()
    return "*" in origins or origin.strip().rstrip("/").lower() in {o.rstrip("/").lower() for o in origins}


def preflight_response(origin: str) -> web.Response:
    return web.Response(status=204, headers={
        "Access-Control-Allow-Origin": origin, "Vary": "Origin",
        "Access-Control-Allow-Methods": "GET, POST",
        "Access-Control-Allow-Headers": "Authorization, Content-Type",
        "Access-Control-Max-Age": str(CORS_MAX_AGE_S)})


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: a page of an allowed site may read the answer (streams included)."""
    origin = request.headers.get("Origin")
    if origin is not None and not same_origin(request, origin) and cors_allows(request.app[CONFIG], origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
        response.headers.add("Vary", "Origin")


def check_json_body_type(request: web.Request) -> None:
    """A body must say it is JSON in UTF-8: a page may send text/plain or a form to any server
    without asking, but never application/json. Uploads (MULTIPART_PATHS) are multipart/form-data."""
    if request.path in MULTIPART_PATHS:
        if request.content_type != MULTIPART_TYPE:
            given = request.headers.get("Content-Type")
            raise APIError(415, f"An image edit is sent as 'Content-Type: multipart/form-data' (got "
                           f"{shown(given) if given else 'none'}).", code="unsupported_media_type")
        return
    charset = (request.charset or "utf-8").lower()
    if request.content_type != JSON_TYPE or charset not in ("utf-8", "utf8"):
        given = request.headers.get("Content-Type")
        raise APIError(415, f"The body must be JSON sent as 'Content-Type: application/json' (got "
                       f"{shown(given) if given else 'none'}).", code="unsupported_media_type")


# --- the API key -----------------------------------------------------------------------------------


def presented_key(request: web.Request, *, basic: bool) -> str | None:
    """The key in `Authorization: Bearer KEY`, or (basic=True) `Basic base64(user:KEY)`; None otherwise."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if basic and scheme.lower() == "basic":
        try:
            user_and_key = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
            return None
        return user_and_key.partition(":")[2]
    return None


def key_matches(given: str | None, api_key: str) -> bool:
    """compare_digest: the time taken does not tell how much of the key was right. Header values hold
    any byte (aiohttp keeps non-UTF-8 bytes as surrogate escapes): compared as the bytes sent."""
    if given is None:
        return False
    try:
        given_bytes = given.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(given_bytes, api_key.encode("utf-8"))
