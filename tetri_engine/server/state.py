"""What the server keeps beside the engine, and the typed keys under which the app holds it.

One module that every part of the server imports (app, middleware, lifecycle, connection), so none
of them imports another for a key.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from tetri_engine.config import EngineConfig
from tetri_engine.server import metrics as prom
from tetri_engine.server.config import ServerConfig

if TYPE_CHECKING:  # pragma: no cover
    from tetri_engine.engine.async_engine import AsyncEngine


@dataclass
class InFlight:
    """Generation handlers in progress (their asyncio tasks), for the drain: `reading` their body,
    `working` (their requests are in the engine), and those the drain `cut` at its timeout."""

    reading: set[asyncio.Task] = field(default_factory=set)
    working: set[asyncio.Task] = field(default_factory=set)
    cut: set[asyncio.Task] = field(default_factory=set)


@dataclass
class ServerState:
    started_unix: int = field(default_factory=lambda: int(time.time()))
    start_task: asyncio.Task | None = None
    start_error: str | None = None
    draining: bool = False
    in_flight: InFlight = field(default_factory=InFlight)
    open_connections: int = 0  # client connections (connection.py counts them)
    upload_bytes: int = 0  # edit bodies held now, read and not yet decoded (edits.UploadBudget)
    responses: Counter = field(default_factory=Counter)  # (route, status) -> count
    latency: prom.LatencyHistograms = field(default_factory=prom.LatencyHistograms)


CONFIG = web.AppKey("config", ServerConfig)
ENGINE: web.AppKey["AsyncEngine"] = web.AppKey("engine")
ENGINE_FACTORY: web.AppKey[Callable[[EngineConfig], Any] | None] = web.AppKey("engine_factory")  # None: AsyncEngine
STATE = web.AppKey("state", ServerState)
REQUEST_ID = web.RequestKey("request_id", str)  # a generation request's id, once it has one (log lines)
