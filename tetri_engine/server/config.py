"""ServerConfig: every `tetri-engine serve` flag, as one dataclass: the server's own settings and the
whole EngineConfig it starts its engine with (`engine`).

Each field's `metadata["help"]` is its `--help` text; `add_arguments()` builds one flag per field of
ServerConfig and of EngineConfig (flag name = field name with dashes), so a new server setting is one
field here, and a new engine option (config.py) reaches the command line with nothing added here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

from tetri_engine.config import EngineConfig, option

# Read when the server starts (not at import), so a key need not appear in `ps` output.
API_KEY_ENV = "TETRI_ENGINE_API_KEY"
DEFAULT_MAX_CONNECTIONS = 1024
RESERVED_DESCRIPTORS = 128  # open files the process needs beside client sockets (model, threads, logs)
MIN_CONNECTIONS = 16


@dataclass
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)  # every engine option (config.py)
    # Where to listen.
    host: str = option("127.0.0.1", "address to bind; loopback by default, set 0.0.0.0 to expose the "
                      "server (then also set --api-key)")
    port: int = option(8000, "TCP port to listen on")
    served_model_name: str | None = option(None, "model name reported by /v1/models and accepted in the "
                                          "`model` field of requests (default: --model)")
    # Requests.
    max_n: int = option(4, "largest `n` (images per HTTP request) accepted")
    default_size: str | None = option(None, "image size used when a request sends no size or "
                                     "size=auto (default: 512x512, capped at --max-width and "
                                     "--max-height)", metavar="WxH")
    # HTTP.
    api_key: str | None = option(None, "require `Authorization: Bearer KEY` on /v1/* and /dashboard "
                                f"(default: the {API_KEY_ENV} environment variable; unset: no key "
                                "needed)", metavar="KEY")
    dashboard: bool = option(True, "serve the live dashboard at /dashboard (on by default; it needs "
                             "the API key too when one is set); --no-dashboard leaves it out")
    max_body_bytes: int = option(1 << 20, "largest request body accepted, in bytes (larger: HTTP 413)")
    max_edit_body_bytes: int = option(32 << 20, "largest body of POST /v1/images/edits (multipart: the image, "
                                      "its mask and the fields), in bytes (larger: HTTP 413)")
    drain_timeout_s: float = option(60.0, "on SIGINT/SIGTERM, wait at most this long for in-flight "
                                   "requests, then cut them (503, or an `error` event on a stream)")
    # Who may call from a browser (README, "Security defaults").
    allowed_hosts: list[str] | None = option(None, "Host header values accepted besides localhost, "
                                             "127.0.0.1 and [::1] (always accepted), e.g. myhost.lan; "
                                             "checked when bound to loopback or when this is set: a web "
                                             "page cannot reach the server through DNS rebinding",
                                             metavar="LIST")
    cors_origins: list[str] | None = option(None, "web origins allowed to call the API from a browser "
                                            "(CORS), e.g. https://app.example.com, or * for any (default: "
                                            "none: a request from another site's page is refused, 403)",
                                            metavar="LIST")
    # Connections: every way a client can hold a connection open is bounded in time or count.
    max_connections: int | None = option(None, "most client connections open at once; one more closes the "
                                         "oldest idle one, or is answered 503 when each has a request in "
                                         "progress (default: 1024, fewer when the open-file limit "
                                         f"leaves less than {RESERVED_DESCRIPTORS} descriptors for the rest)")
    keepalive_timeout_s: float = option(15.0, "close a connection idle this long between requests")
    header_timeout_s: float = option(10.0, "a request's headers must arrive within this time of its "
                                     "first byte (else 408 and the connection is closed)")
    body_timeout_s: float = option(30.0, "a request's body must arrive within this time (else 408)")
    write_timeout_s: float = option(30.0, "close a connection whose client has read nothing of its "
                                    "answer for this long (a slow reader no longer holds memory)")
    log_level: str = option("info", "logging level: debug, info, warning, error",
                           choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        for name in ("drain_timeout_s", "keepalive_timeout_s", "header_timeout_s", "body_timeout_s",
                     "write_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"--{name.replace('_', '-')}={value!r} must be a number of seconds > 0")
        for name in ("max_n", "max_body_bytes", "max_edit_body_bytes", "max_connections"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')}={value!r} must be an integer >= 1")

    @property
    def resolved_max_connections(self) -> int:
        """max_connections, or the default: 1024, fewer when `ulimit -n` leaves less than
        RESERVED_DESCRIPTORS for the engine, its threads and files."""
        if self.max_connections is not None:
            return self.max_connections
        try:
            import resource
        except ImportError:  # not POSIX: no descriptor limit to read
            return DEFAULT_MAX_CONNECTIONS
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return DEFAULT_MAX_CONNECTIONS
        return max(MIN_CONNECTIONS, min(DEFAULT_MAX_CONNECTIONS, soft - RESERVED_DESCRIPTORS))

    @property
    def model_name(self) -> str:
        """The name clients use for this server's model."""
        return self.served_model_name or self.engine.model

    @property
    def resolved_default_size(self) -> str:
        if self.default_size:
            return self.default_size
        return f"{min(512, self.engine.max_width)}x{min(512, self.engine.max_height)}"

    def to_engine_config(self) -> EngineConfig:
        """The EngineConfig this server starts its engine with."""
        return self.engine

    # --- command line ---------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One `--flag` per field of EngineConfig (the "engine" group) and of ServerConfig ("server")."""
        for owner, title in ((EngineConfig, "engine"), (cls, "server")):
            group = parser.add_argument_group(title)
            hints = typing.get_type_hints(owner)
            for f in _flag_fields(owner):
                _add_flag(group, f, hints[f.name], _default_of(f))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        engine = EngineConfig(**{f.name: getattr(args, f.name) for f in _flag_fields(EngineConfig)})
        values = {f.name: getattr(args, f.name) for f in _flag_fields(cls)}
        if values["api_key"] is None:
            values["api_key"] = os.environ.get(API_KEY_ENV) or None
        return cls(engine=engine, **values)


def _flag_fields(owner) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(owner) if "help" in f.metadata]


def _default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _add_flag(group, f: dataclasses.Field, hint, default) -> None:
    flag = "--" + f.name.replace("_", "-")
    kind = _base_type(hint)
    help_text = f.metadata["help"]
    if default is not None and "(default" not in help_text:
        help_text += f" (default: {default})"
    kwargs = {"dest": f.name, "default": default, "help": help_text}
    for key in ("metavar", "choices"):
        if key in f.metadata:
            kwargs[key] = f.metadata[key]
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction  # --cuda-graphs / --no-cuda-graphs
    elif kind is list:
        kwargs["type"] = _comma_list
    elif isinstance(kind, type) and issubclass(kind, str):  # str and str enums (AdmissionMode)
        kwargs["type"] = str
        kwargs["default"] = str(default) if default is not None else None
    else:
        kwargs["type"] = kind
    group.add_argument(flag, **kwargs)


def _base_type(hint) -> type:
    """int -> int, int | None -> int, list[str] | None -> list."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _comma_list(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. cpu:0,cpu:1")
    return items
