"""Discrete-event replay of a trace through a policy on N simulated devices.

Only the executor is simulated: the policy is driven exactly as the engine drives it
(add_request at arrival, schedule(now_s) after every event, update_from_output with per-group
results), and a group takes what the cost model says it takes: num_steps x step_s(res, degree,
batch), plus a VAE decode for each request that finishes (optionally with seeded Gaussian jitter).
A request becomes schedulable `encode_s` after its arrival (prompt encoding); its deadline counts
from arrival.

Records per-request outcomes and per-device busy intervals (the Gantt / "Tetris" view).
"""
from __future__ import annotations

import heapq
import math
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

from tetri_engine.sched.metrics import distribution, percentile, sar, slowdown
from tetri_engine.sched.plan import RoundResult, SchedRequest, SchedState
from tetri_engine.sched.policy import Policy
from tetri_engine.sched.trace import TraceRequest


@dataclass
class RequestRecord:
    request_id: str
    width: int
    height: int
    steps: int
    arrival_s: float
    deadline_s: float
    finish_s: float | None
    state: str
    steps_at_degree: dict[int, int]
    regroups: int
    rounds: int
    isolated_s: float = 0.0  # its fastest time alone on the machine (encode + steps + decode)
    given_up_s: float | None = None  # when the policy gave it up (RoundPlan.given_up), if it did

    @property
    def met(self) -> bool:
        return self.state == SchedState.COMPLETED.value and self.finish_s is not None and self.finish_s <= self.deadline_s + 1e-9

    @property
    def slowdown(self) -> float | None:
        """latency / isolated time (metrics.slowdown); None until it has finished."""
        if self.finish_s is None:
            return None
        return slowdown(self.finish_s - self.arrival_s, self.isolated_s)


@dataclass
class BusyInterval:
    device_id: int
    start_s: float
    end_s: float
    request_ids: tuple[str, ...]
    degree: int
    num_steps: int
    decode: bool
    cfg: int = 1  # the group's guidance branches side by side (GroupAssignment.cfg)


@dataclass
class SimResult:
    policy: str
    num_devices: int
    slo_scale: float
    requests: list[RequestRecord]
    busy: list[BusyInterval]
    rounds: int
    decision_s: list[float] = field(default_factory=list)  # wall time of each non-empty schedule() call

    @property
    def sar(self) -> float:
        """SLO attainment ratio: requests finished by their deadline / all requests (metrics.sar)."""
        value = sar(r.met for r in self.requests)
        return 1.0 if value is None else value

    def slowdowns(self) -> dict:
        """metrics.distribution of the requests' slowdowns (count, mean, p50, p90, p99, max)."""
        return distribution([r.slowdown for r in self.requests if r.slowdown is not None])

    def sar_by_size(self) -> dict[str, float]:
        by: dict[str, list[bool]] = {}
        for r in self.requests:
            by.setdefault(f"{r.width}x{r.height}", []).append(r.met)
        return {k: sum(v) / len(v) for k, v in sorted(by.items(), key=lambda kv: int(kv[0].split("x")[0]))}

    @property
    def makespan_s(self) -> float:
        return max((b.end_s for b in self.busy), default=0.0)

    def busy_fraction(self) -> float:
        span = self.makespan_s
        if span <= 0:
            return 0.0
        return sum(b.end_s - b.start_s for b in self.busy) / (span * self.num_devices)

    def summary(self) -> dict:
        lat = [r.finish_s - r.arrival_s for r in self.requests if r.finish_s is not None]
        return {
            "policy": self.policy,
            "num_devices": self.num_devices,
            "slo_scale": self.slo_scale,
            "num_requests": len(self.requests),
            "sar": self.sar,
            "sar_by_size": self.sar_by_size(),
            "busy_fraction": self.busy_fraction(),
            "makespan_s": self.makespan_s,
            "rounds": self.rounds,
            "mean_latency_s": sum(lat) / len(lat) if lat else None,
            "p99_latency_s": percentile(lat, 99),
            "slowdown": self.slowdowns(),
            "given_up": sum(r.given_up_s is not None for r in self.requests),
            "regroups": sum(r.regroups for r in self.requests),
        }


def simulate(
    trace: Sequence[TraceRequest],
    policy: Policy,
    *,
    slo_scale: float = 1.0,
    jitter_cv: float = 0.0,
    seed: int = 0,
    cfg: bool = False,
) -> SimResult:
    """Replay `trace` through `policy` (fresh, with no requests) and return what happened. cfg: every
    request has true classifier-free guidance (an SD3 workload), whatever its trace line says."""
    cost = policy.cost
    rng = random.Random(seed)
    encode_s = cost.encode_s()
    arrivals = sorted(trace, key=lambda r: r.arrival_s)
    records: dict[str, RequestRecord] = {}
    busy: list[BusyInterval] = []
    decision_s: list[float] = []
    events: list[tuple[float, int, object, int]] = []  # (end_s, seq, plan, group index)
    seq = 0
    rounds = 0
    i = 0
    now = 0.0
    while True:
        next_arrival = arrivals[i].arrival_s + encode_s if i < len(arrivals) else math.inf
        next_done = events[0][0] if events else math.inf
        now = min(next_arrival, next_done)
        if now == math.inf:
            break
        while events and events[0][0] <= now:
            end_s, _, plan, gi = heapq.heappop(events)
            group = plan.groups[gi]
            result = RoundResult(end_s, steps_done={rid: group.num_steps for rid in group.request_ids})
            _record_finished(records, policy.update_from_output(plan, result))
        while i < len(arrivals) and arrivals[i].arrival_s + encode_s <= now:
            record = _arrive(policy, arrivals[i], i, slo_scale, encode_s, cfg)
            records[record.request_id] = record
            i += 1
        t0 = time.perf_counter()
        plan = policy.schedule(now)
        for rid in plan.given_up:
            records[rid].given_up_s = now
        if plan.is_empty:
            if not events and i >= len(arrivals) and policy.has_work():
                raise RuntimeError(f"{policy.name}: {policy.queue_depth} requests left but nothing scheduled at "
                                   f"t={now:.3f}s with every device idle")
            continue
        decision_s.append(time.perf_counter() - t0)
        rounds += 1
        for gi, group in enumerate(plan.groups):
            duration = group.expected_s
            if jitter_cv > 0:
                duration *= max(0.5, 1.0 + rng.gauss(0.0, jitter_cv))
            seq += 1
            heapq.heappush(events, (now + duration, seq, plan, gi))
            busy.extend(BusyInterval(d, now, now + duration, group.request_ids, group.degree, group.num_steps,
                                     group.decode_after, group.cfg) for d in group.device_ids)
    return SimResult(policy.name, policy.num_devices, slo_scale, list(records.values()), busy, rounds, decision_s)


def _arrive(policy: Policy, tr: TraceRequest, index: int, slo_scale: float, encode_s: float,
            cfg: bool = False) -> RequestRecord:
    """Add a trace request to the policy (its deadline at this SLO scale) and start its record."""
    rid = tr.request_id or f"req-{index:05d}"
    deadline = tr.arrival_s + slo_scale * tr.slo_ms / 1000.0
    cached, cfg = tr.cache == "auto", (tr.cfg or cfg) and tr.cache != "auto"
    policy.add_request(SchedRequest(rid, tr.width, tr.height, tr.steps, tr.arrival_s, deadline, cached=cached,
                                    cfg=cfg))
    isolated = encode_s + policy.cost.isolated_s(tr.width, tr.height, tr.steps, policy.max_degree, cached,
                                                 cfg and policy.cfg_parallel)
    return RequestRecord(rid, tr.width, tr.height, tr.steps, tr.arrival_s, deadline, None,
                         SchedState.WAITING.value, {}, 0, 0, isolated)


def _record_finished(records: dict[str, RequestRecord], finished: list[SchedRequest]) -> None:
    for r in finished:
        rec = records[r.request_id]
        rec.finish_s, rec.state = r.finish_s, r.state.value
        rec.steps_at_degree, rec.regroups, rec.rounds = dict(r.steps_at_degree), r.regroups, r.rounds
