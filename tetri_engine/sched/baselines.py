"""Baseline policies behind the same interface as TetriServe, for comparison on the same trace.

- `FixedSPPolicy` (names "fixed1", "fixed2", ...): what xDiT does. The devices are cut once into
  static groups of k (0..k-1, k..2k-1, ...); each request runs all its steps on one group, first
  come first served, non-preemptive.
- `EDFPolicy` ("edf1", "edf2", ...): the same static groups, but the waiting request with the
  earliest deadline goes next (still non-preemptive).
- `RSSPPolicy` ("rssp"): resolution-specific static parallelism. Each resolution gets one degree,
  chosen from the profile: the smallest degree whose isolated service time meets the resolution's
  default SLO at scale 1.0 (slo.slo_s), else the fastest degree (the paper's oracle picked SP=1
  for 256^2/512^2, 2 for 1024^2, 8 for 2048^2 on 8xH100); a request with step caching
  (SchedRequest.cached) is costed at the cached step time, so it may get a smaller degree.
  FCFS, non-preemptive, on aligned groups;
  the head of the queue waits for its group (no overtaking, so wide requests are not starved).

- `SRPTPolicy` ("srpt"): a reference for how low tail latency can go, not a contender for SAR:
  deadline-blind, preemptive at group boundaries, shortest remaining work first (remaining steps x
  the degree-1 step time). Each request in that order gets one device; devices left over double the
  degree of the shortest requests whose step gets faster. Groups run ~round_s of steps.

All are event driven (not round synchronous): whenever a group of devices frees up, the next
request starts on it at once.
"""
from __future__ import annotations

from tetri_engine.sched.cost import CostModel
from tetri_engine.sched.placement import aligned_blocks
from tetri_engine.sched.plan import SchedRequest
from tetri_engine.sched.placement import place
from tetri_engine.sched.policy import GroupSpec, Policy, steps_in
from tetri_engine.sched.slo import slo_s


class FixedSPPolicy(Policy):
    """Static groups of `degree` devices, FCFS, each request runs to completion on its group."""

    uses_deadlines = False

    def __init__(self, num_devices: int, cost: CostModel, degree: int, **kwargs):
        super().__init__(num_devices, cost, **kwargs)
        if degree > num_devices:
            raise ValueError(f"fixed degree {degree} needs at least {degree} devices (have {num_devices})")
        if degree not in self.degrees:
            raise ValueError(f"degree {degree} is not in profile {cost.name} (degrees {cost.degrees})")
        self.degree = degree
        self.name = f"fixed{degree}"
        self.groups = aligned_blocks(num_devices, degree)

    def _order(self, ready: list[SchedRequest]) -> list[SchedRequest]:
        return ready  # arrival order

    def _plan(self, now_s: float, idle: list[int], ready: list[SchedRequest]) -> list[GroupSpec]:
        free = set(idle)
        queue = self._order(ready)
        specs: list[GroupSpec] = []
        qi = 0
        for block in self.groups:
            if qi >= len(queue):
                break
            if free.issuperset(block):
                req = queue[qi]
                qi += 1
                specs.append(GroupSpec(block, (req.request_id,), req.remaining_steps))
        return specs


class EDFPolicy(FixedSPPolicy):
    """Fixed degree, earliest deadline first, non-preemptive."""

    uses_deadlines = True

    def __init__(self, num_devices: int, cost: CostModel, degree: int, **kwargs):
        super().__init__(num_devices, cost, degree, **kwargs)
        self.name = f"edf{degree}"

    def _order(self, ready: list[SchedRequest]) -> list[SchedRequest]:
        return sorted(ready, key=lambda r: (r.deadline, r.arrival_s))


class RSSPPolicy(Policy):
    """One static degree per resolution (chosen from the profile), FCFS, non-preemptive."""

    name = "rssp"
    uses_deadlines = False  # (degrees come from the SLO table at scale 1.0, not from requests' deadlines)

    def __init__(self, num_devices: int, cost: CostModel, degree_by_size: dict[tuple[int, int], int] | None = None,
                 **kwargs):
        super().__init__(num_devices, cost, **kwargs)
        self._degree_by_size: dict[tuple, int] = {}  # (w, h, -1) fixed, or (w, h, steps, cached)
        for (w, h), d in (degree_by_size or {}).items():
            if d not in self.degrees:
                raise ValueError(f"rssp degree {d} for {w}x{h} is not usable ({self.degrees})")
            self._degree_by_size[(w, h, -1)] = d

    def degree_for(self, width: int, height: int, num_steps: int, cached: bool = False) -> int:
        fixed = self._degree_by_size.get((width, height, -1))
        if fixed is not None:
            return fixed
        key = (width, height, num_steps, cached)
        if key not in self._degree_by_size:
            target = slo_s(width, height, num_steps, self.cost, 1.0, self.max_degree)
            decode = self.cost.decode_s(width, height)
            chosen = self.cost.fastest_step(width, height, self.max_degree, cached)[0]
            for d in self.degrees:  # ascending: the cheapest degree that meets the SLO alone
                if num_steps * self.cost.step_s(width, height, d, cached=cached) + decode <= target:
                    chosen = d
                    break
            self._degree_by_size[key] = chosen
        return self._degree_by_size[key]

    def _plan(self, now_s: float, idle: list[int], ready: list[SchedRequest]) -> list[GroupSpec]:
        free = set(idle)
        specs: list[GroupSpec] = []
        for req in ready:  # arrival order; the head blocks the queue until its group is free
            degree = self.degree_for(req.width, req.height, req.num_steps, req.cached)
            block = next((b for b in aligned_blocks(self.num_devices, degree) if free.issuperset(b)), None)
            if block is None:
                break
            free.difference_update(block)
            specs.append(GroupSpec(block, (req.request_id,), req.remaining_steps))
        return specs


class SRPTPolicy(Policy):
    """Shortest remaining work first, deadline-blind, preemptive between groups (tail reference)."""

    name = "srpt"
    uses_deadlines = False

    def _plan(self, now_s: float, idle: list[int], ready: list[SchedRequest]) -> list[GroupSpec]:
        step = {}
        for r in ready:
            step[r.request_id] = {d: self.cost.step_s(r.width, r.height, d, cached=r.cached) for d in self.degrees}
        order = sorted(ready, key=lambda r: (r.remaining_steps * step[r.request_id][1], r.arrival_s))[:len(idle)]
        degree = {r.request_id: 1 for r in order}
        free = len(idle) - len(order)
        for r in order:  # shortest first: double while it helps and devices are left
            d, t = 1, step[r.request_id]
            while 2 * d in t and d <= free and t[2 * d] < 0.95 * t[d]:
                free -= d
                d *= 2
            degree[r.request_id] = d
        placed = place([(r.request_id, degree[r.request_id], r.device_ids) for r in order], idle,
                       self.num_devices, self.known_groups)
        specs = []
        for r in order:
            devs = placed.get(r.request_id)
            if devs is not None:
                q = min(r.remaining_steps, steps_in(self.round_s, step[r.request_id][len(devs)]))
                specs.append(GroupSpec(devs, (r.request_id,), q))
        return specs
