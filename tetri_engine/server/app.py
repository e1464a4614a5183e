"""The aiohttp application: `create_app(config)` and its handlers.

Routes
  POST /v1/images/generations   OpenAI-compatible image generation (JSON, or SSE with stream=true)
  POST /v1/images/edits         OpenAI-compatible image edits (multipart: img2img, inpainting; edits.py)
  GET  /v1/models, /v1/models/{id}
  GET  /health                  200 when the engine serves, 503 while starting, draining or failed
  GET  /metrics                 Prometheus text exposition
  GET  /dashboard, /dashboard/*  the live dashboard (dashboard.py; --no-dashboard leaves it out)

Around the handlers: middleware.py (who may call; errors in OpenAI's envelope; one log line per
refused, failed or cancelled request), connection.py (time and count bounds on every connection;
malformed HTTP), lifecycle.py (the engine's start in the background; the drain). Run the app with
`connection.make_runner(app)` and stop it with `lifecycle.stop(runner)`, as `tetri-engine serve`
does; a client that disconnects cancels its handler, which leaves its `engine.generate()`
iterators early: that aborts its requests in the engine and frees their devices. Nothing is done
at import time.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from tetri_engine.config import EngineConfig
from tetri_engine.errors import EngineNotRunning, RequestRejected
from tetri_engine.request import GenerationOutput, GenerationRequest, RequestState
from tetri_engine.server import connection, dashboard, edits, lifecycle, middleware
from tetri_engine.server import metrics as prom
from tetri_engine.server import protocol
from tetri_engine.server.config import ServerConfig
from tetri_engine.server.protocol import APIError
from tetri_engine.server.state import CONFIG, ENGINE, ENGINE_FACTORY, REQUEST_ID, STATE, ServerState

if TYPE_CHECKING:  # pragma: no cover
    from tetri_engine.engine.async_engine import AsyncEngine

log = logging.getLogger("tetri_engine.server")


def create_app(config: ServerConfig, engine_factory: Callable[[EngineConfig], Any] | None = None) -> web.Application:
    """The application; raises ValueError for a config it cannot serve with. engine_factory(config.engine):
    what serves the requests, an AsyncEngine by default; the cluster passes a ClusterEngine (cluster/engine.py),
    which has the same face."""
    check_config(config)
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[middleware.error_middleware, middleware.access_middleware],
                          handler_args=connection.handler_args(config))
    app[CONFIG] = config
    app[STATE] = ServerState()
    app[ENGINE_FACTORY] = engine_factory
    app.cleanup_ctx.append(lifecycle.engine_context)
    app.on_shutdown.append(lifecycle.mark_draining)
    app.on_response_prepare.append(middleware.add_cors_headers)
    app.router.add_post("/v1/images/generations", create_images)
    app.router.add_post("/v1/images/edits", create_image_edits)
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


# --- images ---------------------------------------------------------------------------------------


async def create_images(request: web.Request, edit: bool = False) -> web.StreamResponse:
    engine = lifecycle.require_serving(request.app)
    with lifecycle.Flight(request.app[STATE]) as flight:
        try:
            return await _create_images(request, engine, flight, edit)
        except asyncio.CancelledError:
            if not flight.was_cut():
                raise  # the client left
            raise lifecycle.cut_error() from None


async def create_image_edits(request: web.Request) -> web.StreamResponse:
    """POST /v1/images/edits: a generation from an input image (edits.py reads and checks the upload)."""
    return await create_images(request, edit=True)


async def _create_images(request: web.Request, engine: "AsyncEngine", flight: lifecycle.Flight,
                         edit: bool = False) -> web.StreamResponse:
    config = request.app[CONFIG]
    if edit:
        params, edit_input = await edits.read_edit_request(request, config, limits(config, engine),
                                                           engine.default_steps)
    else:
        body = protocol.parse_json_body(await connection.read_body(request, config.body_timeout_s))
        params = protocol.parse_generation_request(body, limits(config, engine))
    request_id = protocol.new_request_id()
    request[REQUEST_ID] = request_id  # for the log line, if it ends badly
    # default_steps is the model's; it sizes the preview interval when num_inference_steps is absent.
    gen_requests = params.to_requests(default_steps=engine.default_steps, request_id=request_id)
    if edit:
        gen_requests = [edits.with_edit(r, edit_input, params, engine.default_steps) for r in gen_requests]
    deadline_param = "deadline_ms" if params.deadline_ms is not None else \
        "slo_scale" if params.slo_scale is not None else None
    flight.working()
    if params.stream:
        return await stream_image(request, engine, params, gen_requests[0], deadline_param, flight)
    finals = await generate_all(engine, gen_requests, deadline_param)
    for final in finals:
        if final.state != RequestState.COMPLETED:
            raise protocol.final_error(final, request.app[STATE].draining)
    return web.json_response(protocol.images_response(params, finals),
                             headers={"X-Request-Id": request_id})


def limits(config: ServerConfig, engine: "AsyncEngine") -> protocol.Limits:
    return protocol.Limits(model_name=config.model_name, size_rule=engine.size_rule,
                           max_steps=config.engine.max_steps, max_n=config.max_n,
                           default_size=config.resolved_default_size,
                           lora_check=engine.lora_check if config.engine.lora_dir is not None else None)


async def generate_all(engine: "AsyncEngine", requests: list[GenerationRequest],
                       deadline_param: str | None) -> list[GenerationOutput]:
    """Run the requests concurrently; return their final outputs in order.

    All or nothing at admission: the first is admitted as the first of a group (the engine takes it
    only if its queue holds them all; a refusal counts every one as rejected), the others right
    after. If the caller is cancelled (client gone), every request is aborted before this returns.
    """
    streams = [engine.generate(r, group_size=len(requests) if i == 0 else 1) for i, r in enumerate(requests)]
    tasks: list[asyncio.Task] = []
    try:
        for stream in streams:
            await admit(stream, deadline_param)
        tasks = [asyncio.create_task(_final_of(stream, r.request_id)) for stream, r in zip(streams, requests)]
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Leaving a stream early cancels its request in the engine (a running one stops at its next
        # step boundary and its devices go back); one never started admitted nothing.
        for stream in streams:
            await stream.aclose()


async def _final_of(outputs, request_id: str) -> GenerationOutput:
    async for out in outputs:
        if out.finished:
            return out
    raise APIError(500, f"Request {request_id} ended without a final output.",
                   type="server_error", code="internal_error")


async def admit(outputs, deadline_param: str | None = None) -> GenerationOutput:
    """The first output (kind="queued"), or the admission refusal as an APIError."""
    try:
        return await outputs.__anext__()
    except RequestRejected as exc:
        raise protocol.rejection_error(exc, deadline_param) from None
    except EngineNotRunning as exc:
        raise APIError(503, f"The engine is not running: {exc}", type="server_error",
                       code="engine_not_running") from None
    except ValueError as exc:  # the engine's own validation: the message says what to change
        raise protocol.bad_request(str(exc)) from None


async def stream_image(request: web.Request, engine: "AsyncEngine", params: protocol.ImageGenerationParams,
                       gen_request: GenerationRequest, deadline_param: str | None,
                       flight: lifecycle.Flight) -> web.StreamResponse:
    """SSE: tetri.queued, tetri.round, tetri.step, tetri.late (unless progress_events=false: a client that
    expects only OpenAI's event types), image_generation.partial_image, then
    image_generation.completed, or an `error` event (the request failed, or the drain cut it)."""
    outputs = engine.generate(gen_request)
    async with contextlib.aclosing(outputs):  # leaving early (client gone, cut) aborts the request
        queued = await admit(outputs, deadline_param)  # refusals still get a proper status code
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Request-Id": gen_request.request_id,
        })
        await response.prepare(request)
        try:
            error = await _stream_events(request, response, params, outputs, queued)
        except asyncio.CancelledError:
            if not flight.was_cut():
                raise  # the client left
            error = lifecycle.cut_error()
        except ConnectionResetError:
            log.info("%s: the client left the stream; its request was cancelled", gen_request.request_id)
            return response
    try:
        with contextlib.suppress(ConnectionResetError):
            if error is not None:
                middleware.log_error(request, error, "error event")
                await response.write(protocol.error_event(error))
            await response.write_eof()
    except asyncio.CancelledError:  # the drain's cut, while the last event went out: the stream ends
        if not flight.was_cut():
            raise
    return response


async def _stream_events(request: web.Request, response: web.StreamResponse,
                         params: protocol.ImageGenerationParams, outputs,
                         queued: GenerationOutput) -> APIError | None:
    """Write the events until the final one; return the error to send instead, if it failed."""
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
                return None
            return protocol.final_error(out, request.app[STATE].draining)
    return APIError(500, "The stream ended without a final output.", type="server_error", code="internal_error")


def _preview_wanted(params: protocol.ImageGenerationParams, sent: int) -> bool:
    # OpenAI's partial_images is a count: send no more previews than asked for.
    return params.partial_images is None or sent < params.partial_images


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- models, health, metrics ----------------------------------------------------------------------


def _model_card(app: web.Application, model_id: str | None = None) -> dict:
    """OpenAI's model object; a LoRA adapter's (`model_id`) names the served model as its `parent`, as vLLM's do."""
    card = {"id": model_id or app[CONFIG].model_name, "object": "model", "created": app[STATE].started_unix,
            "owned_by": "tetri-engine"}
    return card if model_id is None else {**card, "parent": app[CONFIG].model_name}


def _adapters(app: web.Application) -> list[str]:
    """The LoRA adapters requests may name (`lora`), [] without --lora-dir."""
    engine = app.get(ENGINE)
    return engine.lora_adapters() if engine is not None and app[CONFIG].engine.lora_dir is not None else []


async def list_models(request: web.Request) -> web.Response:
    cards = [_model_card(request.app)] + [_model_card(request.app, name) for name in _adapters(request.app)]
    return web.json_response({"object": "list", "data": cards})


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    if model_id == request.app[CONFIG].model_name:
        return web.json_response(_model_card(request.app))
    if model_id in _adapters(request.app):
        return web.json_response(_model_card(request.app, model_id))
    raise APIError(404, f"The model {protocol.shown(model_id)} does not exist here; see GET /v1/models.",
                   param="model", code="model_not_found")


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
                       ready=stats is not None, draining=state.draining, connections=state.open_connections)
    return web.Response(body=text.encode(), headers={"Content-Type": prom.CONTENT_TYPE})
