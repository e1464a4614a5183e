"""The engine layer: AsyncEngine (round clock, admission, request tracking, outputs, stats) and the
step-time profiling shared by start-up, `tetri-engine profile` and bench/profile_steps.py."""
from __future__ import annotations

from tetri_engine.engine.async_engine import AsyncEngine

__all__ = ["AsyncEngine"]
