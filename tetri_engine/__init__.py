"""tetri-engine: deadline-aware serving of Diffusion Transformers with step-level sequence parallelism.

Importing the package is cheap and never initialises CUDA: the engine, the model runtime and the
native extension are imported on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from tetri_engine.config import AdmissionMode, EngineConfig
from tetri_engine.errors import EngineNotRunning, RejectionReason, RequestRejected
from tetri_engine.request import (
    CacheMode,
    GenerationOutput,
    GenerationRequest,
    LoraRef,
    OutputKind,
    RequestMetrics,
    RequestState,
    SizeRule,
)

if TYPE_CHECKING:  # pragma: no cover
    from tetri_engine.engine.async_engine import AsyncEngine

__all__ = [
    "AdmissionMode",
    "AsyncEngine",
    "CacheMode",
    "EngineConfig",
    "EngineNotRunning",
    "GenerationOutput",
    "GenerationRequest",
    "LoraRef",
    "OutputKind",
    "RejectionReason",
    "RequestMetrics",
    "RequestRejected",
    "RequestState",
    "SizeRule",
]


def __getattr__(name: str):
    # AsyncEngine pulls in torch and diffusers: import it only when asked for.
    if name == "AsyncEngine":
        from tetri_engine.engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'tetri_engine' has no attribute {name!r}")
