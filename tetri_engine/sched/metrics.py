"""The one metrics library: SAR, percentiles and slowdown, for the simulator, the engine's reports
and every bench script alike, so that two numbers with the same name are computed the same way.

Conventions (stated once, used everywhere):
- SAR (SLO attainment ratio) = requests that finished by their deadline / every request submitted.
  The denominator counts every request of the trace or run, whatever its end: rejected, failed,
  cancelled by the engine, or never run all count as missed. `sar(met_flags)` takes one flag per
  submitted request (None counts as missed).
- Percentiles interpolate linearly between the closest ranks (numpy's default, "linear"):
  `percentile(xs, 99)` with q in [0, 100]. None for an empty list.
- Slowdown of a request = its latency (arrival -> result) / its fastest isolated time (alone on the
  machine, best degree, encode + steps + decode). 1.0 is the best possible.

Pure Python (no numpy, no torch), so `tetri_engine.sched` stays importable anywhere.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

PERCENTILES = (50, 90, 99)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (q in [0, 100]) by linear interpolation between closest ranks; None when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} must be within [0, 100]")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def sar(met_flags: Iterable[bool | None]) -> float | None:
    """Requests that met their deadline / every request given (one flag each; None = missed). None when empty."""
    flags = list(met_flags)
    if not flags:
        return None
    return sum(1 for m in flags if m) / len(flags)


def slowdown(latency_s: float, isolated_s: float) -> float:
    """latency / fastest isolated time (>= 1 in a faithful run; not clamped, so errors show)."""
    if not isolated_s > 0:
        raise ValueError(f"isolated time must be > 0 s, got {isolated_s}")
    return latency_s / isolated_s


def distribution(values: Sequence[float], percentiles: Sequence[float] = PERCENTILES) -> dict[str, float | None]:
    """{"count", "mean", "p50", "p90", "p99", "max"} of a list (None entries when empty)."""
    xs = list(values)
    out: dict[str, float | None] = {"count": len(xs), "mean": sum(xs) / len(xs) if xs else None}
    for q in percentiles:
        out[f"p{q:g}"] = percentile(xs, q)
    out["max"] = max(xs) if xs else None
    return out
