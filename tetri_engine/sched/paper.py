"""tetri-paper: the paper-faithful TetriServe policy (round-based, deadline-aware packing with
step-level sequence parallelism), kept unchanged as the reference for `tetri` (tetri.py). Each round (length tau, about `round_steps` steps of a typical request) starting at `now`, over
the devices and requests that are free:

1. Allocation. For each request, the cheapest plan in GPU-seconds (sum of degree x step time) that
   still finishes (decode included) by its deadline: `allocate()`. The time/GPU-seconds trade-off of
   the degrees of one resolution is a convex curve, so the optimum uses one degree, or two adjacent
   degrees on the curve's lower hull (an LP with two constraints), e.g. "20 steps at 1, 30 at 2".
   The cheap segment runs first. Requests that cannot finish even at the fastest degree are *late*.
2. Packing (group knapsack, knapsack.py). Options per on-time request: none; its first segment's
   degree; its second segment's degree; each runs q = min(steps left in that segment, steps that
   fit in tau) steps. Value, lexicographically: survival (1 when, after the option, the request can
   still meet its deadline at the fastest degree, resuming tau later), then GPU-seconds saved
   compared with not running this round (deferring makes the rest of a tight plan more parallel,
   hence dearer), then earliest deadline. So that a round's work does not grow with the queue, the
   knapsack sees at most 2 items per free device: the requests that cannot wait a round, then the
   earliest deadlines and the tightest plans (CANDIDATES_PER_DEVICE).
3. Placement preservation (placement.py): aligned groups, latents stay where they are, existing
   communicators are reused.
4. Work-conserving elastic scale-up: devices still idle go to on-time requests not yet running
   (earliest deadline first), then double the degree of running groups whose step time drops by
   5% or more, biggest time saving per added device first.
5. Late requests get one device each, best effort, least remaining work first, from what is left
   after 1-4.
6. Selective batching: when on-time requests want more devices than are free, identical
   resolutions whose plan starts at degree 1 and whose profile has batch sizes > 1 are merged into
   one batched forward, only if every member can still meet its deadline at the batched step time.

Step caching: a request with `SchedRequest.cached` is costed at the cached step time everywhere
above, and only batched with requests of the same `cached`; without a measured cache_step_factor
(1.0) the flag is ignored. Rounds are synchronous: the next round is planned when every group of
this one has finished; its length is chosen within [0.8, 1.25] x tau to leave the fewest
device-seconds idle (`_fill`, round_fill.py). Devices that fall idle mid-round are backfilled with
work that ends by the round's expected end (`_backfill`), e.g. a request that just arrived.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Iterator

from tetri_engine.sched.allocation import HullPoint, allocate as _allocate, lower_hull as _lower_hull
from tetri_engine.sched.cost import CostModel
from tetri_engine.sched.knapsack import group_knapsack
from tetri_engine.sched.placement import place
from tetri_engine.sched.round_fill import fill_round
from tetri_engine.sched.plan import SchedRequest
from tetri_engine.sched.policy import GroupSpec, Policy, steps_in


# A round's length is chosen in [ROUND_MIN, ROUND_MAX] x tau to waste the least device time (_fill).
ROUND_MIN = 0.8
ROUND_MAX = 1.25
FINE_STEP = 0.1  # groups whose step is shorter than this x tau do not propose round lengths
# When a request left out of a round can run again: the nominal round length. (The worst case,
# ROUND_MAX x tau, is safer on paper but scored lower on the tuning traces, seeds 1-2; the reported
# results use seed 0.)
RESUME_AFTER = 1.0
# Knapsack items per free device (bounds the DP and the per-request work whatever the queue length).
CANDIDATES_PER_DEVICE = 2


@dataclass
class _Item:
    """One knapsack item: a request, or a batch of same-shape requests."""

    members: list[SchedRequest]
    options: list[tuple[int, float]]  # (width, value); index 0 is "none"
    steps: list[int]  # steps run by each option (0 for none)
    batch: int = 1
    savings: list[float] = field(default_factory=list)  # GPU-seconds saved per option vs "none"


@dataclass(frozen=True)
class _Res:
    """What a round needs to know about one resolution, computed once per resolution."""

    step_s: dict[int, float]  # degree -> seconds per step (batch 1)
    hull: list[HullPoint]  # cheapest first
    fast_s: float  # fastest step on this machine
    decode_s: float
    batch_step_s: dict[int, float]  # batch size (> 1) -> seconds per batched step at degree 1
    round_steps: dict[int, int]  # degree -> steps that fit in one round (at least 1)
    round_steps_batched: dict[int, int]  # batch size -> steps that fit in one round at degree 1


class PaperTetriPolicy(Policy):
    name = "tetri-paper"
    synchronous_rounds = True

    def __init__(self, num_devices: int, cost: CostModel, *, round_steps: int = 5, round_s: float | None = None,
                 batching: bool = True, scale_up: bool = True, fill_rounds: bool = True, backfill: bool = True):
        super().__init__(num_devices, cost, round_steps=round_steps, round_s=round_s)
        # Switches for ablations (bench/sim_ablation.py); all on by default.
        self.batching = batching
        self.scale_up = scale_up
        self.fill_rounds = fill_rounds
        self.backfill = backfill
        self._res_cache: dict[tuple[int, int, bool], _Res] = {}  # (width, height, cached) -> _Res
        # Cached and uncached requests cost differently only with a measured factor; with none (1.0)
        # they share one table and may batch together, so plans are exactly those without caching.
        self._cache_differs = cost.cache_step_factor != 1.0

    # ---- 1. allocation -------------------------------------------------------------------------

    def _res(self, width: int, height: int, cached: bool = False) -> _Res:
        """Per-resolution step times, of requests with step caching when cached (SchedRequest.cached)."""
        cached = cached and self._cache_differs
        info = self._res_cache.get((width, height, cached))
        if info is None:
            step = {d: self.cost.step_s(width, height, d, cached=cached) for d in self.degrees}
            batches = {b: self.cost.step_s(width, height, 1, b, cached=cached)
                       for b in self.cost.batch_sizes(width, height, 1) if b > 1}
            hull = _lower_hull([HullPoint(d, t, d * t) for d, t in step.items()])
            info = _Res(step, hull, hull[-1].step_s, self.cost.decode_s(width, height), batches,
                        {d: steps_in(self.round_s, t) for d, t in step.items()},
                        {b: steps_in(self.round_s, t) for b, t in batches.items()})
            self._res_cache[(width, height, cached)] = info
        return info

    def _res_of(self, r: SchedRequest) -> _Res:
        return self._res(r.width, r.height, r.cached)

    def _shape(self, r: SchedRequest) -> tuple[int, int, bool]:
        """What identifies r's step times: (width, height, cached), the key of _res_cache."""
        return (r.width, r.height, r.cached and self._cache_differs)

    def hull(self, width: int, height: int, cached: bool = False) -> list[HullPoint]:
        """Degrees worth using for this resolution, cheapest (slowest) first: the lower convex hull
        of (step time, GPU-seconds per step). Dominated degrees (slower and dearer) are dropped."""
        return self._res(width, height, cached).hull

    def allocate(self, width: int, height: int, steps: int, budget_s: float,
                 cached: bool = False) -> tuple[float, list[tuple[int, int]]] | None:
        """Cheapest plan running `steps` steps within budget_s seconds: (GPU-seconds,
        [(degree, steps), ...] cheapest segment first), or None when even the fastest is too slow."""
        return _allocate(self._res(width, height, cached).hull, steps, budget_s)

    # ---- a round -------------------------------------------------------------------------------

    def _plan(self, now_s: float, idle: list[int], ready: list[SchedRequest]) -> list[GroupSpec]:
        """One round, phase by phase in the order they run (numbers as in the module docstring)."""
        t_next = now_s + RESUME_AFTER * self.round_s  # when a request left out now can run again, at the latest
        capacity = len(idle)
        late, critical, waitable, tightness = self._classify(ready, now_s, t_next)
        candidates, spare = self._knapsack_candidates(critical, waitable, tightness, capacity, now_s)
        items, spare, chosen = self._pack(candidates, spare, capacity, now_s, t_next)  # 1, 2 and 6
        self._conserve_work(items, spare, chosen, capacity, now_s, t_next)  # 4a
        if self.scale_up:
            self._scale_up(chosen, capacity)  # 4b
        self._run_late(late, chosen, capacity)  # 5
        return self._place(chosen, idle)  # 3, then the round's length

    def _classify(self, ready: list[SchedRequest], now_s: float, t_next: float) -> tuple[list, list, list, list]:
        """Late / cannot wait a round / can wait, from the fastest-degree lower bound. Entries are
        (deadline, arrival, index, request) tuples: they sort in deadline order without a key."""
        late: list[SchedRequest] = []
        critical: list[tuple[float, float, int, SchedRequest]] = []
        waitable: list[tuple[float, float, int, SchedRequest]] = []
        tightness: list[tuple[float, int]] = []  # (time its cheapest degree needs / time left, index in waitable)
        res_cache = self._res_cache
        differs = self._cache_differs
        for i, r in enumerate(ready):
            info = res_cache.get((r.width, r.height, r.cached and differs)) or self._res_of(r)
            deadline = math.inf if r.deadline_s is None else r.deadline_s
            steps = r.num_steps - r.steps_done
            fastest = steps * info.fast_s + info.decode_s
            if now_s + fastest > deadline + 1e-9:
                late.append(r)
            elif t_next + fastest > deadline + 1e-9:
                critical.append((deadline, r.arrival_s, i, r))
            else:
                tightness.append((steps * info.hull[0].step_s / (deadline - now_s - info.decode_s), len(waitable)))
                waitable.append((deadline, r.arrival_s, i, r))
        return late, critical, waitable, tightness

    def _knapsack_candidates(self, critical: list, waitable: list, tightness: list, capacity: int,
                             now_s: float) -> tuple[list[SchedRequest], list[tuple]]:
        """At most `capacity` requests can run, so a few per device are enough: the requests that
        cannot wait (the only ones whose survival depends on this round; when there are more than
        capacity, those whose plan starts narrowest, since saving the most requests means running the
        narrow ones), the earliest deadlines, and the tightest plans (where waiting costs
        GPU-seconds), half and half. The DP sees at most 2 x capacity items whatever the queue
        length; the rest (`spare`) wait, or fill leftover devices in step 4a."""
        max_critical = max(1, (CANDIDATES_PER_DEVICE - 1) * capacity)
        if len(critical) > max_critical:
            critical.sort(key=lambda e: (self._first_degree(e[3], now_s),) + e[:3])
            for e in critical[max_critical:]:  # still on time: may fill leftover devices
                tightness.append((math.inf, len(waitable)))
                waitable.append(e)
            critical = critical[:max_critical]
        room = max(capacity // 2, CANDIDATES_PER_DEVICE * capacity - len(critical))
        picked = {e[2] for e in heapq.nsmallest((room + 1) // 2, waitable)}
        picked.update(waitable[j][2] for _, j in heapq.nlargest(room // 2, tightness))
        candidates = [e[3] for e in sorted(critical + [e for e in waitable if e[2] in picked])]
        spare = [e for e in waitable if e[2] not in picked]  # unordered (deadline, arrival, index, request)
        return candidates, spare

    def _pack(self, candidates: list[SchedRequest], spare: list[tuple], capacity: int, now_s: float,
              t_next: float) -> tuple[list[_Item], list[tuple], list[tuple[_Item, int, int]]]:
        """1 + 2 (+ 6): options per request (and batches), then the knapsack. Returns the items, the
        spare entries left after batching, and what runs: [(item, degree, steps)]."""
        items = [self._item([r], now_s, t_next) for r in candidates]
        if self.batching and (spare or sum(max(w for w, _ in it.options) for it in items) > capacity):
            items, spare = self._batch_items(items, spare, capacity, now_s, t_next)
        self._normalise(items)
        chosen: list[tuple[_Item, int, int]] = []
        if items:
            _, picks = group_knapsack([it.options for it in items], capacity)
            chosen = [(it, it.options[j][0], it.steps[j]) for it, j in zip(items, picks) if j > 0]
        return items, spare, chosen

    def _conserve_work(self, items: list[_Item], spare: list[tuple], chosen: list[tuple[_Item, int, int]],
                       capacity: int, now_s: float, t_next: float) -> None:
        """4a. On-time requests the knapsack left out, earliest deadline first, at the narrowest
        option that fits in the devices still free."""
        used = sum(d for _, d, _ in chosen)
        running = {id(it) for it, _, _ in chosen}
        leftovers = [it for it in items if id(it) not in running]
        for it in _chain_items(leftovers, spare, lambda r: self._item([r], now_s, t_next)):
            if used >= capacity:
                break
            fits = [j for j in range(1, len(it.options)) if it.options[j][0] <= capacity - used]
            if fits:
                j = min(fits, key=lambda j: it.options[j][0])
                chosen.append((it, it.options[j][0], it.steps[j]))
                used += it.options[j][0]

    def _scale_up(self, chosen: list[tuple[_Item, int, int]], capacity: int) -> None:
        """4b. Elastic scale-up: double running single-request groups, biggest saving per device first."""
        used = sum(d for _, d, _ in chosen)
        while used < capacity:
            best = None
            for idx, (it, d, _) in enumerate(chosen):
                if it.batch > 1 or d > capacity - used:  # doubling takes d more devices
                    continue
                r = it.members[0]
                step = self._res_of(r).step_s
                if 2 * d not in step or step[2 * d] >= 0.95 * step[d]:
                    continue  # not worth the devices (or slower)
                saving = r.remaining_steps * (step[d] - step[2 * d]) / d
                if best is None or saving > best[0]:
                    best = (saving, idx)
            if best is None:
                return
            it, d, _ = chosen[best[1]]
            r = it.members[0]
            q = min(r.remaining_steps, steps_in(self.round_s, self._res_of(r).step_s[2 * d]))
            chosen[best[1]] = (it, 2 * d, q)
            used += d

    def _run_late(self, late: list[SchedRequest], chosen: list[tuple[_Item, int, int]], capacity: int) -> None:
        """5. Late requests: one device each, least remaining work first, with what is left."""
        used = sum(d for _, d, _ in chosen)
        if used < capacity and late:
            late.sort(key=lambda r: (r.remaining_steps * self._res_of(r).step_s[1], r.deadline, r.arrival_s))
            for r in late[:capacity - used]:
                q = min(r.remaining_steps, steps_in(self.round_s, self._res_of(r).step_s[1]))
                chosen.append((_Item([r], [(0, 0.0)], [0]), 1, q))

    def _place(self, chosen: list[tuple[_Item, int, int]], idle: list[int]) -> list[GroupSpec]:
        """3. Placement (placement preservation), then the round's length (`_fill`)."""
        if not chosen:
            return []
        placed = place([(k, d, it.members[0].device_ids) for k, (it, d, _) in enumerate(chosen)],
                       idle, self.num_devices, self.known_groups)
        specs = []
        for k, (it, _, q) in enumerate(chosen):
            devs = placed.get(k)
            if devs is not None:  # always, with power-of-two degrees; otherwise the request waits
                specs.append(GroupSpec(devs, tuple(r.request_id for r in it.members), q))
        if self.fill_rounds and specs:
            specs = self._fill(specs)
        return specs

    def _backfill(self, now_s: float, idle: list[int], ready: list[SchedRequest], round_end_s: float) -> list[GroupSpec]:
        """Devices idle mid-round (a request finished early, or arrived after the round started):
        run on-time requests, most urgent first, at their plan's current degree (or the widest
        hull degree that fits), for the steps that end by the round's end; then late ones on one
        device. No knapsack: the next round re-plans everything."""
        if not self.backfill:
            return []
        window = round_end_s - now_s
        free = set(idle)
        specs: list[GroupSpec] = []
        on_time: list[tuple[bool, float, float, SchedRequest]] = []
        late: list[SchedRequest] = []
        for r in ready:
            info = self._res_of(r)
            fastest = r.remaining_steps * info.fast_s + info.decode_s
            if now_s + fastest > r.deadline + 1e-9:
                late.append(r)
            else:  # requests that cannot wait for the next round first, then earliest deadline
                on_time.append((round_end_s + fastest <= r.deadline + 1e-9, r.deadline, r.arrival_s, r))
        on_time.sort(key=lambda x: x[:3])
        for *_, r in on_time:
            if not free:
                break
            info = self._res_of(r)
            plan = _allocate(info.hull, r.remaining_steps, r.deadline - now_s - info.decode_s)
            segs = plan[1] if plan else [(info.hull[-1].degree, r.remaining_steps)]
            degree, seg_steps = segs[0]
            if degree > len(free):
                fitting = [p.degree for p in info.hull if p.degree <= len(free)]
                if not fitting:
                    continue
                degree, seg_steps = fitting[-1], r.remaining_steps
            cap = seg_steps if len(segs) > 1 and degree == segs[0][0] else r.remaining_steps
            spec = self._backfill_group(r, degree, cap, window, free)
            if spec:
                specs.append(spec)
        late.sort(key=lambda r: (r.remaining_steps * self._res_of(r).step_s[1], r.deadline, r.arrival_s))
        for r in late:
            if not free:
                break
            spec = self._backfill_group(r, 1, r.remaining_steps, window, free)
            if spec:
                specs.append(spec)
        return specs

    def _backfill_group(self, r: SchedRequest, degree: int, max_steps: int, window_s: float,
                        free: set[int]) -> GroupSpec | None:
        info = self._res_of(r)
        t = info.step_s[degree]
        q = min(max_steps, int(math.floor(window_s / t + 1e-9)))
        if q >= r.remaining_steps and q * t + info.decode_s > window_s + 1e-9:
            q = r.remaining_steps - 1  # the decode would outlast the round
        if q < 1:
            return None
        devs = place([(0, degree, r.device_ids)], free, self.num_devices, self.known_groups).get(0)
        if devs is None:
            return None
        free.difference_update(devs)
        return GroupSpec(devs, (r.request_id,), q)

    def _first_degree(self, r: SchedRequest, now_s: float) -> int:
        """Degree of the first segment of r's cheapest plan (the fastest degree when none meets it)."""
        info = self._res_of(r)
        plan = _allocate(info.hull, r.remaining_steps, r.deadline - now_s - info.decode_s)
        return plan[1][0][0] if plan else info.hull[-1].degree

    def _item(self, members: list[SchedRequest], now_s: float, t_next: float, batch: int = 1) -> _Item:
        """Knapsack options of one request, or of `batch` same-shape requests run batched at degree 1."""
        r0 = members[0]  # a batch's members share _shape (_batch_items)
        info = self._res_of(r0)
        hull, decode = info.hull, info.decode_s
        # "none": resume at the next round.
        sv_none = 0
        cost_none = 0.0
        for r in members:
            plan = _allocate(hull, r.remaining_steps, r.deadline - t_next - decode)
            if plan is None:
                cost_none += r.remaining_steps * hull[-1].gpu_s
            else:
                sv_none += 1
                cost_none += plan[0]
        options: list[tuple[int, float]] = [(0, float(sv_none))]
        steps_of: list[int] = [0]
        savings: list[float] = [0.0]
        if batch > 1:
            t = info.batch_step_s[batch]
            runs = [(1, t, min(min(r.remaining_steps for r in members), info.round_steps_batched[batch]))]
        else:
            plan = _allocate(hull, r0.remaining_steps, r0.deadline - now_s - decode)
            segs = plan[1] if plan else [(hull[-1].degree, r0.remaining_steps)]
            runs = []
            for i, (d, n) in enumerate(segs):
                # The cheap first segment is capped at its planned length: more steps at that
                # degree would eat time the rest of the plan needs.
                q = info.round_steps[d]
                q = min(q, n) if i == 0 and len(segs) > 1 else min(q, r0.remaining_steps)
                runs.append((d, info.step_s[d], q))
        for d, t, q in runs:
            end = now_s + q * t
            resume = end if end > t_next else t_next
            sv = 0
            spent = q * t * d  # shared by the members of a batch
            for r in members:
                rest = r.remaining_steps - q
                if rest <= 0:
                    sv += end + decode <= r.deadline + 1e-9
                    continue
                plan = _allocate(hull, rest, r.deadline - resume - decode)
                if plan is None:
                    spent += rest * hull[-1].gpu_s
                else:
                    sv += 1
                    spent += plan[0]
            options.append((d, float(sv)))
            steps_of.append(q)
            savings.append(cost_none - spent)
        return _Item(members, options, steps_of, batch, savings)

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

    def _batch_items(self, items: list[_Item], spare: list[tuple], capacity: int, now_s: float,
                     t_next: float) -> tuple[list[_Item], list[tuple]]:
        """Merge identical-resolution degree-1 requests into batches where no member's deadline
        suffers (each member must still survive at the batched step time). Members may come from
        the requests the knapsack would not see (`spare`: (deadline, arrival, index, request)
        entries); those are taken out of `spare`. Only requests of one `batch_key` (one LoRA adapter set) and,
        with a measured cache factor, one `cached` batch together (costed at their common step time)."""
        pools: dict[tuple, list[SchedRequest]] = {}  # ((width, height, cached), batch_key) -> requests
        for it in items:
            r = it.members[0]
            if len(it.options) > 1 and it.options[1][0] == 1 and self._res_of(r).batch_step_s:
                pools.setdefault((self._shape(r), r.batch_key), []).append(r)
        extra: dict[tuple, list[tuple[float, float, int, SchedRequest]]] = {}
        batchable = {shape for shape, info in self._res_cache.items() if info.batch_step_s}
        for e in spare:
            shape = self._shape(e[3])
            if shape in batchable:
                extra.setdefault((shape, e[3].batch_key), []).append(e)
        for key, entries in extra.items():
            info = self._res(*key[0])
            # A couple of full batches' worth, not the whole queue.
            for *_, r in heapq.nsmallest(2 * max(info.batch_step_s), entries):
                plan = _allocate(info.hull, r.remaining_steps, r.deadline - now_s - info.decode_s)
                if plan is not None and plan[1][0][0] == 1:
                    pools.setdefault(key, []).append(r)
        batched: set[int] = set()
        batches: list[_Item] = []
        max_batches = max(1, capacity // 2)  # batching is for when devices are short, not a default
        for (shape, _), pool in pools.items():
            if len(pool) < 2:
                continue
            info = self._res(*shape)
            sizes = sorted(info.batch_step_s, reverse=True)
            pool.sort(key=lambda r: (r.deadline, r.arrival_s))
            while len(pool) >= 2 and len(batches) < max_batches:
                made = None
                for b in sizes:
                    if b <= len(pool) and self._all_survive_batched(pool[:b], info, b, now_s, t_next):
                        made = self._item(pool[:b], now_s, t_next, batch=b)
                        break
                if made is None:
                    break
                batches.append(made)
                batched.update(id(r) for r in pool[:made.batch])
                pool = pool[made.batch:]
        if not batches:
            return items, spare
        out = [it for it in items if id(it.members[0]) not in batched] + batches
        out.sort(key=lambda it: min((m.deadline, m.arrival_s) for m in it.members))
        return out, [e for e in spare if id(e[3]) not in batched]

    def _all_survive_batched(self, members: list[SchedRequest], info: _Res, batch: int, now_s: float,
                             t_next: float) -> bool:
        """Would every member still meet its deadline after this round's steps run batched?
        (The survival test of `_item`, without its GPU-second accounting.)"""
        t = info.batch_step_s[batch]
        q = min(min(r.remaining_steps for r in members), info.round_steps_batched[batch])
        end = now_s + q * t
        resume = end if end > t_next else t_next
        for r in members:
            rest = r.remaining_steps - q
            if rest <= 0:
                if end + info.decode_s > r.deadline + 1e-9:
                    return False
            elif resume + rest * info.fast_s + info.decode_s > r.deadline + 1e-9:
                return False
        return True

    # ---- round fill ----------------------------------------------------------------------------

    def _fill(self, specs: list[GroupSpec]) -> list[GroupSpec]:
        """Choose the round's length and every group's step count so that the devices idle least
        (round_fill.fill_round)."""
        groups = []
        for s in specs:
            members = [self._requests[rid] for rid in s.request_ids]
            info = self._res_of(members[0])
            t = info.step_s[len(s.device_ids)] if len(members) == 1 else info.batch_step_s[len(members)]
            remaining = min(r.remaining_steps for r in members)
            decode = sum(self._res_of(r).decode_s for r in members if r.remaining_steps == remaining)
            groups.append((len(s.device_ids), t, remaining, decode))
        steps = fill_round(groups, self.round_s, ROUND_MIN, ROUND_MAX, FINE_STEP)
        return [GroupSpec(s.device_ids, s.request_ids, q) for s, q in zip(specs, steps)]


def _chain_items(items: list[_Item], spare: list[tuple], make) -> Iterator[_Item]:
    """The knapsack's left-out items, then items made on demand for the requests it never saw
    ((deadline, arrival, index, request) entries), earliest deadline first."""
    yield from items
    for *_, r in sorted(spare):
        yield make(r)
