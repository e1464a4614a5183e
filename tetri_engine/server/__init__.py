"""The HTTP server: an OpenAI-compatible images API over the AsyncEngine.

`config.py` ServerConfig (the `serve` flags) · `protocol.py` request validation, response and event
bodies · `app.py` the aiohttp application (`create_app`) · `metrics.py` Prometheus text.
Importing this package imports aiohttp but not the engine (torch is loaded when the app starts).
"""
from __future__ import annotations

from tetri_engine.server.app import create_app, wait_until_ready
from tetri_engine.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app", "wait_until_ready"]
