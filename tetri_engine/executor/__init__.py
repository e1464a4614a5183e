"""The executor layer: per-device worker threads, per-request denoising state, and the `Executor` the
engine drives (see docs/ARCHITECTURE.md, "model + executor")."""
from __future__ import annotations

from tetri_engine.executor.executor import Executor
from tetri_engine.executor.state import EncodeResult, ModelInfo, RequestProgress, RequestStepResult, StepsResult

__all__ = ["EncodeResult", "Executor", "ModelInfo", "RequestProgress", "RequestStepResult", "StepsResult"]
