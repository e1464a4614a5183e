"""The HTTP server: an OpenAI-compatible images API over the AsyncEngine.

`config.py` ServerConfig (the `serve` flags) · `protocol.py` request validation, response and event
bodies, the HTTP answer of each engine refusal · `app.py` the aiohttp application (`create_app`) ·
`middleware.py` who may call, errors in OpenAI's envelope, log lines · `connection.py` bounds on
every connection, malformed HTTP, `make_runner` · `lifecycle.py` the engine's start, the drain,
`stop` · `state.py` what the server keeps · `metrics.py` Prometheus text · `dashboard*.py` the live
dashboard. Importing this package imports aiohttp but not the engine (torch is loaded when the app
starts).
"""
from __future__ import annotations

from tetri_engine.server.app import create_app
from tetri_engine.server.config import ServerConfig
from tetri_engine.server.connection import make_runner
from tetri_engine.server.lifecycle import stop, wait_until_ready

__all__ = ["ServerConfig", "create_app", "make_runner", "stop", "wait_until_ready"]
