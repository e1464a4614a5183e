"""Triage (sched/triage.py) against brute force on small random instances."""
from __future__ import annotations

import itertools
import random

import pytest

from tetri_engine.sched.allocation import HullPoint, lower_hull
from tetri_engine.sched.triage import Job, edf_order, first_needs, fit, fit_all, triage


def random_options(rng: random.Random, devices: int) -> tuple[tuple[int, float], ...]:
    """A resolution's hull on `devices` devices: each doubling 5-50% faster."""
    points, step_s = [], rng.uniform(0.05, 1.0)
    for degree in (1, 2, 4, 8):
        if degree > devices:
            break
        points.append(HullPoint(degree, step_s, degree * step_s))
        step_s *= rng.uniform(0.5, 0.95)
    return tuple((p.degree, p.step_s) for p in lower_hull(points))


def plan_cost(job: Job, slot) -> float:
    step = dict(job.options)
    rest = job.steps - slot.first_steps
    return slot.first_steps * slot.degree * step[slot.degree] + rest * slot.then_degree * step[slot.then_degree]


def cheapest_by_brute_force(job: Job, free_at: list[float]) -> float | None:
    """Every single-degree plan and every split over two adjacent hull degrees, same timing rule."""
    best = None
    end_by = job.deadline_s - job.decode_s + 1e-9
    for degree, t in job.options:
        if max(job.release_s, free_at[degree - 1]) + job.steps * t <= end_by:
            best = min(best or float("inf"), job.steps * degree * t)
    for (a, ta), (b, tb) in zip(job.options, job.options[1:]):
        for n_a in range(1, job.steps):
            start = max(job.release_s, free_at[a - 1])
            switch = max(start + n_a * ta, free_at[b - 1])
            if switch + (job.steps - n_a) * tb <= end_by:
                best = min(best or float("inf"), n_a * a * ta + (job.steps - n_a) * b * tb)
    return best


def test_fit_finds_the_cheapest_plan():
    rng = random.Random(1)
    for _ in range(1500):
        devices = rng.choice([1, 2, 4, 8])
        free_at = sorted(rng.choice([0.0, rng.uniform(0, 3)]) for _ in range(devices))
        job = Job("j", rng.choice([0.0, rng.uniform(0, 1)]), rng.uniform(0, 12), rng.randint(1, 12),
                  rng.choice([0.0, 0.1]), random_options(rng, devices))
        slot = fit(job, free_at)
        best = cheapest_by_brute_force(job, free_at)
        assert (slot is None) == (best is None)
        if slot is not None:
            assert plan_cost(job, slot) == pytest.approx(best)
            assert slot.end_s <= job.deadline_s + 1e-9 and slot.start_s >= job.release_s


def random_instance(rng: random.Random, devices: int, with_releases: bool):
    jobs = []
    for key in range(rng.randint(1, 7)):
        options = random_options(rng, devices) if devices > 1 else ((1, rng.uniform(0.05, 0.5)),)
        release = rng.uniform(0, 1) if with_releases and rng.random() < 0.3 else 0.0
        jobs.append(Job(key, release, rng.uniform(0.2, 6), rng.randint(1, 10), 0.0, options))
    free_at = sorted(rng.uniform(0, 1) if with_releases and rng.random() < 0.3 else 0.0 for _ in range(devices))
    return jobs, free_at


def most_that_fit(jobs: list[Job], free_at: list[float]) -> int:
    """Brute force: the largest subset that EDF list scheduling (fit_all) places entirely."""
    for size in range(len(jobs), 0, -1):
        if any(fit_all(edf_order(subset), free_at)[1] is None for subset in itertools.combinations(jobs, size)):
            return size
    return 0


def check_schedule(jobs: list[Job], free_at: list[float], devices: int, slots) -> None:
    """Every slot meets its job's deadline after its release, and no device is ever double-booked."""
    by_key = {j.key: j for j in jobs}
    events = [(f, -1) for f in free_at if f > 0] + [(0.0, sum(1 for f in free_at if f > 0))]
    for s in slots:
        job = by_key[s.key]
        assert job.release_s - 1e-9 <= s.start_s and s.end_s <= job.deadline_s + 1e-9
        events += [(s.start_s, s.degree), (s.switch_s, s.width - s.degree), (s.end_s, -s.width)]
    in_use = 0
    for _, delta in sorted(events):  # at equal times, releases (negative) first
        in_use += delta
        assert in_use <= devices


def test_triage_is_moore_hodgson_optimal_on_one_device():
    rng = random.Random(2)
    for _ in range(600):
        jobs, free_at = random_instance(rng, 1, with_releases=False)
        slots, given_up = triage(jobs, free_at)
        assert len(slots) == most_that_fit(jobs, free_at)
        assert sorted([s.key for s in slots] + given_up) == sorted(j.key for j in jobs)  # each exactly once
        check_schedule(jobs, free_at, 1, slots)


def test_triage_on_many_devices_is_valid_and_keeps_about_the_most():
    rng = random.Random(3)
    kept_total = best_total = 0
    for _ in range(600):
        devices = rng.choice([2, 4])
        jobs, free_at = random_instance(rng, devices, with_releases=True)
        slots, given_up = triage(jobs, free_at)
        assert sorted([s.key for s in slots] + given_up) == sorted(j.key for j in jobs)
        check_schedule(jobs, free_at, devices, slots)
        best = most_that_fit(jobs, free_at)
        assert len(slots) >= best - 1  # a heuristic: never more than one short of brute force here
        kept_total += len(slots)
        best_total += best
    assert kept_total >= best_total  # and as many overall (its repairs beat plain EDF list scheduling)


def test_a_job_that_cannot_finish_alone_costs_nobody():
    # One device: "hopeless" cannot finish even alone; giving it up must not push out the others.
    options = ((1, 0.1),)
    jobs = [Job("hopeless", 0.0, 0.5, 10, 0.0, options), Job("a", 0.0, 1.0, 5, 0.0, options),
            Job("b", 0.0, 2.0, 5, 0.0, options)]
    slots, given_up = triage(jobs, [0.0])
    assert given_up == ["hopeless"] and [s.key for s in slots] == ["a", "b"]


def test_gives_up_the_costliest_when_the_set_does_not_fit():
    # Two devices, three jobs due at 1 s that each need one device for ~0.9 s: one must go, and the
    # one to lose is the costliest (most device-seconds), not the last in deadline order.
    options = ((1, 0.1), (2, 0.06))
    jobs = [Job("big", 0.0, 1.0, 9, 0.0, options), Job("s1", 0.0, 1.05, 8, 0.0, options),
            Job("s2", 0.0, 1.1, 8, 0.0, options)]
    slots, given_up = triage(jobs, [0.0, 0.0])
    assert given_up == ["big"] and sorted(s.key for s in slots) == ["s1", "s2"]


def test_first_needs_says_when_each_idle_device_is_wanted():
    options = ((1, 1.0), (2, 0.6))
    # Device 0 idle, device 1 busy until 2.0. "a" starts now on device 0 at degree 1; "b" (degree 2)
    # needs both devices once "a" ends; device 1 is not idle now, so only one need is reported.
    slots, _ = triage([Job("a", 0.0, 2.0, 2, 0.0, options), Job("b", 0.0, 10.0, 5, 0.0, ((2, 0.6),))],
                      [0.0, 2.0])
    assert first_needs(slots, [0.0, 2.0]) == [0.0]
    # Both idle, one job due later: the device it does not use is never needed.
    slots, _ = triage([Job("c", 1.0, 5.0, 2, 0.0, ((1, 1.0),))], [0.0, 0.0])
    assert first_needs(slots, [0.0, 0.0]) == [1.0, float("inf")]
