"""Default SLOs (deadlines relative to arrival) per resolution.

The paper's table (FLUX.1-dev, 50 steps, 8xH100): 256^2 1.5 s, 512^2 2.0 s, 1024^2 3.0 s,
2048^2 5.0 s, multiplied by an SLO scale (1.0 .. 1.5). Other sizes are interpolated linearly in
log(token count) between the table's points and clamped at its ends; other step counts scale the
table value by steps / 50.

Re-basing on a profile. The table is absolute seconds for the paper's machine; on a slower one
(FLUX.1-dev at 50 steps on one H200 already takes 2.9 s at 512^2, and the tiny model on a CPU is
slower still) most of its deadlines cannot be met even by one request alone on every device, and
every policy scores ~0. So, given a cost model, the SLO is

    slo_s = scale * max(table_s(w, h) * steps / 50,  SLO_HEADROOM * isolated_s)

where isolated_s = encode + steps x the fastest step time on at most `max_degree` devices + decode
(the fastest the request can possibly be served, alone, on this machine). SLO_HEADROOM = 1.5 was
fixed before any policy was compared (not tuned): a request alone must fit with 50% to spare, so
round quantisation and a short queue fit at scale 1.0, while large resolutions still need to run
parallel for most of their steps.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tetri_engine.sched.cost import num_tokens

if TYPE_CHECKING:  # pragma: no cover
    from tetri_engine.sched.cost import CostModel

REFERENCE_STEPS = 50
# (side px, SLO seconds) from the paper, for square images at REFERENCE_STEPS steps.
PAPER_SLO_TABLE_S: tuple[tuple[int, float], ...] = ((256, 1.5), (512, 2.0), (1024, 3.0), (2048, 5.0))
SLO_HEADROOM = 1.5


def table_slo_s(width: int, height: int, steps: int = REFERENCE_STEPS) -> float:
    """The paper's SLO for this size (scale 1.0), interpolated in log token count, scaled by steps."""
    x = math.log(num_tokens(width, height))
    pts = [(math.log(num_tokens(side, side)), s) for side, s in PAPER_SLO_TABLE_S]
    if x <= pts[0][0]:
        base = pts[0][1]
    elif x >= pts[-1][0]:
        base = pts[-1][1]
    else:
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x0 <= x <= x1:
                base = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
                break
    return base * steps / REFERENCE_STEPS


def slo_s(
    width: int,
    height: int,
    steps: int = REFERENCE_STEPS,
    cost: "CostModel | None" = None,
    scale: float = 1.0,
    max_degree: int | None = None,
) -> float:
    """Default deadline (seconds after arrival) of a request; see the module docstring for the rule.

    cost=None gives the paper's table x scale. max_degree: devices this machine has (default: the
    largest profiled degree).
    """
    base = table_slo_s(width, height, steps)
    if cost is not None:
        max_degree = max_degree if max_degree is not None else max(cost.degrees)
        isolated = cost.encode_s() + cost.isolated_s(width, height, steps, max_degree)
        base = max(base, SLO_HEADROOM * isolated)
    return scale * base
