"""Policy base class: the request tracker and the plan/result protocol every policy shares.

The engine and the simulator drive a policy the same way (vLLM v1 style, time passed in):

    policy.add_request(SchedRequest(...))
    plan = policy.schedule(now_s)            # groups for the devices that are idle now
    ... run the plan's groups ...
    policy.update_from_output(plan, RoundResult(end_s, steps_done={...}))

`schedule()` plans only devices that are not in flight and requests that are not in flight, and
may return an empty plan (nothing to do, or, for round-synchronous policies such as TetriServe, a
round still running and nothing that fits before its end). Call it after every arrival and every
result: mid-round, a round-synchronous policy backfills idle devices with work that ends by the
round's expected end (`plan.backfill`), and the next round starts once everything has finished. A result may cover a whole
plan or just the groups that finished; a group's devices are free once all of its requests are
reported. Subclasses implement one method, `_plan(now_s, idle_devices, ready_requests)`, returning
`GroupSpec`s; this class validates them (a policy bug raises instead of corrupting a run), works out
decodes, expected durations and latent moves, and keeps the books.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Sequence

from tetri_engine.sched.cost import CostModel
from tetri_engine.sched.placement import all_groups
from tetri_engine.sched.plan import GroupAssignment, LatentMove, RoundPlan, RoundResult, SchedRequest, SchedState


@dataclass(frozen=True)
class Admission:
    """Answer of `Policy.admission_check`. reason: "fits", "busy" (not alongside the protected
    requests now; retry_after_s says in how many seconds it would), or "deadline_impossible" (not
    even alone on the whole machine; retry_after_s None)."""

    fits: bool
    retry_after_s: float | None
    reason: str


@dataclass(frozen=True)
class Estimate:
    """Answer of `Policy.estimate`: what taking a request now would do, as planned now (no further
    arrivals). fits, retry_after_s, reason: as in `Admission`, with the pending requests counted.
    finish_s: when it would end (absolute, the clock of now_s). What it would cost: cost_s, the
    device-seconds the plan grows by (its own work, and wider degrees it forces on the requests held);
    delay_s, the seconds it pushes back the planned ends of the requests held, summed; displaced, the
    protected requests that would be given up for it (0 whenever it fits)."""

    fits: bool
    finish_s: float
    cost_s: float
    delay_s: float
    retry_after_s: float | None
    reason: str
    displaced: int = 0


@dataclass(frozen=True)
class GroupSpec:
    """What a policy decides for one group; the base class turns it into a GroupAssignment.
    cfg: 2 runs the requests' two guidance branches side by side (each on half the devices)."""

    device_ids: tuple[int, ...]
    request_ids: tuple[str, ...]
    num_steps: int
    cfg: int = 1


class Policy:
    name = "policy"
    # True: schedule() plans a new round only when the previous one has fully finished (TetriServe's
    # rounds). False: idle devices are planned whenever schedule() is called (FCFS/EDF baselines).
    synchronous_rounds = False
    # False: the policy's decisions never read a request's deadline (FCFS baselines), so one run of
    # a trace gives every request's finish time at every SLO scale (bench/e2e_slo.py relies on it).
    uses_deadlines = True
    # True: a group that finishes a request decodes it on as many of its devices as the profile says
    # is fastest (patch-parallel VAE, `cost.group_decode`). False (the baselines): on its first device.
    parallel_decode = False
    # True: requests with SchedRequest.cfg may run CFG-parallel (`GroupSpec.cfg`); False (the
    # baselines): sequence parallelism only.
    cfg_parallel = False

    def __init__(self, num_devices: int, cost: CostModel, *, round_steps: int = 5, round_s: float | None = None):
        if num_devices < 1:
            raise ValueError("num_devices must be >= 1")
        self.num_devices = num_devices
        self.cost = cost
        self.degrees = cost.degrees_upto(num_devices)
        if not self.degrees:
            raise ValueError(f"profile {cost.name} has no degree <= {num_devices} devices: {cost.degrees}")
        self.max_degree = max(self.degrees)
        if round_s is not None and round_s <= 0:
            raise ValueError("round_s must be > 0")
        if round_steps < 1:
            raise ValueError("round_steps must be >= 1")
        # Round length tau: fixed seconds, or round_steps steps of a typical request.
        self.round_s = float(round_s) if round_s is not None else round_steps * cost.typical_step_s()
        self._requests: dict[str, SchedRequest] = {}  # request_id -> active request, arrival order
        self._busy: dict[int, int] = {}  # device id -> round_index of the plan it is in flight for
        self._in_flight: dict[int, tuple[RoundPlan, set[int]]] = {}  # round_index -> (plan, unfinished group indices)
        self._aborted_in_flight: set[str] = set()
        self._next_round = 0
        self._round_end_s = 0.0  # expected end of the synchronous round in flight
        self._free_at: dict[int, float] = {}  # busy device -> expected end of its group
        self._flight: dict[str, tuple[int, float]] = {}  # request in flight -> (steps planned, expected end)
        # (w, h, cached, cfg) -> (fastest step s, decode s)
        self._fastest_cache: dict[tuple[int, int, bool, bool], tuple[float, float]] = {}
        # Device tuples used by some group so far: their communicators exist in the engine's cache.
        self.known_groups: set[tuple[int, ...]] = set()
        # device -> the LoRA adapter set fused into its weights (SchedRequest.adapters): that of the last
        # group planned on it, which the executor leaves in place. () : the plain model.
        self.held_adapters: dict[int, tuple] = {}

    # ---- request tracker -----------------------------------------------------------------------

    def add_request(self, request: SchedRequest) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request {request.request_id!r} is already scheduled")
        if request.num_steps < 1:
            raise ValueError(f"request {request.request_id!r}: num_steps must be >= 1")
        self.cost.check(request.width, request.height)  # ValueError naming the profiled range
        request.state = SchedState.WAITING
        self._requests[request.request_id] = request

    def abort(self, request_id: str) -> bool:
        """Forget a request. If it is in flight its devices stay busy until its group is reported.
        Returns False when the request is unknown (already finished or never added)."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if req.state is SchedState.RUNNING:
            self._aborted_in_flight.add(request_id)
        req.state = SchedState.ABORTED
        return True

    def get(self, request_id: str) -> SchedRequest | None:
        return self._requests.get(request_id)

    def requests(self) -> list[SchedRequest]:
        return list(self._requests.values())

    def has_work(self) -> bool:
        return bool(self._requests) or bool(self._in_flight)

    @property
    def queue_depth(self) -> int:
        return len(self._requests)

    @property
    def busy_devices(self) -> frozenset[int]:
        return frozenset(self._busy)

    def placement(self, request_id: str) -> tuple[int, ...]:
        req = self._requests.get(request_id)
        return req.device_ids if req else ()

    # ---- admission helpers ---------------------------------------------------------------------

    def min_finish_s(self, width: int, height: int, num_steps: int, now_s: float, include_encode: bool = True,
                     cached: bool = False, cfg: bool = False) -> float:
        """Earliest possible completion of a new request: alone, at its fastest degree on this
        machine, starting now (cached: with step caching, i.e. SchedRequest.cached; cfg: it may run
        CFG-parallel, SchedRequest.cfg, with a policy that uses that layout). A deadline before this
        cannot be met by any schedule."""
        step_s = self._fastest(width, height, cached, cfg and self.cfg_parallel)[0]
        t = now_s + num_steps * step_s + self._decode_bound_s(width, height)
        return t + (self.cost.encode_s() if include_encode else 0.0)

    def admission_check(self, width: int, height: int, num_steps: int, deadline_s: float, now_s: float,
                        cached: bool = False, cfg: bool = False,
                        pending: Sequence[SchedRequest] = ()) -> "Admission":
        """Would a request arriving now with this absolute deadline fit alongside the requests this
        policy protects, and `pending` (accepted, not added yet: their prompts are being encoded)? The
        base answer only checks the request alone (`min_finish_s`); `tetri` answers for the whole
        machine and estimates when it could fit (tetri.py)."""
        if self.min_finish_s(width, height, num_steps, now_s, cached=cached, cfg=cfg) > deadline_s + 1e-9:
            return Admission(False, None, "deadline_impossible")
        return Admission(True, None, "fits")

    def estimate(self, width: int, height: int, num_steps: int, deadline_s: float, now_s: float,
                 cached: bool = False, pending: Sequence[SchedRequest] = (), cfg: bool = False) -> Estimate:
        """If this request were taken now, when would it end and what would it cost the requests held?
        pending: requests already accepted but not added yet (their prompts are being encoded), counted
        as held. Pure and cheap: the cost model only. This base answer is a fluid first-come
        first-served model: the work held (each request's remaining steps at its cheapest degree, in
        device-seconds) spread over every device, then this one at its fastest degree; it delays none
        of the requests held, and costs its own work at its cheapest degree. `tetri` answers from its
        virtual schedule instead (tetri.py)."""
        alone = self.admission_check(width, height, num_steps, deadline_s, now_s, cached, cfg)
        held = [r for r in self._requests.values()] + list(pending)
        backlog_s = sum(self._cheapest_work_s(r) for r in held) / self.num_devices
        finish = self.min_finish_s(width, height, num_steps, now_s + backlog_s, cached=cached, cfg=cfg)
        own_s = self._cheapest_work_s(SchedRequest("", width, height, num_steps, now_s, deadline_s, cached, cfg=cfg))
        if not alone.fits:
            return Estimate(False, finish, own_s, 0.0, None, alone.reason)
        late_s = finish - deadline_s
        if late_s > 1e-9:  # it would fit once the backlog has drained by that much
            return Estimate(False, finish, own_s, 0.0, late_s, "busy")
        return Estimate(True, finish, own_s, 0.0, None, "fits")

    def _cheapest_work_s(self, r: SchedRequest) -> float:
        """Device-seconds of r's remaining steps at its cheapest degree, then its decode."""
        steps = r.remaining_steps
        return min(d * self.cost.step_s(r.width, r.height, d, cached=r.cached) for d in self.degrees) * steps \
            + self.cost.decode_s(r.width, r.height)

    def is_given_up(self, request_id: str) -> bool:
        """Has the policy given this request up (it still runs, best effort)? Only `tetri` gives up."""
        return False

    def candidate_groups(self) -> list[tuple[int, ...]]:
        """Every multi-device group this policy may ask for (to create communicators up front)."""
        return all_groups(self.num_devices, self.degrees)

    # ---- the two hot methods -------------------------------------------------------------------

    def schedule(self, now_s: float) -> RoundPlan:
        given_up = self._triage(now_s)
        idle = [d for d in range(self.num_devices) if d not in self._busy]
        ready = [r for r in self._requests.values() if r.state is SchedState.WAITING]
        if not idle or not ready:
            return RoundPlan(round_index=-1, start_s=now_s, given_up=given_up)
        if self.synchronous_rounds and self._in_flight:
            # Mid-round: only work that ends by the round's expected end may use idle devices.
            if now_s >= self._round_end_s - 1e-9:
                return RoundPlan(round_index=-1, start_s=now_s, given_up=given_up)
            specs = self._backfill(now_s, idle, ready, self._round_end_s)
            if not specs:
                return RoundPlan(-1, now_s, given_up=given_up)
            return self._commit(now_s, specs, idle, backfill=True, given_up=given_up)
        specs = self._plan(now_s, idle, ready)
        if not specs:
            return RoundPlan(round_index=-1, start_s=now_s, given_up=given_up)
        plan = self._commit(now_s, specs, idle, given_up=given_up)
        self._round_end_s = now_s + plan.expected_s
        return plan

    def update_from_output(self, plan: RoundPlan, result: RoundResult) -> list[SchedRequest]:
        """Apply what the executor did. Returns the requests that reached COMPLETED or FAILED
        (the policy forgets them); aborted requests are dropped silently."""
        entry = self._in_flight.get(plan.round_index)
        if entry is None or entry[0] is not plan:
            raise ValueError(f"round {plan.round_index} is not in flight")
        _, pending = entry
        failed = set(result.failed)
        finished: list[SchedRequest] = []
        for gi in sorted(pending):
            group = plan.groups[gi]
            if not all(rid in result.steps_done or rid in failed for rid in group.request_ids):
                continue  # not (fully) reported yet
            pending.discard(gi)
            for d in group.device_ids:
                self._busy.pop(d, None)
                self._free_at.pop(d, None)
            for rid in group.request_ids:
                self._flight.pop(rid, None)
                if rid in self._aborted_in_flight:
                    self._aborted_in_flight.discard(rid)
                    continue
                req = self._requests.get(rid)
                if req is None:
                    continue
                if rid in failed:
                    req.state = SchedState.FAILED
                    req.finish_s = result.end_s
                    req.error = req.error or "failed in the executor"
                    finished.append(self._requests.pop(rid))
                    continue
                n = int(result.steps_done[rid])
                if n < 0 or n > group.num_steps:
                    raise ValueError(f"{rid}: {n} steps done in a group of {group.num_steps} steps")
                req.steps_done += n
                if n:
                    req.steps_at_degree[group.degree] = req.steps_at_degree.get(group.degree, 0) + n
                req.device_ids = group.device_ids
                if req.remaining_steps <= 0:
                    req.state = SchedState.COMPLETED
                    req.finish_s = result.end_s
                    finished.append(self._requests.pop(rid))
                else:
                    req.state = SchedState.WAITING
        if not pending:
            del self._in_flight[plan.round_index]
        return finished

    # ---- for subclasses ------------------------------------------------------------------------

    def _plan(self, now_s: float, idle: list[int], ready: list[SchedRequest]) -> list[GroupSpec]:
        raise NotImplementedError

    def _triage(self, now_s: float) -> frozenset[str]:
        """Run at every schedule() call, before planning: ids of the requests given up now."""
        return frozenset()

    def _backfill(self, now_s: float, idle: list[int], ready: list[SchedRequest], round_end_s: float) -> list[GroupSpec]:
        """Round-synchronous policies: groups for devices idle mid-round that end by round_end_s."""
        return []

    def decode_plan(self, width: int, height: int, degree: int) -> tuple[int, float]:
        """(devices, seconds) of the decode a group of `degree` devices runs for a request it finishes."""
        if self.parallel_decode:
            return self.cost.group_decode(width, height, degree)
        return 1, self.cost.decode_s(width, height)

    def group_s(self, reqs: Sequence[SchedRequest], degree: int, num_steps: int, cfg: int = 1) -> float:
        """Expected seconds of a group: the batched steps (in the `cfg` layout), then a decode per
        request finishing. A batch is costed as cached only when all its requests cache (one uncached
        row runs every block)."""
        first = reqs[0]
        cached = all(r.cached for r in reqs)
        t = num_steps * self.cost.step_s(first.width, first.height, degree, len(reqs), cached=cached, cfg=cfg)
        for r in reqs:
            if num_steps >= r.remaining_steps:
                t += self.decode_plan(r.width, r.height, degree)[1]
        return t

    def switch_s(self, device_ids: Sequence[int], adapters: tuple) -> float:
        """Seconds a group on these devices first spends switching their LoRA adapter set to `adapters`
        (every device switches at once): cost.lora_switch_s when one of them holds another set, else 0."""
        if any(self.held_adapters.get(d, ()) != adapters for d in device_ids):
            return self.cost.lora_switch_s
        return 0.0

    def _commit(self, now_s: float, specs: list[GroupSpec], idle: list[int], backfill: bool = False,
                given_up: frozenset[str] = frozenset()) -> RoundPlan:
        idle_set = set(idle)
        used: set[int] = set()
        seen: set[str] = set()
        groups: list[GroupAssignment] = []
        moves: list[LatentMove] = []
        degrees: dict[str, int] = {}
        for spec in specs:
            devs = tuple(spec.device_ids)
            reqs = self._spec_requests(spec, idle_set, used, seen)
            used.update(devs)
            decode_after = any(spec.num_steps >= r.remaining_steps for r in reqs)
            decode_degree = self.decode_plan(reqs[0].width, reqs[0].height, len(devs))[0] if decode_after else 1
            expected_s = self.group_s(reqs, len(devs), spec.num_steps, spec.cfg) + self.switch_s(devs, reqs[0].adapters)
            group = GroupAssignment(devs, tuple(spec.request_ids), spec.num_steps, decode_after, expected_s,
                                    cfg=spec.cfg, decode_degree=decode_degree)
            self.held_adapters.update((d, reqs[0].adapters) for d in devs)
            groups.append(group)
            for d in devs:
                self._free_at[d] = now_s + group.expected_s
            for rid in spec.request_ids:
                self._flight[rid] = (spec.num_steps, now_s + group.expected_s)
            for r in reqs:
                degrees[r.request_id] = len(devs)
                if r.device_ids and r.device_ids != devs:
                    moves.append(LatentMove(r.request_id, r.device_ids, devs))
                    r.regroups += 1
                r.state = SchedState.RUNNING
                r.rounds += 1
            if len(devs) > 1:
                self.known_groups.add(devs)
        late = frozenset(rid for rid in seen if self._is_late(self._requests[rid], now_s))
        plan = RoundPlan(
            round_index=self._next_round,
            start_s=now_s,
            groups=tuple(groups),
            moves=tuple(moves),
            expected_s=max(g.expected_s for g in groups),
            degrees=MappingProxyType(degrees),
            late=late,
            backfill=backfill,
            given_up=given_up,
        )
        self._next_round += 1
        self._in_flight[plan.round_index] = (plan, set(range(len(groups))))
        for d in used:
            self._busy[d] = plan.round_index
        return plan

    def _spec_requests(self, spec: GroupSpec, idle_set: set[int], used: set[int], seen: set[str]) -> list[SchedRequest]:
        """The requests of a policy's GroupSpec, checked (a policy bug raises instead of corrupting a run):
        free devices, a profiled degree, requests waiting and planned once, one batch_key (shape and adapter
        set), steps they have left, a cfg layout they can run. Adds them to `seen`."""
        devs = tuple(spec.device_ids)
        if not devs or not idle_set.issuperset(devs) or used.intersection(devs) or len(set(devs)) != len(devs):
            raise RuntimeError(f"{self.name}: group on devices {devs} is not free (idle {sorted(idle_set - used)})")
        if len(devs) not in self.degrees:
            raise RuntimeError(f"{self.name}: degree {len(devs)} is not profiled ({self.degrees})")
        reqs = []
        for rid in spec.request_ids:
            req = self._requests.get(rid)
            if req is None or req.state is not SchedState.WAITING or rid in seen:
                raise RuntimeError(f"{self.name}: request {rid!r} cannot be planned")
            reqs.append(req)
            seen.add(rid)
        if len({r.batch_key for r in reqs}) != 1:
            raise RuntimeError(f"{self.name}: a batched group must have one resolution and one adapter set")
        if not 1 <= spec.num_steps <= min(r.remaining_steps for r in reqs):
            raise RuntimeError(f"{self.name}: {spec.num_steps} steps for {spec.request_ids}")
        if spec.cfg != 1 and (spec.cfg != 2 or len(devs) % 2 or not all(r.cfg for r in reqs)):
            raise RuntimeError(f"{self.name}: cfg {spec.cfg} on {len(devs)} devices for {spec.request_ids}")
        return reqs

    def _is_late(self, req: SchedRequest, now_s: float) -> bool:
        """Cannot make its deadline any more, even at the fastest degree from now."""
        if req.deadline_s is None:
            return False
        step_s, decode_s = self._fastest(req.width, req.height, req.cached, req.cfg and self.cfg_parallel)
        return now_s + req.remaining_steps * step_s + decode_s > req.deadline + 1e-9

    def _fastest(self, width: int, height: int, cached: bool, cfg: bool) -> tuple[float, float]:
        """(fastest step s, fastest decode s) of a request alone on this machine, with this policy."""
        key = (width, height, cached, cfg)
        bound = self._fastest_cache.get(key)
        if bound is None:
            bound = (self.cost.fastest_step(width, height, self.max_degree, cached, cfg)[1],
                     self._decode_bound_s(width, height))
            self._fastest_cache[key] = bound
        return bound

    def _decode_bound_s(self, width: int, height: int) -> float:
        return self.decode_plan(width, height, self.max_degree)[1]


def steps_in(seconds: float, step_s: float) -> int:
    """Whole steps that fit in `seconds` (at least one: a round always makes progress)."""
    return max(1, int(math.floor(seconds / step_s + 1e-9)))
