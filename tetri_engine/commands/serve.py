"""`tetri-engine serve`: the OpenAI-compatible HTTP server (tetri_engine.server) on one host, or, with
--replicas N, in front of N engine replicas on Ray Serve (tetri_engine.cluster).

The port opens at once and answers 503 while the engine starts; when the engine is ready a `curl`
line that works against this server is printed. SIGINT / SIGTERM: drain (the port stays open and
answers 503; in-flight requests get --drain-timeout-s, then are cut with a 503 or an `error` event:
server/lifecycle.py), stop listening, shut the engine down, exit 0. A second signal exits at once.
Runs on uvloop when it is installed.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from tetri_engine.cluster.config import ClusterConfig
from tetri_engine.server.config import API_KEY_ENV, ServerConfig

EXAMPLE_PROMPT = "a lighthouse on a cliff at dawn"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ServerConfig.add_arguments(parser)
    ClusterConfig.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        config = ServerConfig.from_args(args)
        cluster = ClusterConfig.from_args(args)
    except ValueError as exc:  # an engine option out of range (EngineConfig checks them)
        print(f"tetri-engine serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_model_libraries(config.log_level)
    return run_event_loop(serve(config, cluster))


def engine_factory(config: ServerConfig, cluster: ClusterConfig | None):
    """None (the server's own AsyncEngine), or a ClusterEngine factory with --replicas. A cluster serves
    no dashboard (it shows one engine's rounds)."""
    if cluster is None or not cluster.enabled:
        return None
    from tetri_engine.cluster.engine import ClusterEngine

    config.dashboard = False
    return lambda engine_config: ClusterEngine(engine_config, cluster, drain_timeout_s=config.drain_timeout_s)


def _quiet_model_libraries(level: str) -> None:
    """diffusers and transformers log through their own handlers, blind to the root logger's level:
    --log-level applies to them too (at least warning: their info lines are per-call noise). They
    read these variables when first imported (later, in the engine's start); one set by the user wins."""
    verbosity = "warning" if level in ("debug", "info") else level
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, verbosity)


def run_event_loop(main) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def serve(config: ServerConfig, cluster: ClusterConfig | None = None) -> int:
    # Imported here so that `tetri-engine serve --help` stays quick.
    from aiohttp import web

    from tetri_engine.server import create_app, lifecycle, make_runner, wait_until_ready

    try:
        app = create_app(config, engine_factory(config, cluster))
        runner = make_runner(app)  # a client that disconnects cancels its requests in the engine
        await runner.setup()  # creates the engine: a bad device list or policy fails here
    except ValueError as exc:
        print(f"tetri-engine serve: {exc}", file=sys.stderr)
        return 2
    try:
        await web.TCPSite(runner, config.host, config.port).start()
    except OSError as exc:
        print(f"tetri-engine serve: cannot listen on {config.host}:{config.port}: {exc}",
              file=sys.stderr)
        await runner.cleanup()
        return 1
    base_url = f"http://{_client_host(config.host)}:{config.port}"
    print(f"tetri-engine: listening on http://{config.host}:{config.port}; starting the engine "
          f"(model {config.engine.model}) ...", flush=True)

    stop = asyncio.Event()
    _install_signal_handlers(stop)
    ready = asyncio.create_task(wait_until_ready(app))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if ready.done() and not ready.cancelled() and ready.exception() is not None:
        print(f"tetri-engine serve: the engine failed to start: {ready.exception()}",
              file=sys.stderr)
        status = 1
    elif ready.done():
        key_note = f" (with {API_KEY_ENV} set to the API key)" if config.api_key else ""
        print(f"tetri-engine: ready. Model '{config.model_name}'. Try{key_note}:\n\n"
              f"{example_curl(config, base_url)}\n", flush=True)
        await stopped
    ready.cancel()
    stopped.cancel()
    print(f"tetri-engine: shutting down (in-flight requests get up to {config.drain_timeout_s:g} s; "
          "signal again to exit now) ...", flush=True)
    await lifecycle.stop(runner)
    print("tetri-engine: stopped.", flush=True)
    return status


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            print(f"tetri-engine: {signal.Signals(signum).name} again: exiting now.",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)  # skips the drain on purpose: the user asked twice
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)


def _client_host(host: str) -> str:
    """Where a client on this machine reaches the server."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def example_curl(config: ServerConfig, base_url: str) -> str:
    """A shell command that generates one image and writes it to image.png (or prints the error)."""
    size = "256x256" if min(config.engine.max_width, config.engine.max_height) >= 256 else config.resolved_default_size
    body = f'{{"prompt": "{EXAMPLE_PROMPT}", "size": "{size}"}}'
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if config.api_key else ""
    # Double quotes only inside, so that the whole snippet sits in one pair of single quotes.
    decode = ('import sys, json, base64; r = json.load(sys.stdin); '
              'open("image.png", "wb").write(base64.b64decode(r["data"][0]["b64_json"])) '
              'if "data" in r else sys.exit(r)')
    return (f"curl -s {base_url}/v1/images/generations -H 'Content-Type: application/json'{auth} "
            f"-d '{body}' | python3 -c '{decode}' && echo wrote image.png")
