"""The aiohttp application: `create_app(config)` and its handlers.

Routes
  POST /v1/images/generations   OpenAI-compatible image generation (JSON, or SSE with stream=true)
  GET  /v1/models, /v1/models/{id}
  GET  /health                  200 when the engine serves, 503 while starting, draining or failed
  GET  /metrics                 Prometheus text exposition
  GET  /dashboard, /dashboard/*  the live dashboard (dashboard.py; --no-dashboard leaves it out)

The engine is created and started in `app.cleanup_ctx`; the start (model load, profiling) runs as a
background task so the port answers at once: /health says "starting" and generation answers 503
until the engine is ready. On shutdown aiohttp stops listening, `on_shutdown` marks the server
draining (new requests: 503), in-flight handlers get `shutdown_timeout` to finish, then the engine
is shut down (drain=True). Nothing is done at import time.

Client disconnects: run the app with `handler_cancellation=True` (the `serve` command and aiohttp's
test server do). A cancelled handler leaves its `engine.generate()` iterators early, which aborts
those requests in the engine and frees their devices.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from aiohttp import web

from tetri_engine.config import EngineConfig
from tetri_engine.errors import EngineNotRunning, RejectionReason, RequestRejected
from tetri_engine.request import GenerationOutput, GenerationRequest, RequestState
from tetri_engine.server import dashboard
from tetri_engine.server import metrics as prom
from tetri_engine.server import protocol
from tetri_engine.server.config import ServerConfig
from tetri_engine.server.protocol import APIError

if TYPE_CHECKING:  # pragma: no cover
    from tetri_engine.engine.async_engine import AsyncEngine

log = logging.getLogger("tetri_engine.server")

STARTING_RETRY_AFTER_S = 5


@dataclass
class ServerState:
    """What the server itself keeps (the engine keeps the rest)."""

    started_unix: int = field(default_factory=lambda: int(time.time()))
    start_task: asyncio.Task | None = None
    start_error: str | None = None
    draining: bool = False
    responses: Counter = field(default_factory=Counter)  # (route, status) -> count
    latency: prom.LatencyHistograms = field(default_factory=prom.LatencyHistograms)


CONFIG = web.AppKey("config", ServerConfig)
ENGINE: web.AppKey["AsyncEngine"] = web.AppKey("engine")
STATE = web.AppKey("state", ServerState)
ENGINE_FACTORY: web.AppKey[Callable[[EngineConfig], Any] | None] = web.AppKey("engine_factory")


def create_app(config: ServerConfig, engine_factory: Callable[[EngineConfig], Any] | None = None) -> web.Application:
    """The application; raises ValueError for a config it cannot serve with. engine_factory(config.engine):
    what serves the requests, an AsyncEngine by default; the cluster passes a ClusterEngine (cluster/engine.py),
    which has the same face."""
    check_config(config)
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[error_middleware, auth_middleware])
    app[CONFIG] = config
    app[STATE] = ServerState()
    app[ENGINE_FACTORY] = engine_factory
    app.cleanup_ctx.append(engine_context)
    app.on_shutdown.append(mark_draining)
    app.router.add_post("/v1/images/generations", create_images)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    if config.dashboard:
        dashboard.setup(app, get_engine=lambda: app.get(ENGINE), api_key=config.api_key)
    return app


def check_config(config: ServerConfig) -> None:
    try:
        size = config.resolved_default_size
        protocol.parse_size(size, size, config.engine.size_rule(), param="default_size")
    except APIError as exc:
        raise ValueError(f"--default-size: {exc.message}") from None
    if config.max_n < 1 or config.max_body_bytes < 1:
        raise ValueError("--max-n and --max-body-bytes must be at least 1")


async def wait_until_ready(app: web.Application) -> None:
    """Wait for the engine start begun by the app's start-up; raise if it failed."""
    task = app[STATE].start_task
    if task is None:
        raise RuntimeError("the app has not started (run it with an AppRunner or a test client)")
    await asyncio.shield(task)


# --- engine lifetime ----------------------------------------------------------------------------


async def engine_context(app: web.Application) -> AsyncIterator[None]:
    # Imported here, not at module level: the engine pulls in torch and the model runtime.
    from tetri_engine.engine.async_engine import AsyncEngine

    config, state = app[CONFIG], app[STATE]
    engine = (app[ENGINE_FACTORY] or AsyncEngine)(config.engine)
    app[ENGINE] = engine
    state.start_task = asyncio.create_task(_start_engine(engine, state), name="engine-start")
    try:
        yield
    finally:
        state.draining = True
        # Not cancelled: the model loads in a thread that cannot be interrupted; shutdown() waits
        # for a start in progress, then stops the engine (drain=True: accepted requests finish).
        await engine.shutdown(drain=True)
        with contextlib.suppress(Exception):
            await state.start_task  # its failure, if any, was logged and is in /health


async def _start_engine(engine: "AsyncEngine", state: ServerState) -> None:
    try:
        await engine.start()
    except Exception as exc:
        state.start_error = f"{type(exc).__name__}: {exc}"
        log.exception("engine failed to start")
        raise


async def mark_draining(app: web.Application) -> None:
    app[STATE].draining = True


def require_serving(app: web.Application) -> "AsyncEngine":
    """The engine, or APIError(503) while it starts, drains or after it failed to start."""
    state, engine = app[STATE], app.get(ENGINE)
    if state.start_error is not None:
        raise APIError(503, f"The engine failed to start: {state.start_error}",
                       type="server_error", code="engine_failed")
    if state.draining or (engine is not None and engine.is_draining):
        raise APIError(503, "The server is shutting down and takes no new requests.",
                       type="server_error", code="server_draining")
    if engine is None or not engine.is_ready:
        raise APIError(503, "The engine is starting (loading the model); retry shortly.",
                       type="server_error", code="engine_starting",
                       headers={"Retry-After": str(STARTING_RETRY_AFTER_S)})
    return engine


# --- middlewares --------------------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every error leaves in OpenAI's envelope; every answer is counted for /metrics."""
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    try:
        response = await handler(request)
    except APIError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:  # aiohttp's own: 404, 405, 413 ...
        if exc.status < 400:
            raise
        response = error_response(_from_http_exception(exc))
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client went away: nothing to answer
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = error_response(APIError(500, "Internal server error; see the server log.",
                                           type="server_error", code="internal_error"))
    request.app[STATE].responses[(route_name, response.status)] += 1
    return response


def _from_http_exception(exc: web.HTTPException) -> APIError:
    if exc.status == 413:
        return APIError(413, f"The request body is too large ({exc.text}).",
                        code="request_too_large")
    if exc.status == 404:
        return APIError(404, "Not found. Routes: POST /v1/images/generations, GET /v1/models, "
                        "GET /health, GET /metrics.", code="not_found")
    if exc.status == 405:
        return APIError(405, f"Method not allowed: {exc.text}", code="method_not_allowed",
                        headers={"Allow": exc.headers.get("Allow", "")})
    return APIError(exc.status, exc.reason, code=None)


def error_response(exc: APIError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    """With --api-key, /v1/* needs `Authorization: Bearer KEY`; /health and /metrics stay open
    for probes and scrapers."""
    key = request.app[CONFIG].api_key
    if key and request.path.startswith("/v1/"):
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        # compare_digest: the time taken does not tell how much of the key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


# --- images ---------------------------------------------------------------------------------------


async def create_images(request: web.Request) -> web.StreamResponse:
    app = request.app
    engine = require_serving(app)
    config = app[CONFIG]
    body = protocol.parse_json_body(await request.read())
    params = protocol.parse_generation_request(body, limits(config, engine))
    # default_steps is the model's; it sizes the preview interval when num_inference_steps is absent.
    request_id = protocol.new_request_id()
    gen_requests = params.to_requests(default_steps=engine.default_steps, request_id=request_id)
    if params.stream:
        return await stream_image(request, engine, params, gen_requests[0])
    finals = await generate_all(engine, gen_requests)
    draining = app[STATE].draining
    for final in finals:
        if final.state != RequestState.COMPLETED:
            raise protocol.final_error(final, draining)
    return web.json_response(protocol.images_response(params, finals),
                             headers={"X-Request-Id": request_id})


def limits(config: ServerConfig, engine: "AsyncEngine") -> protocol.Limits:
    return protocol.Limits(model_name=config.model_name, size_rule=engine.size_rule,
                           max_steps=config.engine.max_steps, max_n=config.max_n,
                           default_size=config.resolved_default_size)


async def generate_all(engine: "AsyncEngine",
                       requests: list[GenerationRequest]) -> list[GenerationOutput]:
    """Run the requests concurrently; return their final outputs in order.

    All or nothing at admission: if one is refused, the others are aborted and the refusal raised.
    If the caller is cancelled (client gone), every request is aborted before this returns.
    """
    tasks = [asyncio.create_task(_run_to_final(engine, r)) for r in requests]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        # Wait until every generator is closed, i.e. every unfinished request is cancelled in the
        # engine (a running one stops at its next step boundary and its devices go back).
        await asyncio.gather(*tasks, return_exceptions=True)


async def _run_to_final(engine: "AsyncEngine", request: GenerationRequest) -> GenerationOutput:
    outputs = engine.generate(request)
    async with contextlib.aclosing(outputs):  # leaving early aborts the request in the engine
        await admit(outputs)
        async for out in outputs:
            if out.finished:
                return out
    raise APIError(500, f"Request {request.request_id} ended without a final output.",
                   type="server_error", code="internal_error")


async def admit(outputs) -> GenerationOutput:
    """The first output (kind="queued"), or the admission refusal as an APIError."""
    try:
        return await outputs.__anext__()
    except RequestRejected as exc:
        raise rejection_error(exc) from None
    except EngineNotRunning as exc:
        raise APIError(503, f"The engine is not running: {exc}", type="server_error",
                       code="engine_not_running") from None
    except ValueError as exc:  # the engine's own validation: the message says what to change
        raise protocol.bad_request(str(exc)) from None


def rejection_error(exc: RequestRejected) -> APIError:
    if exc.reason == RejectionReason.DRAINING:
        return APIError(503, str(exc), type="server_error", code="server_draining")
    # queue_full, deadline_impossible: 429. Retry-After is required by clients that back off
    # (the openai client honours it); 1 s when the engine gives no hint.
    retry_after = max(1, math.ceil(exc.retry_after_s or 1))
    return APIError(429, str(exc), type="rate_limit_error", code=exc.reason.value,
                    headers={"Retry-After": str(retry_after)})


async def stream_image(request: web.Request, engine: "AsyncEngine",
                       params: protocol.ImageGenerationParams,
                       gen_request: GenerationRequest) -> web.StreamResponse:
    """SSE: tetri.queued, tetri.round, tetri.step, tetri.late (unless progress_events=false: a client that
    expects only OpenAI's event types), image_generation.partial_image, then
    image_generation.completed (or an `error` event)."""
    outputs = engine.generate(gen_request)
    async with contextlib.aclosing(outputs):  # leaving early (client gone) aborts the request
        queued = await admit(outputs)  # refusals still get a proper status code
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Request-Id": gen_request.request_id,
        })
        await response.prepare(request)
        try:
            progress = params.progress_events
            if progress:
                await response.write(protocol.queued_event(queued))
            previews_sent = 0
            async for out in outputs:
                if out.kind == "round" and progress:
                    await response.write(protocol.round_event(out))
                elif out.kind == "step" and progress:
                    await response.write(protocol.step_event(out))
                elif out.kind == "late" and progress:
                    await response.write(protocol.late_event(out))
                elif out.kind == "preview" and _preview_wanted(params, previews_sent):
                    png = out.png or await asyncio.to_thread(encode_png, out.image)
                    await response.write(protocol.partial_image_event(params, png, previews_sent, out))
                    previews_sent += 1
                elif out.finished:
                    if out.state == RequestState.COMPLETED:
                        await response.write(protocol.completed_event(params, out))
                    else:
                        error = protocol.final_error(out, request.app[STATE].draining)
                        await response.write(protocol.error_event(error))
                    break
            await response.write_eof()
        except ConnectionResetError:
            log.info("client left the stream of %s; request aborted", gen_request.request_id)
    return response


def _preview_wanted(params: protocol.ImageGenerationParams, sent: int) -> bool:
    # OpenAI's partial_images is a count: send no more previews than asked for.
    return params.partial_images is None or sent < params.partial_images


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- models, health, metrics ----------------------------------------------------------------------


def _model_card(app: web.Application) -> dict:
    return {"id": app[CONFIG].model_name, "object": "model", "created": app[STATE].started_unix,
            "owned_by": "tetri-engine"}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app)]})


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    if model_id != request.app[CONFIG].model_name:
        raise APIError(404, f"The model '{model_id}' does not exist here; see GET /v1/models.",
                       param="model", code="model_not_found")
    return web.json_response(_model_card(request.app))


async def health(request: web.Request) -> web.Response:
    app = request.app
    state, engine = app[STATE], app.get(ENGINE)
    body = {"model": app[CONFIG].model_name, "uptime_s": round(time.time() - state.started_unix, 3)}
    if state.start_error is not None:
        body.update(status="failed", error=state.start_error)
    elif state.draining or (engine is not None and engine.is_draining):
        body.update(status="draining")
    elif engine is None or not engine.is_ready:
        body.update(status="starting")
    else:
        stats = engine.stats()
        body.update(status="ok", devices=list(engine.devices), queue_depth=stats["queue_depth"],
                    running=stats["running"], busy_devices=engine.busy_devices())
    return web.json_response(body, status=200 if body["status"] == "ok" else 503)


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    state, engine = app[STATE], app.get(ENGINE)
    stats = engine.stats() if engine is not None and engine.is_ready else None
    text = prom.render(stats=stats, responses=state.responses, latency=state.latency,
                       ready=stats is not None, draining=state.draining)
    return web.Response(body=text.encode(), headers={"Content-Type": prom.CONTENT_TYPE})
