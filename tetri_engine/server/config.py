"""ServerConfig: every `tetri-engine serve` flag, as one dataclass, and its mapping onto EngineConfig.

Each field's `metadata["help"]` is its `--help` text; `add_arguments()` builds the argparse flags from
the fields (flag name = field name with dashes), so a new setting is one field here and nothing else.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

from tetri_engine.config import EngineConfig, default_cache_dir

# Read when the server starts (not at import), so a key need not appear in `ps` output.
API_KEY_ENV = "TETRI_ENGINE_API_KEY"


def _opt(default, help_text: str, *, factory=None, **extra):
    metadata = {"help": help_text, **extra}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ServerConfig:
    # Where to listen.
    host: str = _opt("127.0.0.1", "address to bind; loopback by default, set 0.0.0.0 to expose the "
                     "server (then also set --api-key)")
    port: int = _opt(8000, "TCP port to listen on")
    # The engine (mapped onto EngineConfig by to_engine_config()).
    model: str = _opt("tiny", "model: tiny (embedded random-weight default), flux-dev, flux-schnell, "
                      "sd3-medium, or a local diffusers directory")
    served_model_name: str | None = _opt(None, "model name reported by /v1/models and accepted in the "
                                         "`model` field of requests (default: --model)")
    devices: list[str] | None = _opt(None, "devices, comma-separated, e.g. cuda:0,cuda:1 or "
                                     "cpu:0,cpu:1 (default: every visible GPU, else "
                                     "--num-cpu-devices virtual CPU devices)", metavar="LIST")
    num_cpu_devices: int = _opt(4, "number of virtual CPU devices when there is no GPU")
    dtype: str = _opt("auto", "model dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32",
                      choices=("auto", "bf16", "fp16", "fp32"))
    policy: str = _opt("tetri", "scheduling policy: tetri, fixed1, fixed2, fixed4, fixed8, rssp, edf2")
    profile: str | None = _opt(None, "step-time profile JSON (bench/profiles/*.json); default: "
                               "measured at start-up and cached under --cache-dir", metavar="PATH")
    cache_dir: str = _opt(None, "directory for cached profiles and models "
                          "(default: ~/.cache/tetri-engine)", factory=default_cache_dir,
                          metavar="DIR")
    round_steps: int = _opt(5, "round length in steps of a typical request (TetriServe: 5)")
    round_s: float | None = _opt(None, "fixed round length in seconds (overrides --round-steps)")
    # Admission and limits.
    max_queue: int = _opt(64, "at most this many requests waiting or running; more get HTTP 429")
    admission: str = _opt("reject", "a deadline that cannot be met even at full width: reject "
                          "(HTTP 429) or best_effort (accept anyway)",
                          choices=("reject", "best_effort"))
    slo_scale: float = _opt(1.0, "default deadline = the SLO table's target for the resolution x "
                            "this scale (requests may send deadline_ms or slo_scale)")
    max_width: int = _opt(2048, "largest image width accepted, in pixels")
    max_height: int = _opt(2048, "largest image height accepted, in pixels")
    max_steps: int = _opt(100, "largest num_inference_steps accepted")
    max_n: int = _opt(4, "largest `n` (images per HTTP request) accepted")
    default_size: str | None = _opt(None, "image size used when a request sends no size or "
                                    "size=auto (default: 512x512, capped at --max-width and "
                                    "--max-height)", metavar="WxH")
    comm_cache_size: int = _opt(64, "communicator cache size (device groups kept warm)")
    # HTTP.
    api_key: str | None = _opt(None, "require `Authorization: Bearer KEY` on /v1/* and /dashboard "
                               f"(default: the {API_KEY_ENV} environment variable; unset: no key "
                               "needed)",
                               metavar="KEY")
    dashboard: bool = _opt(True, "serve the live dashboard at /dashboard (on by default; it needs "
                           "the API key too when one is set); --no-dashboard leaves it out")
    max_body_bytes: int = _opt(1 << 20, "largest request body accepted, in bytes (larger: HTTP 413)")
    drain_timeout_s: float = _opt(60.0, "on SIGINT/SIGTERM, wait at most this long for in-flight "
                                  "requests before cancelling them")
    log_level: str = _opt("info", "logging level: debug, info, warning, error",
                          choices=("debug", "info", "warning", "error"))

    @property
    def model_name(self) -> str:
        """The name clients use for this server's model."""
        return self.served_model_name or self.model

    @property
    def resolved_default_size(self) -> str:
        if self.default_size:
            return self.default_size
        return f"{min(512, self.max_width)}x{min(512, self.max_height)}"

    def to_engine_config(self) -> EngineConfig:
        """The EngineConfig this server starts its engine with (fields of the same name)."""
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        return EngineConfig(**{n: getattr(self, n) for n in names if hasattr(self, n)})

    # --- command line ---------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One `--flag` per field, with the field's help text and default."""
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = getattr(defaults, f.name)
            kind = _base_type(hints[f.name])
            help_text = f.metadata["help"]
            if kind is bool:  # --flag / --no-flag; the help text says which one is the default
                parser.add_argument(flag, dest=f.name, default=default, help=help_text,
                                    action=argparse.BooleanOptionalAction)
                continue
            if default is not None and "(default" not in help_text:
                help_text += f" (default: {default})"
            kwargs = {"dest": f.name, "default": default, "help": help_text}
            for key in ("metavar", "choices"):
                if key in f.metadata:
                    kwargs[key] = f.metadata[key]
            if kind is list:
                kwargs["type"] = _comma_list
            else:
                kwargs["type"] = kind
            parser.add_argument(flag, **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerConfig":
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        if values["api_key"] is None:
            values["api_key"] = os.environ.get(API_KEY_ENV) or None
        return cls(**values)


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
