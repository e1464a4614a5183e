"""tetri: TetriServe's step-level parallelism with a scheduler built for overload, bursts and tails.

The paper-faithful policy (`tetri-paper`, paper.py) protects requests one at a time: each must be
able to finish with every device to itself, so in a burst every request looks alive until too late.
This one decides who can make it *together*, and is event-driven. Every `schedule(now_s)` call:

1. Triage (`_triage`, triage.py), whether or not a device is idle. A virtual schedule of every
   request still protected, on the whole machine over time: deadline order, each at the cheapest
   degree (or pair of degrees) that still ends by its deadline on the devices that free up first, so
   its degree accounts for the others. Requests that do not fit are given up, the fewest and the
   cheapest to lose first (Moore-Hodgson), after trying to make room by reordering or speeding up
   the last ones placed. Given up is for good and said at once: `RoundPlan.given_up` (even on an
   empty plan), `plan.late`, `policy.is_given_up(rid)`. Given-up requests still run, best effort.
2. Start what the virtual schedule starts now, at its degree (`_start_due`).
3. Devices idle now that the virtual schedule needs only later are "windows": work put on them
   must end by then, so it costs the protected requests nothing. Protected requests due later run
   in them first, earliest deadline first, at up to their planned degree (`_start_early`).
4. Elastic scale-up (`_scale_up`): a group planned now doubles its degree with idle devices while
   its step gets >= 5% faster, biggest saving of time per added device first. (4a, opt-in,
   `rescue_slowdown`: given-up requests whose slowdown would reach it go first, `_rescue`.)
5. Late requests (`_start_late`): what is still idle runs given-up requests, least remaining work
   first (shortest remaining processing time), then scale-up again for them.
6. Placement (`_place`, placement.py): aligned groups, a request keeps the devices its latent is on,
   else takes devices that hold its LoRA adapter set (a group on devices holding another set pays
   `cost.lora_switch_s` first: `Policy.switch_s`, in its expected time); a group that finds its idle
   devices fragmented runs at half the degree.

Parallel layouts (issue 16) are options like degrees: on k devices a request runs the fastest layout
the profile has for it (`cost.step_options`: Ulysses over k, or, with true classifier-free guidance,
its two guidance branches on k/2 devices each), and the group that finishes it decodes on as many of
its devices as decode fastest (`cost.group_decode`), so a degree's time, GPU cost and decode are
those of its best layout everywhere above (hull, triage, scale-up). The plan says which layout each
group runs (`GroupAssignment.cfg`, `decode_degree`).

No rounds: a group runs about `round_s` seconds of steps (at least one step; `round_s` /
`round_steps` stay the one tunable: shorter groups react sooner, longer ones regroup less), and
when it ends its devices are planned again at once while the other groups run on
(`synchronous_rounds` is False, as for the baselines).

Admission (`admission_check`): would a new request fit alongside the protected ones without any
of them being given up, and if not, when could it? Pure, fast, the same virtual schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from tetri_engine.sched.allocation import HullPoint, lower_hull
from tetri_engine.sched.cost import CostModel
from tetri_engine.sched.placement import place
from tetri_engine.sched.plan import RoundPlan, RoundResult, SchedRequest
from tetri_engine.sched.policy import Admission, Estimate, GroupSpec, Policy, steps_in
from tetri_engine.sched.triage import Job, Slot, edf_order, first_needs, fit_all, occupy, triage

SCALE_UP_MIN_GAIN = 0.05  # double a group's degree only if its step gets >= 5% faster
_CANDIDATE = "\0candidate"  # triage key of the request being asked about (no request id starts with NUL)


@dataclass(frozen=True)
class _Shape:
    """Step times of one (width, height, cached, cfg), computed once."""

    step_s: dict[int, float]  # degree -> seconds per step (batch 1) in the fastest layout there
    cfg_at: dict[int, int]  # degree -> the cfg degree of that layout
    options: tuple[tuple[int, float], ...]  # hull: (degree, step_s), cheapest GPU-seconds first
    decode_s: float  # on one device
    decodes: tuple[tuple[int, float], ...]  # (group degree, its decode seconds)


class TetriPolicy(Policy):
    name = "tetri"
    synchronous_rounds = False
    parallel_decode = True
    cfg_parallel = True

    def __init__(self, num_devices: int, cost: CostModel, *, round_steps: int = 5, round_s: float | None = None,
                 scale_up: bool = True, give_up: bool = True, rescue_slowdown: float | None = None):
        super().__init__(num_devices, cost, round_steps=round_steps, round_s=round_s)
        self.scale_up = scale_up  # switches for ablations (bench/sim_ablation.py)
        self.give_up = give_up
        # Tails vs SAR: a given-up request whose slowdown would reach this even if it ran at its
        # fastest from now is served before protected requests scale up (None: never).
        self.rescue_slowdown = rescue_slowdown
        self._shapes: dict[tuple[int, int, bool, bool], _Shape] = {}
        self._given_up: set[str] = set()
        self._slots: dict[str, Slot] = {}  # the virtual schedule of the last triage: request id -> slot
        self._needs: list[float] = []  # triage.first_needs of the last triage

    # ---- queries the engine may ask -------------------------------------------------------------

    def is_given_up(self, request_id: str) -> bool:
        return request_id in self._given_up

    def abort(self, request_id: str) -> bool:
        self._given_up.discard(request_id)
        self._slots.pop(request_id, None)
        return super().abort(request_id)

    def update_from_output(self, plan: RoundPlan, result: RoundResult) -> list[SchedRequest]:
        finished = super().update_from_output(plan, result)
        for r in finished:
            self._given_up.discard(r.request_id)
            self._slots.pop(r.request_id, None)
        return finished

    def admission_check(self, width: int, height: int, num_steps: int, deadline_s: float, now_s: float,
                        cached: bool = False, cfg: bool = False, pending: Sequence[SchedRequest] = ()) -> Admission:
        """Would a request arriving now (deadline_s absolute) fit alongside the protected ones, and the
        pending ones (accepted, still encoding: counted as protected), without giving any of them up? If not, `retry_after_s` estimates when it could: the earliest
        moment, as planned now (no further arrivals), at which the same request with the same
        relative deadline would fit; None when it cannot make its deadline even alone."""
        return self._admit(width, height, num_steps, deadline_s, now_s, cached, cfg,
                           self._pending_jobs(pending, now_s))[0]

    def estimate(self, width: int, height: int, num_steps: int, deadline_s: float, now_s: float,
                 cached: bool = False, pending: Sequence[SchedRequest] = (), cfg: bool = False) -> Estimate:
        """admission_check's answer, with `pending` (accepted, still encoding) counted as protected,
        plus what the virtual schedule with the request in it says: its end (given up: one device once
        the protected work is placed, as `_start_late` runs it) and the delay it adds to the planned
        ends of the protected requests. Pure: three triages and admission_check's search at most."""
        answer, jobs, free_at = self._admit(width, height, num_steps, deadline_s, now_s, cached, cfg,
                                            self._pending_jobs(pending, now_s))
        shape = self._shape(width, height, cached, cfg)
        before, _ = triage(jobs, free_at)
        after, _ = triage(jobs + [self._job(_CANDIDATE, now_s + self.cost.encode_s(), deadline_s, num_steps,
                                            shape)], free_at)
        ends = {s.key: s.end_s for s in after}
        cost_s = sum(map(_device_s, after)) - sum(map(_device_s, before))
        delay_s = sum(max(0.0, ends[s.key] - s.end_s) for s in before if s.key in ends)
        displaced = sum(1 for s in before if s.key not in ends)
        finish_s = ends.get(_CANDIDATE)
        if finish_s is None:
            profile = sorted(free_at)
            for s in after:
                profile = occupy(profile, s)
            step_1 = shape.step_s[min(shape.step_s)]
            finish_s = max(profile[0], now_s + self.cost.encode_s()) + num_steps * step_1 + shape.decode_s
            cost_s += min(shape.step_s) * num_steps * step_1 + shape.decode_s
        return Estimate(answer.fits, finish_s, cost_s, delay_s, answer.retry_after_s, answer.reason, displaced)

    def _pending_jobs(self, pending: Sequence[SchedRequest], now_s: float) -> list[Job]:
        """Triage jobs for requests accepted but not added yet: released once their encode is done."""
        return [self._job(p.request_id, now_s + self.cost.encode_s(), p.deadline, p.num_steps, self._shape_of(p))
                for p in pending]

    def _job(self, key, release_s: float, deadline_s: float, steps: int, shape: _Shape) -> Job:
        return Job(key, release_s, deadline_s, steps, shape.decode_s, shape.options, shape.decodes)

    def _admit(self, width: int, height: int, num_steps: int, deadline_s: float, now_s: float, cached: bool,
               cfg: bool, extra: list[Job]) -> tuple[Admission, list[Job], list[float]]:
        """admission_check with `extra` jobs protected too; also returns triage's view (jobs + extra,
        free_at) for estimate()."""
        self.cost.check(width, height)
        shape = self._shape(width, height, cached, cfg)
        jobs, free_at = self._jobs(now_s)
        jobs += extra
        release = now_s + self.cost.encode_s()
        alone = self._job("\0alone", release, deadline_s, num_steps, shape).fastest_end_s()
        if alone > deadline_s + 1e-9:
            return Admission(False, None, "deadline_impossible"), jobs, free_at
        base_slots, dropped = triage(jobs, free_at)
        base_dropped = len(dropped)

        def fits_at(t: float) -> bool:
            cand = self._job(_CANDIDATE, t + self.cost.encode_s(), deadline_s + (t - now_s), num_steps, shape)
            dropped = triage(jobs + [cand], free_at)[1]
            return cand.key not in dropped and len(dropped) <= base_dropped

        if fits_at(now_s):
            return Admission(True, None, "fits"), jobs, free_at
        ends = sorted({s.end_s for s in base_slots if s.end_s > now_s} | {t for t in free_at if t > now_s})
        lo, hi = 0, len(ends)  # first end at which it fits (feasibility grows with time as work drains)
        while lo < hi:
            mid = (lo + hi) // 2
            if fits_at(ends[mid]):
                hi = mid
            else:
                lo = mid + 1
        retry = ends[lo] if lo < len(ends) else max(ends, default=now_s)
        return Admission(False, max(0.0, retry - now_s), "busy"), jobs, free_at

    # ---- per-shape step times -------------------------------------------------------------------

    def _shape(self, width: int, height: int, cached: bool, cfg: bool = False) -> _Shape:
        cfg = cfg and not cached
        cached = cached and self.cost.cache_step_factor != 1.0
        key = (width, height, cached, cfg)
        shape = self._shapes.get(key)
        if shape is None:
            layouts = self.cost.step_options(width, height, self.num_devices, cached, cfg)
            step = {d: t for d, (t, _) in layouts.items()}
            hull = lower_hull([HullPoint(d, t, d * t) for d, t in step.items()])
            decodes = tuple((d, self.decode_plan(width, height, d)[1]) for d in step)
            shape = _Shape(step, {d: c for d, (_, c) in layouts.items()}, tuple((p.degree, p.step_s) for p in hull),
                           self.cost.decode_s(width, height), decodes)
            self._shapes[key] = shape
        return shape

    def _shape_of(self, r: SchedRequest) -> _Shape:
        return self._shape(r.width, r.height, r.cached, r.cfg)

    def candidate_groups(self) -> list[tuple[int, ...]]:
        """The aligned groups, plus the guidance-branch pairs of a CFG-parallel group of 4 or more
        (device c*sp + j of each branch exchanges its velocity with its twin in the other branch)."""
        groups = super().candidate_groups()
        for degree in self.cost.cfg_degrees:
            if 2 < degree <= self.num_devices:
                sp = degree // 2
                for block in (g for g in groups if len(g) == degree):
                    groups += [(block[j], block[sp + j]) for j in range(sp)]
        return list(dict.fromkeys(groups))

    # ---- 1. triage -----------------------------------------------------------------------------

    def _jobs(self, now_s: float) -> tuple[list[Job], list[float]]:
        """Triage's view: a Job per protected request with steps left after its group in flight,
        and when each device is free (now, or when its group is expected to end)."""
        jobs = []
        for rid, r in self._requests.items():
            if rid in self._given_up:
                continue
            steps, release = r.remaining_steps, now_s
            flight = self._flight.get(rid)
            if flight is not None:
                steps -= flight[0]
                release = max(now_s, flight[1])
                if steps <= 0:
                    continue  # ends in the group in flight: nothing left to place
            shape = self._shape_of(r)
            jobs.append(self._job(rid, release, r.deadline, steps, shape))
        # (A busy device whose group is overdue is not idle: it frees just after now.)
        free_at = [max(now_s + 1e-6, self._free_at[d]) if d in self._busy else now_s for d in range(self.num_devices)]
        return jobs, free_at

    def _triage(self, now_s: float) -> frozenset[str]:
        jobs, free_at = self._jobs(now_s)
        slots, dropped = triage(jobs, free_at)
        if not self.give_up:  # ablation: protect everyone, as if nobody could be given up
            slots, _ = fit_all(edf_order(jobs), free_at)
            dropped = []
        self._slots = {s.key: s for s in slots}
        self._needs = first_needs(slots, free_at)
        self._given_up.update(dropped)
        return frozenset(dropped)

    def _is_late(self, req: SchedRequest, now_s: float) -> bool:
        return req.request_id in self._given_up or super()._is_late(req, now_s)

    # ---- 2-6. a plan for the idle devices ------------------------------------------------------

    def _plan(self, now_s: float, idle: list[int], ready: list[SchedRequest]) -> list[GroupSpec]:
        chosen: dict[str, tuple[int, int]] = {}  # request id -> (degree, steps), in the order decided
        rank = {rid: i for i, rid in enumerate(self._slots)}  # the virtual schedule's order
        protected = sorted((r for r in ready if r.request_id in self._slots), key=lambda r: rank[r.request_id])
        late = [r for r in ready if r.request_id not in self._slots]
        # When the virtual schedule next needs each idle device it does not start now: work put on
        # it must end by then (latest first: fillers take the devices with the most slack).
        windows = sorted((n for n in self._needs if n > now_s + 1e-9), reverse=True)[:len(idle)]
        free = self._start_due(protected, chosen, len(idle) - len(windows), now_s)
        windows = sorted(windows + [math.inf] * max(0, free), reverse=True)  # + devices never needed
        self._start_early(protected, chosen, windows, now_s)
        if self.rescue_slowdown is not None:
            late = self._rescue(late, chosen, windows, now_s)
        if self.scale_up:
            self._scale_up(ready, chosen, windows, now_s)
        self._start_late(late, chosen, windows, now_s)
        if self.scale_up:  # and the late requests' groups, with what is still idle
            self._scale_up(ready, chosen, windows, now_s)
        return self._place(chosen, idle)

    def _rescue(self, late: list[SchedRequest], chosen: dict, windows: list[float], now_s: float) -> list[SchedRequest]:
        """4a (opt-in). Given-up requests about to exceed rescue_slowdown, the most slowed first, at
        up to their fastest degree, before the protected ones scale up. Returns the others."""
        slowdown = {r.request_id: self._projected_slowdown(r, now_s) for r in late}
        for r in sorted(late, key=lambda r: -slowdown[r.request_id]):
            if not windows or slowdown[r.request_id] < self.rescue_slowdown:
                break
            self._take(r, [d for d, _ in self._shape_of(r).options], chosen, windows, now_s)
        return [r for r in late if r.request_id not in chosen]

    def _projected_slowdown(self, r: SchedRequest, now_s: float) -> float:
        """Its slowdown if it finished as fast as it can from now."""
        fastest, decode_s = self._fastest(r.width, r.height, r.cached, r.cfg)
        iso = self.cost.encode_s() + r.num_steps * fastest + decode_s
        return (now_s - r.arrival_s + r.remaining_steps * fastest + decode_s) / iso

    def _steps(self, r: SchedRequest, degree: int, window_s: float = math.inf) -> int:
        """Steps of r at `degree` in one group: about round_s, at most window_s (0: none fit)."""
        step_s = self._shape_of(r).step_s[degree]
        q = min(r.remaining_steps, steps_in(self.round_s, step_s))
        if window_s < math.inf:
            q = min(q, int(math.floor(window_s / step_s + 1e-9)))
        return q

    def _start_due(self, protected: list[SchedRequest], chosen: dict, free: int, now_s: float) -> int:
        """2. Requests whose virtual slot starts now, at the slot's degree (the first segment's steps
        when the plan switches degree later)."""
        for r in protected:
            slot = self._slots[r.request_id]
            if slot.start_s > now_s + 1e-9 or slot.degree > free:
                continue
            q = self._steps(r, slot.degree)
            if slot.first_steps < r.remaining_steps:
                q = min(q, slot.first_steps)
            chosen[r.request_id] = (slot.degree, q)
            free -= slot.degree
        return free

    def _take(self, r: SchedRequest, degrees: list[int], chosen: dict, windows: list[float], now_s: float) -> bool:
        """Run r at the widest of `degrees` whose group fits the windows of the devices it would
        take (the ones needed last)."""
        for d in reversed(degrees):
            if d > len(windows):
                continue
            q = self._steps(r, d, windows[d - 1] - now_s)
            if q >= 1:
                chosen[r.request_id] = (d, q)
                del windows[:d]
                return True
        return False

    def _start_early(self, protected: list[SchedRequest], chosen: dict, windows: list[float], now_s: float) -> None:
        """3. Devices idle now that the virtual schedule needs later (or never): protected requests
        due later, earliest deadline first, at up to their planned degree."""
        for r in protected:
            if not windows:
                return
            if r.request_id not in chosen:
                planned = self._slots[r.request_id].degree
                self._take(r, [d for d, _ in self._shape_of(r).options if d <= planned], chosen, windows, now_s)

    def _start_late(self, late: list[SchedRequest], chosen: dict, windows: list[float], now_s: float) -> None:
        """5. Given-up requests on what is left, one device each, least remaining work first."""
        if not windows:
            return
        late.sort(key=lambda r: (r.remaining_steps * self._shape_of(r).step_s[1], r.arrival_s))
        for r in late:
            if not windows:
                return
            self._take(r, [1], chosen, windows, now_s)

    def _scale_up(self, ready: list[SchedRequest], chosen: dict, windows: list[float], now_s: float) -> None:
        """4. Double the degree of a chosen group while devices are idle, biggest saving of time per
        added device first (only where the step gets >= SCALE_UP_MIN_GAIN faster), for the steps
        that fit the added devices' windows."""
        by_id = {r.request_id: r for r in ready}
        while windows:
            best = None
            for rid, (d, q) in chosen.items():
                r = by_id[rid]
                step = self._shape_of(r).step_s
                if d > len(windows) or 2 * d not in step or step[2 * d] > (1 - SCALE_UP_MIN_GAIN) * step[d]:
                    continue
                q2 = self._steps(r, 2 * d, windows[d - 1] - now_s)
                if q2 < 1:
                    continue
                saving = r.remaining_steps * (step[d] - step[2 * d]) / d
                if best is None or saving > best[0]:
                    best = (saving, rid, q2)
            if best is None:
                return
            _, rid, q2 = best
            d = chosen[rid][0]
            chosen[rid] = (2 * d, q2)
            del windows[:d]

    def _place(self, chosen: dict, idle: list[int]) -> list[GroupSpec]:
        """6. Aligned groups, latents kept where they are. A group that finds no aligned block
        free (the idle devices are fragmented) runs at half the degree, for no longer."""
        specs: list[GroupSpec] = []
        free = list(idle)
        todo = dict(chosen)
        while todo:
            placed = place([(rid, d, self._requests[rid].device_ids) for rid, (d, _) in todo.items()],
                           free, self.num_devices, self.known_groups, self.held_adapters,
                           {rid: self._requests[rid].adapters for rid in todo})
            retry = {}
            for rid, (d, q) in todo.items():
                devs = placed.get(rid)
                if devs is not None:
                    specs.append(GroupSpec(devs, (rid,), q, self._shape_of(self._requests[rid]).cfg_at[d]))
                    free = [x for x in free if x not in devs]
                elif d > 1 and d // 2 in self.degrees:
                    step = self._shape_of(self._requests[rid]).step_s
                    retry[rid] = (d // 2, max(1, min(q, int(q * step[d] / step[d // 2] + 1e-9))))
            todo = retry
        return specs


def _device_s(slot: Slot) -> float:
    """Device-seconds a slot of the virtual schedule holds: its first degree until it switches, then
    the wider one (decode included in its time)."""
    return slot.degree * (slot.switch_s - slot.start_s) + slot.then_degree * (slot.end_s - slot.switch_s)
