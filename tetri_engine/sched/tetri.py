"""TetriServe: round-based, deadline-aware packing with step-level sequence parallelism.

Each round (length tau, about `round_steps` steps of a typical request) starting at `now`, with
t_next = now + tau, over the devices and requests that are free:

1. Allocation. For each request, the cheapest plan in GPU-seconds (sum of degree x step time) that
   still finishes (decode included) by its deadline: `allocate()`. The time/GPU-seconds trade-off of
   the degrees of one resolution is a convex curve, so the optimum uses one degree, or two adjacent
   degrees on the curve's lower hull (LP with two constraints), e.g. "20 steps at 1, 30 at 2".
   The cheap segment runs first. Requests that cannot finish even at the fastest degree are *late*.
2. Packing (group knapsack, knapsack.py). Options per on-time request: none; its first segment's
   degree; the second segment's degree. Running q = min(steps left in that segment, steps fitting
   in tau) steps. Value, lexicographically: survival (1 when, after the option, the request can
   still meet its deadline: deferred requests resume at t_next), then GPU-seconds saved compared
   with not running this round (deferring makes the rest of a tight request's plan more parallel,
   hence dearer), then earliest deadline.
3. Placement preservation (placement.py): aligned groups, keep latents where they are, reuse
   communicators.
4. Work-conserving elastic scale-up: devices still idle go to on-time requests not yet running
   (earliest deadline first), then double the degree of running groups whose step time drops,
   biggest time saving per added device first.
5. Late requests get one device each, best effort, from what is left after 1-4.
6. Selective batching: when on-time requests want more devices than are free, identical
   resolutions whose first segment is degree 1 and whose profile has batch sizes > 1 are merged
   into one batched forward, but only if every member can still meet its deadline at the batched
   step time.

Rounds are synchronous: the next round is planned when every group of this one has finished. So
that short groups do not idle while the longest one runs, each group's step count is then raised to
fill the round's length (never past the request's end, decode included).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tetri_engine.sched.cost import CostModel
from tetri_engine.sched.knapsack import group_knapsack
from tetri_engine.sched.placement import place
from tetri_engine.sched.plan import SchedRequest
from tetri_engine.sched.policy import GroupSpec, Policy, steps_in

@dataclass(frozen=True)
class HullPoint:
    degree: int
    step_s: float
    gpu_s: float  # degree x step_s: GPU-seconds per step


@dataclass
class _Item:
    """One knapsack item: a request, or a batch of same-shape requests."""

    members: list[SchedRequest]
    options: list[tuple[int, float]]  # (width, value); index 0 is "none"
    steps: list[int]  # steps run by each option (0 for none)
    batch: int = 1
    savings: list[float] = field(default_factory=list)  # GPU-seconds saved per option vs "none"


class TetriPolicy(Policy):
    name = "tetri"
    synchronous_rounds = True

    def __init__(self, num_devices: int, cost: CostModel, *, round_steps: int = 5, round_s: float | None = None,
                 batching: bool = True, scale_up: bool = True, fill_rounds: bool = True):
        super().__init__(num_devices, cost, round_steps=round_steps, round_s=round_s)
        self.batching = batching
        self.scale_up = scale_up
        self.fill_rounds = fill_rounds
        self._hulls: dict[tuple[int, int], list[HullPoint]] = {}
        self._fast: dict[tuple[int, int], float] = {}

    # ---- 1. allocation -------------------------------------------------------------------------

    def hull(self, width: int, height: int) -> list[HullPoint]:
        """Degrees worth using for this resolution, cheapest (slowest) first: the lower convex hull
        of (step time, GPU-seconds per step). Dominated degrees (slower and dearer) are dropped."""
        key = (width, height)
        pts = self._hulls.get(key)
        if pts is not None:
            return pts
        cand = sorted((HullPoint(d, s, d * s) for d in self.degrees
                       for s in [self.cost.step_s(width, height, d)]), key=lambda p: (p.gpu_s, p.step_s))
        pareto: list[HullPoint] = []
        for p in cand:  # cheapest first; keep only points faster than everything cheaper
            if not pareto or p.step_s < pareto[-1].step_s:
                pareto.append(p)
        hull: list[HullPoint] = []
        for p in pareto:  # lower convex hull, step time decreasing
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # b lies on or above the chord a-p: mixing a and p is never worse than using b.
                cross = (b.step_s - a.step_s) * (p.gpu_s - a.gpu_s) - (b.gpu_s - a.gpu_s) * (p.step_s - a.step_s)
                if cross >= 0:
                    hull.pop()
                else:
                    break
            hull.append(p)
        self._hulls[key] = hull
        self._fast[key] = hull[-1].step_s
        return hull

    def fastest_step_s(self, width: int, height: int) -> float:
        key = (width, height)
        if key not in self._fast:
            self.hull(width, height)
        return self._fast[key]

    def allocate(self, width: int, height: int, steps: int, budget_s: float) -> tuple[float, list[tuple[int, int]]] | None:
        """Cheapest plan running `steps` steps within budget_s seconds: (GPU-seconds,
        [(degree, steps), ...] cheapest segment first), or None when even the fastest is too slow."""
        if steps <= 0:
            return (0.0, []) if budget_s >= -1e-9 else None
        hull = self.hull(width, height)
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

    # ---- a round -------------------------------------------------------------------------------

    def _plan(self, now_s: float, idle: list[int], ready: list[SchedRequest]) -> list[GroupSpec]:
        tau = self.round_s
        t_next = now_s + tau
        capacity = len(idle)
        cost = self.cost

        on_time: list[SchedRequest] = []
        late: list[SchedRequest] = []
        for r in ready:
            if self._late(r, now_s):
                late.append(r)
            else:
                on_time.append(r)
        on_time.sort(key=lambda r: (r.deadline, r.arrival_s))

        # 1 + 2: options per request, then the knapsack.
        items = [self._item([r], now_s, t_next) for r in on_time]
        demand = sum(max(w for w, _ in it.options) for it in items)
        if self.batching and demand > capacity:
            items = self._batch_items(items, now_s, t_next)
        self._normalise(items)
        chosen: list[tuple[_Item, int, int]] = []  # (item, degree, steps)
        if items:
            _, picks = group_knapsack([it.options for it in items], capacity)
            for it, j in zip(items, picks):
                if j > 0:
                    chosen.append((it, it.options[j][0], it.steps[j]))
        used = sum(d for _, d, _ in chosen)
        running = {id(it) for it, _, _ in chosen}

        # 4a. Work conservation: on-time requests the knapsack left out, cheapest option that fits.
        for it in items:
            if used >= capacity:
                break
            if id(it) in running:
                continue
            fits = [j for j in range(1, len(it.options)) if it.options[j][0] <= capacity - used]
            if fits:
                j = min(fits, key=lambda j: it.options[j][0])
                chosen.append((it, it.options[j][0], it.steps[j]))
                running.add(id(it))
                used += it.options[j][0]

        # 4b. Elastic scale-up: double running single-request groups, biggest saving per device first.
        if self.scale_up:
            while used < capacity:
                best = None
                for idx, (it, d, _) in enumerate(chosen):
                    if it.batch > 1 or 2 * d > self.max_degree or d > capacity - used or 2 * d not in self.degrees:
                        continue
                    r = it.members[0]
                    t_d = cost.step_s(r.width, r.height, d)
                    t_2d = cost.step_s(r.width, r.height, 2 * d)
                    if t_2d >= 0.95 * t_d:
                        continue  # not worth the devices (or slower)
                    saving = r.remaining_steps * (t_d - t_2d) / d
                    if best is None or saving > best[0]:
                        best = (saving, idx)
                if best is None:
                    break
                idx = best[1]
                it, d, _ = chosen[idx]
                r = it.members[0]
                q = min(r.remaining_steps, steps_in(tau, cost.step_s(r.width, r.height, 2 * d)))
                chosen[idx] = (it, 2 * d, q)
                used += d

        # 5. Late requests: one device each, least remaining work first, with what is left.
        late.sort(key=lambda r: (r.remaining_steps * cost.step_s(r.width, r.height, 1), r.deadline, r.arrival_s))
        for r in late:
            if used >= capacity:
                break
            it = _Item([r], [(0, 0.0)], [0])
            chosen.append((it, 1, min(r.remaining_steps, steps_in(tau, cost.step_s(r.width, r.height, 1)))))
            used += 1

        if not chosen:
            return []

        # 3. Placement.
        keys = list(range(len(chosen)))
        placed = place([(k, chosen[k][1], chosen[k][0].members[0].device_ids) for k in keys],
                       idle, self.num_devices, self.known_groups)
        specs = []
        for k in keys:
            devs = placed.get(k)
            if devs is None:
                continue  # cannot happen with power-of-two degrees; the request simply waits
            it, _, q = chosen[k]
            specs.append(GroupSpec(devs, tuple(r.request_id for r in it.members), q))
        if self.fill_rounds:
            specs = self._fill(specs)
        return specs

    def _late(self, r: SchedRequest, now_s: float) -> bool:
        if r.deadline_s is None:
            return False
        fast = self.fastest_step_s(r.width, r.height)
        return now_s + r.remaining_steps * fast + self.cost.decode_s(r.width, r.height) > r.deadline + 1e-9

    def _survives(self, r: SchedRequest, steps: int, end_s: float, t_next: float) -> tuple[bool, float]:
        """After running `steps` more steps ending at end_s: can r still meet its deadline, and the
        GPU-seconds of the cheapest plan for its remaining steps (resuming at the next round)."""
        rest = r.remaining_steps - steps
        decode = self.cost.decode_s(r.width, r.height)
        if rest <= 0:
            return end_s + decode <= r.deadline + 1e-9, 0.0
        plan = self.allocate(r.width, r.height, rest, r.deadline - max(end_s, t_next) - decode)
        if plan is None:
            return False, rest * self.hull(r.width, r.height)[-1].gpu_s
        return True, plan[0]

    def _item(self, members: list[SchedRequest], now_s: float, t_next: float, batch_step_s: float | None = None) -> _Item:
        """Knapsack options of one request (or of a batch, run at degree 1 with batch_step_s)."""
        r0 = members[0]
        w, h = r0.width, r0.height
        tau = self.round_s
        # "none": resume at the next round.
        sv_none = 0
        cost_none = 0.0
        for r in members:
            ok, c = self._survives(r, 0, t_next, t_next)
            sv_none += ok
            cost_none += c
        options: list[tuple[int, float]] = [(0, float(sv_none))]
        steps_of: list[int] = [0]
        savings: list[float] = [0.0]
        if batch_step_s is not None:
            candidates = [(1, batch_step_s, min(min(r.remaining_steps for r in members), steps_in(tau, batch_step_s)))]
        else:
            plan = self.allocate(w, h, r0.remaining_steps, r0.deadline - now_s - self.cost.decode_s(w, h))
            segs = plan[1] if plan else [(self.hull(w, h)[-1].degree, r0.remaining_steps)]
            candidates = []
            for i, (d, n) in enumerate(segs):
                if d > self.max_degree:
                    continue
                t = self.cost.step_s(w, h, d)
                q = steps_in(tau, t)
                q = min(q, n) if i == 0 and len(segs) > 1 else min(q, r0.remaining_steps)
                candidates.append((d, t, q))
        for d, t, q in candidates:
            end = now_s + q * t
            sv = 0
            spent = 0.0
            for r in members:
                ok, c = self._survives(r, q, end, t_next)
                sv += ok
                spent += c + q * t * d / len(members)
            options.append((d, float(sv)))
            steps_of.append(q)
            savings.append(cost_none - spent)
        return _Item(members, options, steps_of, len(members) if batch_step_s is not None else 1, savings)

    def _normalise(self, items: list[_Item]) -> None:
        """Fold the tie-breaks into the option values, each level too small to outweigh the one
        above it: survival counts 1 each; GPU-seconds saved share 0.5 in total; earliest deadline
        (items are in deadline order) and 'run rather than idle' share 0.01."""
        total = sum(max(abs(s) for s in it.savings) for it in items) or 1.0
        n = len(items)
        for rank, it in enumerate(items):
            edf = 0.01 * (n - rank) / (n * (n + 1) / 2 + 1)
            it.options = [
                (width, value + (0.5 * it.savings[j] / total if j else 0.0) + (edf if j else 0.0))
                for j, (width, value) in enumerate(it.options)
            ]

    # ---- 6. selective batching -----------------------------------------------------------------

    def _batch_items(self, items: list[_Item], now_s: float, t_next: float) -> list[_Item]:
        by_shape: dict[tuple[int, int], list[_Item]] = {}
        for it in items:
            r = it.members[0]
            first_degree = it.options[1][0] if len(it.options) > 1 else 0
            if first_degree == 1 and self.cost.max_batch(r.width, r.height, 1) > 1:
                by_shape.setdefault((r.width, r.height), []).append(it)
        if not by_shape:
            return items
        replaced: set[int] = set()
        batches: list[_Item] = []
        for (w, h), group in by_shape.items():
            sizes = [b for b in self.cost.batch_sizes(w, h, 1) if b > 1]
            pool = list(group)  # deadline order
            while len(pool) >= 2:
                fits = [b for b in sizes if b <= len(pool)]
                if not fits:
                    break
                made = None
                for b in sorted(fits, reverse=True):
                    members = [it.members[0] for it in pool[:b]]
                    candidate = self._item(members, now_s, t_next, self.cost.step_s(w, h, 1, b))
                    # Batch only if no member loses its deadline by being batched.
                    if candidate.options[1][1] >= len(members):
                        made = (b, candidate)
                        break
                if made is None:
                    break
                b, candidate = made
                batches.append(candidate)
                replaced.update(id(it) for it in pool[:b])
                pool = pool[b:]
        if not batches:
            return items
        out = [it for it in items if id(it) not in replaced] + batches
        out.sort(key=lambda it: min((m.deadline, m.arrival_s) for m in it.members))
        return out

    # ---- round fill ----------------------------------------------------------------------------

    def _fill(self, specs: list[GroupSpec]) -> list[GroupSpec]:
        """Raise each group's step count to use the round's full length (the longest group)."""
        reqs = self._requests
        length = max(self.group_s([reqs[rid] for rid in s.request_ids], len(s.device_ids), s.num_steps)
                     for s in specs)
        out = []
        for s in specs:
            members = [reqs[rid] for rid in s.request_ids]
            r0 = members[0]
            t = self.cost.step_s(r0.width, r0.height, len(s.device_ids), len(members))
            remaining = min(r.remaining_steps for r in members)
            q = max(s.num_steps, min(remaining, int(math.floor(length / t + 1e-9))))
            if q >= remaining and self.group_s(members, len(s.device_ids), remaining) > length + 1e-9:
                q = max(s.num_steps, remaining - 1)  # finishing would outlast the round; finish next one
            out.append(GroupSpec(s.device_ids, s.request_ids, q))
        return out
