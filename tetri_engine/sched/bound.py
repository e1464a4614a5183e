"""An upper bound on the SLO attainment any schedule can reach on a trace: an LP relaxation.

No policy, online or offline, can finish more requests by their deadlines than this bound, so a
policy's SAR over the bound says how far it is from the best possible (`tetri-engine simulate`'s
`bound` row). The relaxation keeps the machine's capacity and each request's own speed limit and
drops everything that makes scheduling hard:

    maximise   sum_i x_i                                  x_i in [0, 1]: request i is on time
    steps      sum_{k,j} y_ikj = S_i x_i                  y_ikj >= 0: steps of i at degree k in interval j
    decode     sum_j z_ij = dec_i x_i                     z_ij >= 0: its VAE decode, anywhere in its window
    capacity   sum_{i,k} c_ik y_ikj + sum_i z_ij <= N |I_j|        (device-seconds of interval j)
    own speed  sum_k t_ik y_ikj + z_ij <= |I_j|           (a request runs one step at a time)

Intervals I_j cut time at every release (arrival + prompt encode, as in the simulator), every last
moment a step can end (deadline - decode) and every deadline; i's steps may only use intervals in
[release_i, deadline_i - decode_i], its decode those in [release_i, deadline_i]. t_ik is i's step
time at degree k (batch 1, the fastest a step of i can go: in its fastest layout on k devices, CFG
parallel included for a request with "cfg"), c_ik its cheapest device-seconds per step at degree k (k x
the step time, or a batched step's share when batching is cheaper); dec_i its fastest decode on at most
N devices, counted as one device's time (a k-device decode costs k x its time >= that). Any real
schedule gives a feasible point (x_i = 1 for each request it serves on time, the steps it ran in
each interval, fractions of steps where a step straddles a cut), so the LP optimum / requests is
an upper bound on SAR. Requests that cannot make their deadline even alone (fastest degree, from
release) are fixed at 0. `integral=True` asks HiGHS for the 0/1 problem instead (tighter; the
bound reported is then the MIP's dual bound, still valid if stopped at the time limit).

Solved with HiGHS through `highspy`, imported only here (the `bound` extra; installed by `make
test`), so `tetri_engine.sched` stays importable without it.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from tetri_engine.sched.cost import CostModel
from tetri_engine.sched.trace import TraceRequest

EPS = 1e-9


class BoundUnavailable(RuntimeError):
    """The LP solver is not installed (pip install highspy, or the `bound` extra)."""


@dataclass(frozen=True)
class Bound:
    sar: float  # upper bound on SAR (on-time requests / all requests)
    on_time: float  # upper bound on the number of requests on time (LP optimum)
    num_requests: int
    feasible_alone: int  # requests that can meet their deadline alone on the machine
    integral: bool
    status: str
    solve_s: float
    num_cols: int
    num_rows: int


def _new_highs():
    """A silent HiGHS instance. (The first one in a process prints a banner on the C stdout before
    any option can be set; it is sent to /dev/null so that tables printed around it stay clean.)"""
    try:
        import highspy
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise BoundUnavailable("the SAR bound needs highspy (pip install highspy, or tetri-engine[bound])") from exc
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    h.setOptionValue("output_flag", False)
    return highspy, h


def sar_bound(trace: Sequence[TraceRequest], cost: CostModel, num_devices: int, slo_scale: float = 1.0, *,
              integral: bool = False, time_limit_s: float = 60.0) -> Bound:
    """Upper bound on the SAR of any schedule of `trace` on `num_devices` devices at `slo_scale`."""
    degrees = cost.degrees_upto(num_devices)
    encode = cost.encode_s()
    jobs = []  # (release, last step end, deadline, steps, decode, {k: (t_ik, c_ik)})
    for tr in trace:
        cached = tr.cache == "auto"
        release = tr.arrival_s + encode
        deadline = tr.arrival_s + slo_scale * tr.slo_ms / 1000.0
        decode = cost.group_decode(tr.width, tr.height, num_devices)[1]
        layouts = cost.step_options(tr.width, tr.height, num_devices, cached, tr.cfg)
        per_degree = {}
        for k in degrees:
            t = layouts[k][0]
            c = min(k * cost.step_s(tr.width, tr.height, k, b, cached=cached) / b
                    for b in cost.batch_sizes(tr.width, tr.height, k) or [1])
            per_degree[k] = (t, min(c, k * t))
        fastest = min(t for t, _ in per_degree.values())
        if release + tr.steps * fastest + decode <= deadline + EPS:
            jobs.append((release, deadline - decode, deadline, tr.steps, decode, per_degree))
    n = len(trace)
    if not jobs:
        return Bound(0.0, 0.0, n, 0, integral, "trivial", 0.0, 0, 0)
    t0 = time.perf_counter()
    cols, lower, upper = _build(jobs, num_devices)
    highspy, h = _new_highs()
    h.setOptionValue("time_limit", float(time_limit_s))
    lp = highspy.HighsLp()
    lp.num_col_ = len(cols.cost)
    lp.num_row_ = len(lower)
    lp.col_cost_ = cols.cost
    lp.col_lower_ = [0.0] * lp.num_col_
    lp.col_upper_ = cols.upper
    lp.row_lower_ = lower
    lp.row_upper_ = upper
    lp.sense_ = highspy.ObjSense.kMaximize
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = cols.start
    lp.a_matrix_.index_ = cols.index
    lp.a_matrix_.value_ = cols.value
    if integral:
        lp.integrality_ = [highspy.HighsVarType.kInteger if u == 1.0 and c == 1.0 else highspy.HighsVarType.kContinuous
                           for u, c in zip(cols.upper, cols.cost)]
    h.passModel(lp)
    h.run()
    status = h.modelStatusToString(h.getModelStatus())
    info = h.getInfo()
    if integral:
        on_time = info.mip_dual_bound
    else:
        if status != "Optimal":
            raise RuntimeError(f"SAR bound LP ended {status}")
        on_time = info.objective_function_value
    on_time = min(float(on_time), float(len(jobs)))
    return Bound(on_time / n, on_time, n, len(jobs), integral, status, time.perf_counter() - t0,
                 lp.num_col_, lp.num_row_)


@dataclass
class _Columns:
    cost: list
    upper: list
    start: list
    index: list
    value: list

    def add(self, objective: float, upper: float, entries: list[tuple[int, float]]) -> None:
        self.cost.append(objective)
        self.upper.append(upper)
        for row, value in entries:
            self.index.append(row)
            self.value.append(value)
        self.start.append(len(self.index))


def _build(jobs: list, num_devices: int) -> tuple[_Columns, list, list]:
    """Columns of the LP (x, y, z per request) and the row bounds, in HiGHS' column-wise format."""
    inf = float("inf")
    cuts = sorted({t for job in jobs for t in (job[0], job[1], job[2])})
    index_of = {t: j for j, t in enumerate(cuts)}
    lengths = [b - a for a, b in zip(cuts, cuts[1:])]
    lower: list[float] = []
    upper: list[float] = []
    # Rows 0 .. len(lengths)-1: capacity of each interval.
    for length in lengths:
        lower.append(-inf)
        upper.append(num_devices * length)
    cols = _Columns([], [], [0], [], [])
    for release, step_end, deadline, steps, decode, per_degree in jobs:
        steps_row = len(lower)
        lower.append(0.0)
        upper.append(0.0)
        decode_row = None
        if decode > 0:
            decode_row = len(lower)
            lower.append(0.0)
            upper.append(0.0)
        first, last_step, last = index_of[release], index_of[step_end], index_of[deadline]
        own_row = {}
        for j in range(first, last):
            own_row[j] = len(lower)
            lower.append(-inf)
            upper.append(lengths[j])
        x_entries = [(steps_row, -float(steps))]
        if decode_row is not None:
            x_entries.append((decode_row, -decode))
        cols.add(1.0, 1.0, x_entries)
        for j in range(first, last_step):
            for t, c in per_degree.values():
                cols.add(0.0, inf, [(j, c), (steps_row, 1.0), (own_row[j], t)])
        if decode_row is not None:
            for j in range(first, last):
                cols.add(0.0, inf, [(j, 1.0), (decode_row, 1.0), (own_row[j], 1.0)])
    return cols, lower, upper
