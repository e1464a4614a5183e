"""The server's life: the engine starts in the background, serves, and on SIGINT/SIGTERM the server
drains and stops (`stop`).

Start: the engine is created in `app.cleanup_ctx` and started (model load, profiling) as a task, so
the port answers at once: /health says "starting" and generation answers 503 until it is ready.

Drain, one timeout (--drain-timeout-s), applied once, the port open all along:
  1. the server is draining: /health answers 503 "draining", new generation requests 503;
  2. handlers still reading their body are cut at once (nothing of theirs has started);
  3. handlers whose requests are in the engine get up to the timeout to finish;
  4. those left are cut: their requests are cancelled in the engine; a client waiting for JSON gets
     a 503 in OpenAI's envelope, a stream an `error` event and then its end;
  5. then aiohttp stops listening, closes idle connections, runs on_shutdown (dashboard streams
     end) and the cleanup context shuts the engine down.
A handler is cut by cancelling its task; it tells a cut from a client that left with `Flight.was_cut`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, AsyncIterator

from aiohttp import web

from tetri_engine.server.protocol import APIError
from tetri_engine.server.state import CONFIG, ENGINE, ENGINE_FACTORY, STATE, ServerState

if TYPE_CHECKING:  # pragma: no cover
    from tetri_engine.engine.async_engine import AsyncEngine

log = logging.getLogger("tetri_engine.server")

STARTING_RETRY_AFTER_S = 5
CUT_ANSWER_S = 1.0  # how long cut handlers get to send their 503 / error event


# --- the engine ------------------------------------------------------------------------------------


async def engine_context(app: web.Application) -> AsyncIterator[None]:
    # Imported here, not at module level: the engine pulls in torch and the model runtime.
    from tetri_engine.engine.async_engine import AsyncEngine

    config, state = app[CONFIG], app[STATE]
    engine = (app.get(ENGINE_FACTORY) or AsyncEngine)(config.engine)
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


async def wait_until_ready(app: web.Application) -> None:
    """Wait for the engine start begun by the app's start-up; raise if it failed."""
    task = app[STATE].start_task
    if task is None:
        raise RuntimeError("the app has not started (run it with an AppRunner or a test client)")
    await asyncio.shield(task)


async def mark_draining(app: web.Application) -> None:
    app[STATE].draining = True


def require_serving(app: web.Application) -> "AsyncEngine":
    """The engine, or APIError(503) while it starts, drains or after it failed to start."""
    state, engine = app[STATE], app.get(ENGINE)
    if state.start_error is not None:
        raise APIError(503, f"The engine failed to start: {state.start_error}",
                       type="server_error", code="engine_failed")
    if state.draining or (engine is not None and engine.is_draining):
        raise draining_error()
    if engine is None or not engine.is_ready:
        raise APIError(503, "The engine is starting (loading the model); retry shortly.",
                       type="server_error", code="engine_starting",
                       headers={"Retry-After": str(STARTING_RETRY_AFTER_S)})
    return engine


def draining_error() -> APIError:
    return APIError(503, "The server is shutting down and takes no new requests.",
                    type="server_error", code="server_draining")


def cut_error() -> APIError:
    return APIError(503, "The server is shutting down: this request was cut at the end of the drain "
                    "(--drain-timeout-s).", type="server_error", code="server_shutting_down")


# --- requests in flight -----------------------------------------------------------------------------


class Flight:
    """`with Flight(state) as flight:` around a generation handler: its task is in flight, `reading`
    its body until `working()` (its requests go to the engine)."""

    def __init__(self, state: ServerState):
        self._in_flight = state.in_flight
        self._task = asyncio.current_task()

    def __enter__(self) -> Flight:
        self._in_flight.reading.add(self._task)
        return self

    def working(self) -> None:
        self._in_flight.reading.discard(self._task)
        self._in_flight.working.add(self._task)

    def was_cut(self) -> bool:
        """In an `except CancelledError`: True when the drain cut this handler (it should answer and
        return, and does not count as cancelled again), False when the client left (re-raise)."""
        if self._task not in self._in_flight.cut:
            return False
        uncancel = getattr(self._task, "uncancel", None)  # Python 3.11+: the cancel is handled
        if uncancel is not None:
            uncancel()
        return True

    def __exit__(self, *exc_info) -> None:
        for tasks in (self._in_flight.reading, self._in_flight.working, self._in_flight.cut):
            tasks.discard(self._task)


async def drain(app: web.Application, timeout_s: float) -> None:
    """Steps 1-4 of the module docstring."""
    state = app[STATE]
    flight = state.in_flight
    state.draining = True
    for task in list(flight.reading):
        _cut(state, task)
    working = {task for task in flight.working if not task.done()}
    if working:
        log.info("draining: %d request(s) in flight get up to %g s", len(working), timeout_s)
        _, left = await asyncio.wait(working, timeout=timeout_s)
        if left:
            log.warning("drain timeout (%g s): cutting %d request(s) still in flight", timeout_s, len(left))
        for task in left:
            _cut(state, task)
    cut = [task for task in flight.cut if not task.done()]
    if cut:
        await asyncio.wait(cut, timeout=CUT_ANSWER_S)


def _cut(state: ServerState, task: asyncio.Task) -> None:
    state.in_flight.cut.add(task)
    task.cancel()


async def stop(runner: web.AppRunner) -> None:
    """Drain (the port stays open), then stop listening and shut the engine down."""
    await drain(runner.app, runner.app[CONFIG].drain_timeout_s)
    await runner.cleanup()
