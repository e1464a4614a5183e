"""Triage: which requests can still make their deadlines *together*, and whom to give up.

The paper's survival test asks of each request alone whether it could still finish with every
device to itself; in a burst every request passes and they miss together. Triage asks it of the
set: it builds a *virtual schedule* of every request still worth protecting on the whole machine
over time, and gives up the fewest requests that make the rest fit.

Virtual schedule (`fit_all`). Devices are free at known times (idle ones now, busy ones when their
group is expected to end). Requests go in deadline order (EDF); each takes the cheapest degree (in
GPU-seconds) at which it still finishes by its deadline, on the devices that free up first:

    start = max(its release, the k-th earliest device free time);  end = start + steps x t(k) + decode

and those k devices are then busy until `end`. This is list scheduling with one degree per request,
non-preemptive on paper (the real schedule re-plans at every group end, so it only does better), and
its degree choice accounts for contention: a request gets more devices only when the ones before it
leave it too little time at fewer.

Giving up (`triage`), after Moore and Hodgson's rule for the most on-time jobs on one machine: when
the request in turn does not fit, give up the one, among it and those already placed, that costs
the most device-seconds (the cheapest to lose: its devices buy the most room for the others), and
place the rest again. Requests that cannot finish even alone on the whole machine are given up
first, without costing anyone else.

Pure functions over plain tuples, so they are tested against brute force (tests/test_sched_triage.py).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Hashable, Sequence

EPS = 1e-9


@dataclass(frozen=True)
class Job:
    """One request as triage sees it. options: (degree, seconds per step), cheapest GPU-seconds
    first (the resolution's lower hull, allocation.lower_hull), degrees <= the machine's."""

    key: Hashable
    release_s: float  # when it can next run (now, or when its group in flight ends)
    deadline_s: float
    steps: int  # steps left after the group in flight
    decode_s: float
    options: tuple[tuple[int, float], ...]
    # (degree, decode seconds) when its decode depends on the degree it ends at (patch-parallel VAE);
    # a degree not listed decodes in decode_s.
    decodes: tuple[tuple[int, float], ...] = ()

    def decode_at(self, degree: int) -> float:
        """Its decode when its last group runs at `degree`."""
        for d, seconds in self.decodes:
            if d == degree:
                return seconds
        return self.decode_s

    @property
    def cost_s(self) -> float:
        """Device-seconds at its cheapest degree: what giving it up frees."""
        degree, step_s = self.options[0]
        return degree * step_s * self.steps + self.decode_at(degree)

    def fastest_end_s(self) -> float:
        """Its end alone on the machine, from its release, at its fastest degree."""
        return self.release_s + min(self.steps * t + self.decode_at(d) for d, t in self.options)


@dataclass(frozen=True)
class Slot:
    """Where a job sits in the virtual schedule: from start_s, `first_steps` steps at `degree`,
    then the rest at `then_degree` (== degree when it runs at one degree), ending at end_s."""

    key: Hashable
    degree: int
    start_s: float
    end_s: float
    first_steps: int
    then_degree: int
    switch_s: float  # when it takes the wider degree's extra devices (end_s when it never does)

    @property
    def width(self) -> int:
        return max(self.degree, self.then_degree)


def fit(job: Job, free_at: Sequence[float], min_degree: int = 1) -> Slot | None:
    """The cheapest plan by which `job` ends by its deadline on the earliest-free devices (free_at
    sorted ascending), or None. Plans: one hull degree, or two adjacent ones (the cheap degree
    first, as `allocation.allocate`, switching once the wider degree's devices are free), starting
    at min_degree or more."""
    n = len(free_at)
    release, steps = job.release_s, job.steps
    prev = None
    for degree, step_s in job.options:
        if degree < min_degree:
            continue
        if degree > n:
            break
        decode_s = job.decode_at(degree)  # (a plan ending at this degree decodes at it)
        budget_end = job.deadline_s - decode_s + EPS
        start = free_at[degree - 1]
        if start < release:
            start = release
        if start + steps * step_s <= budget_end:
            if prev is not None:  # try running the cheaper degree first, switching to this one
                mixed = _two_degrees(job, prev, (degree, step_s), free_at, budget_end)
                if mixed is not None:
                    return mixed
            end = start + job.steps * step_s + decode_s
            return Slot(job.key, degree, start, end, job.steps, degree, end)
        if prev is not None:
            mixed = _two_degrees(job, prev, (degree, step_s), free_at, budget_end)
            if mixed is not None:
                return mixed
        prev = (degree, step_s)
    return None


def _two_degrees(job: Job, slow: tuple[int, float], fast: tuple[int, float], free_at: Sequence[float],
                 budget_end: float) -> Slot | None:
    """Most steps at the slow (cheap) degree, the rest at the fast one once its devices are free,
    ending by budget_end (the deadline less the decode at the fast degree, where the plan ends); None
    when no such split meets it (or it would not use the slow degree)."""
    (a, t_a), (b, t_b) = slow, fast
    start = max(job.release_s, free_at[a - 1])
    n_slow = min(job.steps - 1, int(math.floor((budget_end - start - job.steps * t_b) / (t_a - t_b))))
    if n_slow < 1:
        return None
    switch = max(start + n_slow * t_a, free_at[b - 1])
    end = switch + (job.steps - n_slow) * t_b
    if end > budget_end:
        return None
    return Slot(job.key, a, start, end + job.decode_at(b), n_slow, b, switch)


def occupy(free_at: list[float], slot: Slot) -> list[float]:
    """free_at (sorted) after `slot` takes its earliest-free devices (all of them until its end:
    with two degrees, the wider one's extra devices are counted busy from their free time)."""
    rest = free_at[slot.width:]
    for _ in range(slot.width):
        bisect.insort(rest, slot.end_s)
    return rest


def fit_all(jobs: Sequence[Job], free_at: Sequence[float]) -> tuple[list[Slot], int | None]:
    """Place jobs (in the order given) one after the other. Returns the slots placed and the index
    of the first job that did not fit (None: all fit)."""
    profile = sorted(free_at)
    slots: list[Slot] = []
    for i, job in enumerate(jobs):
        slot = fit(job, profile)
        if slot is None:
            return slots, i
        slots.append(slot)
        profile = occupy(profile, slot)
    return slots, None


def edf_order(jobs: Sequence[Job]) -> list[Job]:
    return sorted(jobs, key=lambda j: (j.deadline_s, j.release_s))


def triage(jobs: Sequence[Job], free_at: Sequence[float]) -> tuple[list[Slot], list[Hashable]]:
    """Keep the most jobs that fit together: returns (their slots, in the virtual schedule's order,
    and the keys of the jobs given up).

    Jobs that cannot finish even alone are given up first. The rest are placed in EDF order; when
    one does not fit, two repairs are tried before anyone is given up (`_repair`): placing it ahead
    of one of the last jobs placed, or starting one of those at its next wider degree. If neither
    works, Moore-Hodgson: give up the costliest of the jobs placed and it, and place again the jobs
    behind the one given up (the profile before each placed job is kept, so that costs only their
    re-placement). Repairs are skipped for a job that does not fit even before anyone else is
    placed, and stop after REPAIR_BUDGET placements per call, so a decision stays short whatever
    the queue."""
    dropped: list[Hashable] = []
    queue: list[Job] = []
    for job in edf_order(jobs):
        (queue if job.fastest_end_s() <= job.deadline_s + EPS else dropped).append(job)
    dropped = [job.key for job in dropped]
    kept: list[Job] = []
    slots: list[Slot] = []
    profiles: list[list[float]] = [sorted(free_at)]  # profiles[p]: free times before kept[p]
    budget = [REPAIR_BUDGET]
    top_cost = -1.0  # the costliest kept job's cost (kept only grows between recomputations)
    i = 0
    while i < len(queue):
        job = queue[i]
        slot = fit(job, profiles[-1])
        if slot is not None:
            kept.append(job)
            slots.append(slot)
            profiles.append(occupy(profiles[-1], slot))
            top_cost = max(top_cost, job.cost_s)
            i += 1
            continue
        if budget[0] > 0 and fit(job, profiles[0]) is not None and _repair(job, kept, slots, profiles, budget):
            top_cost = max(top_cost, job.cost_s)
            i += 1
            continue
        if job.cost_s >= top_cost:  # the job itself is the costliest (ties: the later one): give it up
            dropped.append(job.key)
            i += 1
            continue
        costs = [k.cost_s for k in kept]
        victim = len(costs) - 1 - costs[::-1].index(top_cost)  # the latest of the costliest
        dropped.append(kept[victim].key)
        queue[i:i] = kept[victim + 1:]  # re-place the jobs behind the victim, then this one again
        del kept[victim:], slots[victim:], profiles[victim + 1:]
        top_cost = max((k.cost_s for k in kept), default=-1.0)
    return slots, dropped


def first_needs(slots: Sequence[Slot], free_at: Sequence[float]) -> list[float]:
    """When the virtual schedule first needs each device that is free at the earliest time in
    free_at (the devices idle now), ascending; inf for those it leaves idle for good. Work put on
    such a device before its need costs the protected requests nothing."""
    profile = sorted(free_at)
    if not profile:
        return []
    now = profile[0]
    idle = sum(1 for t in profile if t <= now)
    needs: list[float] = []
    for slot in slots:
        if profile[0] > now:
            break  # every idle device is taken
        taken = profile[:slot.width]
        for j, t in enumerate(taken):
            if t <= now:
                needs.append(slot.start_s if j < slot.degree else slot.switch_s)
        profile = occupy(profile, slot)
    needs.sort()
    return needs + [math.inf] * (idle - len(needs))


REPAIR_DEPTH = 8  # how many of the last jobs placed a repair may move or speed up
REPAIR_BUDGET = 64  # placements all repairs of one triage call may try


def _repair(job: Job, kept: list[Job], slots: list[Slot], profiles: list[list[float]], budget: list[int]) -> bool:
    """`job` did not fit behind `kept`. Does it fit (every job behind the change still fitting)
    a) ahead of one of the last REPAIR_DEPTH jobs placed (a request with a later deadline but no
       slack, e.g. a large one near its end, may go before small ones with slack), or
    b) when one of those starts at its next wider degree (dearer, but done sooner)?
    Updates the lists and returns True if so."""
    for p in range(len(kept) - 1, max(-1, len(kept) - 1 - REPAIR_DEPTH), -1):
        if _replace_from(p, [job] + kept[p:], kept, slots, profiles, budget):
            return True
    for p in range(len(kept) - 1, max(-1, len(kept) - 1 - REPAIR_DEPTH), -1):
        wider = [d for d, _ in kept[p].options if d > slots[p].degree]
        faster = fit(kept[p], profiles[p], min_degree=wider[0]) if wider else None
        if faster is not None and _replace_from(p, kept[p:] + [job], kept, slots, profiles, budget, first=faster):
            return True
    return False


def _replace_from(p: int, order: list[Job], kept: list[Job], slots: list[Slot], profiles: list[list[float]],
                  budget: list[int], first: Slot | None = None) -> bool:
    """Place `order` from position p (the first with the given slot, if any); commit if all fit."""
    new_slots: list[Slot] = []
    new_profiles: list[list[float]] = []
    profile = profiles[p]
    for n, job in enumerate(order):
        if budget[0] <= 0:
            return False
        budget[0] -= 1
        slot = first if n == 0 and first is not None else fit(job, profile)
        if slot is None:
            return False
        profile = occupy(profile, slot)
        new_slots.append(slot)
        new_profiles.append(profile)
    kept[p:] = order
    slots[p:] = new_slots
    profiles[p + 1:] = new_profiles
    return True
