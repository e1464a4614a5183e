"""Discrete-event replay of a trace over N hosts of M simulated devices each, with a routing policy
(routing.py) in front: the cluster of `tetri-engine serve --replicas N`, at scales no machine here has.

Each host is its own policy instance (e.g. `tetri` on M devices), driven exactly as one engine drives
its policy (simulator.py): a request routed to a host at its arrival is encoded there (`encode_s`, the
profile's), then added to that host's policy; a host's policy is asked to schedule after each of its
own events (a request added, a group ended), and a group takes what the cost model says. While a
request is encoded its host's estimates count it as pending (as `AsyncEngine.estimate` does) but its
admission does not (as the engine's admission does not).

Routing happens at arrival, with every host's state at that moment:
- deadline:     every host's `Policy.estimate` becomes an `Offer`; `routing.choose_by_deadline`.
- pow2:         two hosts at random, the one holding fewer requests (queued + encoding).
- round-robin:  the next host in turn.
Then the host's admission decides, as the engine's does: a full queue (max_queue) refuses; with
admission "reject" a request the host's policy says does not fit (`admission_check`) is refused, with
"best_effort" it is taken. A refused request counts as missed (metrics.sar: every request submitted).
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from tetri_engine.sched.metrics import distribution, sar
from tetri_engine.sched.plan import RoundResult, SchedRequest, SchedState
from tetri_engine.sched.policy import Policy
from tetri_engine.sched.routing import ROUTING_POLICIES, Offer, Refusal, RoundRobin, choose_by_deadline, choose_pow2
from tetri_engine.sched.simulator import RequestRecord
from tetri_engine.sched.trace import TraceRequest

ADMISSION_MODES = ("reject", "best_effort")
_END, _ENCODED, _ARRIVE = 0, 1, 2  # simultaneous events: groups end first, arrivals see their devices free


@dataclass
class ClusterSimResult:
    routing: str
    num_hosts: int
    devices_per_host: int
    slo_scale: float
    admission: str
    requests: list[RequestRecord]
    host_of: dict[str, int | None]  # request id -> host it ran on (None: refused by routing)

    @property
    def sar(self) -> float:
        """metrics.sar over every request of the trace (refused ones count as missed)."""
        value = sar(r.met for r in self.requests)
        return 1.0 if value is None else value

    @property
    def rejected(self) -> int:
        return sum(r.state == "rejected" for r in self.requests)

    def requests_per_host(self) -> list[int]:
        counts = [0] * self.num_hosts
        for host in self.host_of.values():
            if host is not None:
                counts[host] += 1
        return counts

    def summary(self) -> dict:
        done = [r.slowdown for r in self.requests if r.slowdown is not None]
        return {"routing": self.routing, "hosts": self.num_hosts, "devices_per_host": self.devices_per_host,
                "slo_scale": self.slo_scale, "admission": self.admission, "num_requests": len(self.requests),
                "sar": self.sar, "rejected": self.rejected, "requests_per_host": self.requests_per_host(),
                "slowdown": distribution(done)}


@dataclass
class _Host:
    policy: Policy
    encoding: list[SchedRequest] = field(default_factory=list)  # routed here, prompt still being encoded

    @property
    def held(self) -> int:
        return self.policy.queue_depth + len(self.encoding)


def simulate_cluster(trace: Sequence[TraceRequest], make_policy: Callable[[], Policy], num_hosts: int,
                     routing: str, *, slo_scale: float = 1.0, admission: str = "reject", max_queue: int = 64,
                     seed: int = 0, jitter_cv: float = 0.0) -> ClusterSimResult:
    """Replay `trace` over `num_hosts` hosts, each running `make_policy()` (a fresh policy on its M
    devices), routing with `routing` (routing.ROUTING_POLICIES). seed drives routing's chance (pow2's
    draws, ties) and the jitter of group times (jitter_cv, as simulator.simulate)."""
    if routing not in ROUTING_POLICIES:
        raise ValueError(f"unknown routing {routing!r}: choose from {', '.join(ROUTING_POLICIES)}")
    if admission not in ADMISSION_MODES:
        raise ValueError(f"unknown admission {admission!r}: choose from {', '.join(ADMISSION_MODES)}")
    if num_hosts < 1:
        raise ValueError("num_hosts must be >= 1")
    hosts = [_Host(make_policy()) for _ in range(num_hosts)]
    sim = _ClusterSim(hosts, routing, slo_scale, admission, max_queue, random.Random(seed), jitter_cv)
    sim.run(trace)
    return ClusterSimResult(routing, num_hosts, hosts[0].policy.num_devices, slo_scale, admission,
                            list(sim.records.values()), sim.host_of)


class _ClusterSim:
    def __init__(self, hosts: list[_Host], routing: str, slo_scale: float, admission: str, max_queue: int,
                 rng: random.Random, jitter_cv: float):
        self.hosts, self.routing, self.slo_scale = hosts, routing, slo_scale
        self.admission, self.max_queue, self.rng, self.jitter_cv = admission, max_queue, rng, jitter_cv
        self.cost = hosts[0].policy.cost
        self.round_robin = RoundRobin()
        self.records: dict[str, RequestRecord] = {}
        self.host_of: dict[str, int | None] = {}
        self.events: list[tuple] = []  # (time, kind, seq, host index, payload)
        self.seq = 0

    def push(self, t: float, kind: int, host: int, payload) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, host, payload))

    def run(self, trace: Sequence[TraceRequest]) -> None:
        for i, tr in enumerate(sorted(trace, key=lambda r: r.arrival_s)):
            self.push(tr.arrival_s, _ARRIVE, -1, (i, tr))
        while self.events:
            now = self.events[0][0]
            touched: set[int] = set()
            while self.events and self.events[0][0] <= now:
                _, kind, _, h, payload = heapq.heappop(self.events)
                if kind == _END:
                    self._end(h, now, payload)
                    touched.add(h)
                elif kind == _ENCODED:
                    self.hosts[h].encoding.remove(payload)
                    self.hosts[h].policy.add_request(payload)
                    touched.add(h)
                else:
                    self._arrive(now, *payload)
            for h in sorted(touched):
                self._schedule(h, now)

    # ---- events ----------------------------------------------------------------------------------

    def _arrive(self, now: float, index: int, tr: TraceRequest) -> None:
        rid = tr.request_id or f"req-{index:05d}"
        deadline = tr.arrival_s + self.slo_scale * tr.slo_ms / 1000.0
        cached = tr.cache == "auto"
        req = SchedRequest(rid, tr.width, tr.height, tr.steps, tr.arrival_s, deadline, cached=cached)
        policy = self.hosts[0].policy
        isolated = self.cost.encode_s() + self.cost.isolated_s(tr.width, tr.height, tr.steps, policy.max_degree, cached)
        record = RequestRecord(rid, tr.width, tr.height, tr.steps, tr.arrival_s, deadline, None, "rejected", {}, 0, 0,
                               isolated)
        self.records[rid] = record
        h = self._route(req, now)
        self.host_of[rid] = h
        if h is None or not self._admits(self.hosts[h], req, now):
            return
        record.state = SchedState.WAITING.value
        self.hosts[h].encoding.append(req)
        self.push(now + self.cost.encode_s(), _ENCODED, h, req)

    def _end(self, h: int, now: float, payload) -> None:
        plan, gi = payload
        group = plan.groups[gi]
        result = RoundResult(now, steps_done={rid: group.num_steps for rid in group.request_ids})
        for r in self.hosts[h].policy.update_from_output(plan, result):
            rec = self.records[r.request_id]
            rec.finish_s, rec.state = r.finish_s, r.state.value
            rec.steps_at_degree, rec.regroups, rec.rounds = dict(r.steps_at_degree), r.regroups, r.rounds

    def _schedule(self, h: int, now: float) -> None:
        plan = self.hosts[h].policy.schedule(now)
        for rid in plan.given_up:
            self.records[rid].given_up_s = now
        for gi, group in enumerate(plan.groups):
            duration = group.expected_s
            if self.jitter_cv > 0:
                duration *= max(0.5, 1.0 + self.rng.gauss(0.0, self.jitter_cv))
            self.push(now + duration, _END, h, (plan, gi))

    # ---- routing and admission -------------------------------------------------------------------

    def _route(self, req: SchedRequest, now: float) -> int | None:
        if self.routing == "pow2":
            return choose_pow2({i: host.held for i, host in enumerate(self.hosts)}, self.rng)
        if self.routing == "round-robin":
            return self.round_robin.choose(range(len(self.hosts)))
        choice = choose_by_deadline([self._offer(i, host, req, now) for i, host in enumerate(self.hosts)],
                                    self.rng)
        return None if isinstance(choice, Refusal) else choice.replica

    def _offer(self, index: int, host: _Host, req: SchedRequest, now: float) -> Offer:
        if host.held >= self.max_queue:
            return Offer(False, False, float("inf"), 0.0, 0.0, None, "queue_full", req.deadline - now, host.held,
                         replica=index)
        e = host.policy.estimate(req.width, req.height, req.num_steps, req.deadline, now, req.cached,
                                 pending=host.encoding, cfg=req.cfg)
        accepts = e.fits or (self.admission == "best_effort")
        return Offer(accepts, e.fits, e.finish_s - now, e.cost_s, e.delay_s, e.retry_after_s, e.reason,
                     req.deadline - now, host.held, replica=index)

    def _admits(self, host: _Host, req: SchedRequest, now: float) -> bool:
        """The host's admission, as the engine's (engine/admission.py): queue bound, then the policy."""
        if host.held >= self.max_queue:
            return False
        if self.admission == "best_effort":
            return True
        return host.policy.admission_check(req.width, req.height, req.num_steps, req.deadline, now, req.cached,
                                           req.cfg, pending=host.encoding).fits
