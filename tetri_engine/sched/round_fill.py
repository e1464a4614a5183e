"""Round fill for the paper's synchronous rounds (paper.py): one length for a round of groups with
different step times, chosen so that the devices idle least.

Groups have different step times, so with one length for all some idle at the end of the round.
Candidate lengths are the group ends (k steps, + decode when k finishes the request) within
[round_min, round_max] x tau (and at least the longest single step); each group then runs as many
steps as fit, and the length wasting the fewest device-seconds (per second of round) wins.
"""
from __future__ import annotations

import math
from typing import Sequence


def fill_round(groups: Sequence[tuple[int, float, int, float]], tau: float, round_min: float, round_max: float,
               fine_step: float) -> list[int]:
    """groups: (degree, seconds per step, steps left, decode seconds when it finishes). Returns the
    steps each group runs (at least 1). Groups whose step is shorter than fine_step x tau propose
    no lengths (they fit any length well)."""
    shortest_round = max(t + (decode if remaining == 1 else 0.0) for _, t, remaining, decode in groups)
    lo = max(round_min * tau, shortest_round)
    hi = max(round_max * tau, lo)
    candidates = {lo, hi}
    for _, t, remaining, decode in groups:
        if t < fine_step * tau and remaining * t > hi:
            continue
        k = max(1, math.ceil(lo / t - 1e-9))
        while k <= remaining:
            end = k * t + (decode if k == remaining else 0.0)
            if end > hi + 1e-9:
                break
            if end >= lo - 1e-9:
                candidates.add(end)
            k += 1
    best = None
    for length in sorted(candidates):
        idle = 0.0
        for degree, t, remaining, decode in groups:
            q = _steps_within(length, t, remaining, decode)
            idle += degree * (length - q * t - (decode if q == remaining else 0.0))
        score = idle / length
        if best is None or score < best[0] - 1e-9:
            best = (score, length)
    return [max(1, _steps_within(best[1], t, remaining, decode)) for _, t, remaining, decode in groups]


def _steps_within(length: float, t: float, remaining: int, decode: float) -> int:
    q = min(remaining, int(math.floor(length / t + 1e-9)))
    if q == remaining and q * t + decode > length + 1e-9:
        q -= 1  # the decode would outlast the round: finish next round
    return q
