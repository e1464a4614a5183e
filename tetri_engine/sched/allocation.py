"""Allocation: the cheapest way (in GPU-seconds) to run a request's steps within a time budget.

The time / GPU-seconds trade-off of the degrees of one resolution is a convex curve: more devices
make a step faster but dearer (degree x step time), and degrees that are both slower and dearer than
another are useless. `lower_hull` keeps the degrees worth using, cheapest (slowest) first; the
cheapest plan meeting a budget (an LP with two constraints) then uses one degree, or two adjacent
hull degrees, e.g. "20 steps at 1, then 30 at 2" (`allocate`). Shared by both TetriServe policies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class HullPoint:
    degree: int
    step_s: float
    gpu_s: float  # degree x step_s: GPU-seconds per step


def lower_hull(points: list[HullPoint]) -> list[HullPoint]:
    """Cheapest-first lower convex hull of (step time, GPU-seconds) after dropping dominated points."""
    pareto: list[HullPoint] = []
    for p in sorted(points, key=lambda p: (p.gpu_s, p.step_s)):
        if not pareto or p.step_s < pareto[-1].step_s:  # keep only points faster than all cheaper ones
            pareto.append(p)
    hull: list[HullPoint] = []
    for p in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b on or above the chord a-p: mixing a and p is never worse than using b.
            if (b.step_s - a.step_s) * (p.gpu_s - a.gpu_s) - (b.gpu_s - a.gpu_s) * (p.step_s - a.step_s) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(hull: list[HullPoint], steps: int, budget_s: float) -> tuple[float, list[tuple[int, int]]] | None:
    """Cheapest (GPU-seconds) split of `steps` over the hull's degrees finishing within budget_s:
    (GPU-seconds, [(degree, steps), ...] cheapest segment first), or None when even the fastest
    degree is too slow.

    The LP optimum mixes the two adjacent hull points around budget/steps; rounding the fast
    share up keeps it feasible (and matched brute force on the test profiles)."""
    if steps <= 0:
        return (0.0, []) if budget_s >= -1e-9 else None
    first = hull[0]
    if steps * first.step_s <= budget_s + 1e-9:
        return steps * first.gpu_s, [(first.degree, steps)]
    for a, b in zip(hull, hull[1:]):
        if steps * b.step_s <= budget_s + 1e-9:
            n_fast = math.ceil((steps * a.step_s - budget_s) / (a.step_s - b.step_s) - 1e-9)
            n_fast = min(max(n_fast, 0), steps)
            n_slow = steps - n_fast
            segs = [(a.degree, n_slow)] if n_slow else []
            segs.append((b.degree, n_fast))
            return n_slow * a.gpu_s + n_fast * b.gpu_s, segs
    return None
