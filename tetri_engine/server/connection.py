"""The connection layer: every way a client can hold a connection, and so a descriptor and memory,
is bounded in time or count (`serve` flags; ServerConfig documents the defaults).

  idle between requests      keepalive_timeout_s: aiohttp closes the connection (also one that
                             never sends a byte)
  headers                    header_timeout_s from the first byte of a request: 408, closed
  body                       body_timeout_s (`read_body`): 408
  answer                     write_timeout_s without the client reading any of it: the connection
                             is aborted (its unsent answer freed; a request still running is
                             cancelled with it). Slow but steady readers are not cut.
  connections                max_connections open at once. One more closes the oldest connection
                             that is waiting for a request (idle keep-alive, or headers still
                             coming), so idle sockets cannot lock requests out; when every one has
                             a request in progress, it is answered 503 and closed at once (a client
                             that already sent its request may see a reset instead)
  URL, header lines, count   414 / 431 beyond MAX_URL_BYTES / MAX_HEADER_LINE_BYTES / MAX_HEADERS

Malformed HTTP (which aiohttp's parser refuses before the app sees it) is answered in OpenAI's error
envelope too, with one log line and no traceback.

`make_runner(app)` is the aiohttp AppRunner with these connections (`serve` and the tests use it).
Hooks into aiohttp (checked on 3.14; pyproject pins <4): `AppRunner._make_server` (the one place the protocol
class can be chosen) and these RequestHandler internals, read only: `_request_count` (requests whose
headers were parsed), `_task_handler` (the connection's task).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_log import AccessLogger
from aiohttp.web_protocol import RequestHandler

from tetri_engine.server.protocol import APIError, shown
from tetri_engine.server.state import CONFIG, STATE, ServerState

log = logging.getLogger("tetri_engine.server")

MAX_URL_BYTES = 8192  # the request line (nginx: 8 kB); longer: 414
MAX_HEADER_LINE_BYTES = 16384  # one header's name and value; longer: 431
MAX_HEADERS = 64  # more: 431
CLIENT_GONE = 499  # counted (not sent) when a client leaves before its request was read
LINGER_S = 2.0  # after an early answer (413, 408), how long the rest of a body is read and dropped
CLOSE_GRACE_S = 1.0  # after the drain, how long aiohttp waits for a handler still running (then cancels)
REFUSAL_LOG_EVERY_S = 10.0  # refused connections are logged as a count, at most this often
STATUS_LINES = {408: "Request Timeout", 503: "Service Unavailable"}


def handler_args(config) -> dict:
    """aiohttp RequestHandler settings (web.Application(handler_args=...): they hold under any runner)."""
    return {"keepalive_timeout": config.keepalive_timeout_s, "max_line_size": MAX_URL_BYTES,
            "max_field_size": MAX_HEADER_LINE_BYTES, "max_headers": MAX_HEADERS, "lingering_time": LINGER_S}


def make_runner(app: web.Application, **kwargs) -> web.AppRunner:
    """The runner for `app`: aiohttp's AppRunner, whose connections are GuardedConnections.
    kwargs go to web.AppRunner (handler_cancellation is on: a client that leaves cancels its request)."""
    kwargs.setdefault("handler_cancellation", True)
    kwargs.setdefault("shutdown_timeout", CLOSE_GRACE_S)
    return GuardedRunner(app, access_log_class=CappedAccessLogger, **kwargs)


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The whole body, or APIError: 408 when it does not arrive in time, 400 when it cannot be read
    (a broken gzip or chunked encoding, a body shorter than its Content-Length), 413 from aiohttp."""
    try:
        return await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout_s:g} s.",
                       code="body_timeout") from None
    except web.RequestPayloadError as exc:  # its text: "400, message:\n  <reason>"
        reason = str(exc).strip().split("\n")[-1].strip()[:120]
        raise APIError(400, f"The request body could not be read: {shown(reason)[1:-1]}.",
                       code="invalid_body") from None


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout_s: float
    write_timeout_s: float


class GuardedRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app; aiohttp's Server with the settings
        config = self.app[CONFIG]
        limits = ConnectionLimits(config.resolved_max_connections, config.header_timeout_s,
                                  config.write_timeout_s)
        return GuardedServer(plain, limits, self.app[STATE])


class GuardedServer(web.Server):
    """aiohttp's Server (the protocol factory the listening socket calls), making GuardedConnections."""

    def __init__(self, plain: web.Server, limits: ConnectionLimits, state: ServerState):
        super().__init__(plain.request_handler, request_factory=plain.request_factory,
                         handler_cancellation=plain.handler_cancellation, loop=asyncio.get_running_loop(),
                         **plain._kwargs)
        self.limits = limits
        self.state = state
        self.open: dict[GuardedConnection, None] = {}  # accepted and not lost, oldest first
        self.refused_since_log = 0
        self.refusal_logged_s = -REFUSAL_LOG_EVERY_S

    def admit(self, connection: GuardedConnection) -> bool:
        """Count a new connection in, making room by closing the oldest one waiting for a request;
        False when every open connection has a request in progress."""
        if len(self.open) >= self.limits.max_connections:
            idle = next((c for c in self.open if c.awaiting_request()), None)
            if idle is None:
                return False
            self.forget(idle)
            log.debug("closed an idle connection to make room (--max-connections)")
            idle.force_close()
        self.open[connection] = None
        self.state.open_connections = len(self.open)
        return True

    def forget(self, connection: GuardedConnection) -> None:
        self.open.pop(connection, None)
        self.state.open_connections = len(self.open)

    def __call__(self) -> GuardedConnection:
        return GuardedConnection(self, loop=self._loop, **self._kwargs)

    def note_refusal(self) -> None:
        self.refused_since_log += 1
        now_s = time.monotonic()
        if now_s - self.refusal_logged_s >= REFUSAL_LOG_EVERY_S:
            log.warning("refused %d connection(s): %d are open, each with a request in progress "
                        "(--max-connections)", self.refused_since_log, self.limits.max_connections)
            self.refused_since_log, self.refusal_logged_s = 0, now_s


class GuardedConnection(RequestHandler):
    """One client connection: aiohttp's HTTP/1.1 protocol with the bounds of the module docstring."""

    def __init__(self, server: GuardedServer, **kwargs):
        super().__init__(server, **kwargs)
        self._server = server  # aiohttp forgets its manager when the connection is lost
        self._raw_transport: asyncio.Transport | None = None
        self._refused = False
        self._answered = 0  # requests whose answer was written (or that ended otherwise)
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._flush_timer: asyncio.TimerHandle | None = None

    # ---- opening and closing -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._server.admit(self):
            self._refused = True
            self._server.note_refusal()
            transport.write(raw_answer(APIError(
                503, f"The server has {self._server.limits.max_connections} connections open, each with a "
                "request in progress (its limit); retry shortly.", type="server_error",
                code="too_many_connections", headers={"Retry-After": "1"})))
            transport.close()
            return
        self._raw_transport = transport
        super().connection_made(transport)
        # However the connection's task ends, an answer the client does not read cannot hold it open:
        # closing waits for the unsent bytes to go out, so give that write_timeout_s, then abort.
        self._task_handler.add_done_callback(lambda _: self._bound_the_flush())

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._server.forget(self)
        for timer in (self._header_timer, self._write_timer, self._flush_timer):
            if timer is not None:
                timer.cancel()
        self._raw_transport = None
        super().connection_lost(exc)

    def awaiting_request(self) -> bool:
        """Every request received so far is answered and sent: idle, or the next one's headers are
        coming (closing it loses nothing; a client retries an idle keep-alive connection)."""
        transport = self._raw_transport
        return transport is not None and self._request_count == self._answered \
            and transport.get_write_buffer_size() == 0

    def _bound_the_flush(self) -> None:
        transport = self._raw_transport
        if transport is not None and transport.get_write_buffer_size() > 0:
            self._flush_timer = self._loop.call_later(self._server.limits.write_timeout_s, transport.abort)

    # ---- headers in time ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        awaiting_headers = self._request_count == self._answered
        if data and awaiting_headers and self._header_timer is None:
            self._header_timer = self._loop.call_later(self._server.limits.header_timeout_s,
                                                       self._headers_timed_out)
        super().data_received(data)
        if self._header_timer is not None and self._request_count > self._answered:
            self._header_timer.cancel()  # the headers are complete
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        transport = self._raw_transport
        if transport is None or self._request_count > self._answered:
            return
        timeout_s = self._server.limits.header_timeout_s
        log.info("connection from %s: no complete request headers within %g s; closed", _peer(transport),
                 timeout_s)
        self._server.state.responses[("malformed", 408)] += 1
        transport.write(raw_answer(APIError(408, f"The request headers did not arrive within {timeout_s:g} s.",
                                            code="header_timeout")))
        self.force_close()

    async def finish_response(self, request, resp, start_time):
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._answered += 1

    # ---- answers read in time ----------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark: the client is not keeping up."""
        super().pause_writing()
        self._watch_writes(self._buffered())

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()

    def _watch_writes(self, buffered: int) -> None:
        self._write_timer = self._loop.call_later(self._server.limits.write_timeout_s, self._check_writes,
                                                  buffered)

    def _check_writes(self, buffered_before: int) -> None:
        self._write_timer = None
        transport = self._raw_transport
        if transport is None or not self.writing_paused:
            return
        buffered = self._buffered()
        if buffered < buffered_before:  # the client read some: a slow reader, not a stalled one
            self._watch_writes(buffered)
            return
        log.info("connection from %s: the client read nothing of its answer for %g s (%d bytes unsent); "
                 "aborted", _peer(transport), self._server.limits.write_timeout_s, buffered)
        transport.abort()

    def _buffered(self) -> int:
        return self._raw_transport.get_write_buffer_size() if self._raw_transport is not None else 0

    # ---- malformed HTTP ----------------------------------------------------------------------------

    def log_exception(self, message: str, *args, exc_info=None, **kwargs) -> None:
        """aiohttp logs a body it could not read (after the app answered 400) with a traceback: the
        client's doing, so one line; anything else is ours and keeps its traceback."""
        if isinstance(exc_info, (web.RequestPayloadError, HttpProcessingError)):
            log.info("connection from %s: %s; closed", _peer(self._raw_transport) if self._raw_transport
                     else "?", str(exc_info).strip().split("\n")[-1].strip()[:120])
            return
        super().log_exception(message, *args, exc_info=exc_info, **kwargs)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's parser refused the request (or, a bug, a handler raised past the middlewares)."""
        if isinstance(exc, ConnectionResetError):
            # The client left while its body was being read: nobody to answer and nothing failed here, so
            # no 500 and no traceback; 499 ("client closed request", as nginx logs it) in the counts.
            log.info("client %s left before its request had been read", request.remote)
            self._server.state.responses[("client_gone", CLIENT_GONE)] += 1
            response = web.Response(status=CLIENT_GONE)
            response.force_close()
            return response
        error = http_error(status, exc, self.max_line_size)
        if error.status == 500:
            log.error("unhandled error answering %s", request.remote, exc_info=exc)
        else:
            log.info("malformed HTTP from %s -> %d: %s", request.remote, error.status, error.message)
        self._server.state.responses[("malformed", error.status)] += 1
        if request.writer.output_size > 0:  # an answer is under way: nothing else can be sent
            raise ConnectionError("an answer was already being sent")
        response = web.json_response(error.body(), status=error.status, headers=error.headers)
        response.force_close()
        return response


def http_error(status: int, exc: BaseException | None, max_url_bytes: int) -> APIError:
    """The answer to what aiohttp's parser refused."""
    if isinstance(exc, LineTooLong):
        if exc.args[1] == max_url_bytes:
            return APIError(414, f"The request line (URL) is longer than {max_url_bytes} bytes.",
                            code="uri_too_long")
        return APIError(431, f"A request header is longer than {exc.args[1]} bytes.",
                        code="header_too_large")
    if isinstance(exc, HttpProcessingError) and "Too many headers" in exc.message:
        return APIError(431, f"The request has more than {MAX_HEADERS} headers.", code="header_too_large")
    if isinstance(exc, BadHttpMethod):
        tls = "HTTPS traffic" in exc.message
        return APIError(400, "TLS sent to this plain-HTTP port: use http://." if tls else
                        "The request method is not an HTTP method this server knows.", code="malformed_request")
    if isinstance(exc, HttpProcessingError):
        detail = (exc.message or "").split("\n")[0][:120]  # the first line: no raw client bytes
        return APIError(400, f"Malformed HTTP request: {shown(detail)[1:-1]}", code="malformed_request")
    if status == 500:
        return APIError(500, "Internal server error; see the server log.", type="server_error",
                        code="internal_error")
    return APIError(status, f"The request failed ({status}).", code="malformed_request")


def raw_answer(error: APIError) -> bytes:
    """A complete HTTP/1.1 answer in OpenAI's envelope, for a connection with no request to answer
    through aiohttp (refused, or its headers never came); the connection closes after it."""
    body = json.dumps(error.body()).encode()
    headers = {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(body)),
               "Connection": "close", **error.headers}
    head = f"HTTP/1.1 {error.status} {STATUS_LINES.get(error.status, 'Error')}\r\n" + \
        "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + body


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class CappedAccessLogger(AccessLogger):
    """One access line per request: peer, method, path (capped), status, bytes, seconds; no query
    string, headers or body (they are the client's data)."""

    def log(self, request, response, time: float) -> None:
        try:
            self.logger.info('%s "%s %s" %d %d %.3fs', request.remote, request.method,
                             shown(request.path)[1:-1], response.status, response.body_length, time)
        except Exception:  # an access line must never fail a request
            self.logger.exception("access log")
