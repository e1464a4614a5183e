"""The executor layer: per-device worker threads, per-request denoising state, and the `Executor` the
engine drives (see docs/ARCHITECTURE.md, "model + executor")."""
from __future__ import annotations

from tetri_engine.executor.executor import Executor
from tetri_engine.executor.state import EncodeResult, RequestStepResult, StepsResult

__all__ = ["EncodeResult", "Executor", "RequestStepResult", "StepsResult"]
