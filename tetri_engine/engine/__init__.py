"""The engine layer: AsyncEngine (front end), Admission, EngineCore (the round clock) and its
RequestTracker, the counters and round records of stats(), and the step-time profiling shared by
start-up, `tetri-engine profile` and bench/profile_steps.py. It drives `sched` (what runs where) and
the executor (running it); it imports neither the model nor ops."""
from __future__ import annotations

from tetri_engine.engine.async_engine import AsyncEngine

__all__ = ["AsyncEngine"]
