"""The `tetri` policy: triage over the whole machine, giving up early, late requests, degrees under
contention, event-driven groups, admission, and the SAR bound over every policy."""
from __future__ import annotations

import os

import pytest

from tetri_engine.sched import CostModel, RoundResult, SchedRequest, TetriPolicy, make_policy
from tetri_engine.sched.bound import sar_bound
from tetri_engine.sched.simulator import simulate
from tetri_engine.sched.trace import TraceRequest, generate_trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_MS = {
    (256, 256, 1, 1): 10, (256, 256, 2, 1): 12,
    (1024, 1024, 1, 1): 100, (1024, 1024, 2, 1): 60,
    (2048, 2048, 1, 1): 800, (2048, 2048, 2, 1): 420,
}
TOY_DECODE_MS = {(256, 256): 1.0, (1024, 1024): 10.0, (2048, 2048): 40.0}


def toy() -> CostModel:
    return CostModel(dict(TOY_MS), dict(TOY_DECODE_MS))


def req(rid, side, steps, deadline_s, arrival_s=0.0):
    return SchedRequest(rid, side, side, steps, arrival_s, deadline_s)


def burst(n_small: int, n_big: int, small_deadline_s: float, big_deadline_s: float) -> list[TraceRequest]:
    out = [TraceRequest(0.0, 1024, 1024, 10, 1000 * small_deadline_s, f"s{i}") for i in range(n_small)]
    return out + [TraceRequest(0.0, 2048, 2048, 10, 1000 * big_deadline_s, f"b{i}") for i in range(n_big)]


def test_a_burst_is_triaged_at_once_and_the_rest_all_make_it():
    # 2 devices, 6 x 1024^2 (1.01 s alone at degree 1, due at 2.2 s) and 2 x 2048^2 (8.04 s at
    # degree 1, 4.24 s at 2, due at 9 s) at t=0. Alone each could make it; together at most 5 can
    # (two small per device by 2.2 s, then one big at degree 2; any big started earlier costs two
    # small). tetri finds those 5, gives up the other 3 in its very first plan, and all it keeps make it.
    cost = toy()
    trace = burst(6, 2, 2.2, 9.0)
    policy = make_policy("tetri", 2, cost, round_s=0.1)
    given_up_first = {}
    schedule = policy.schedule

    def recording(now_s):
        plan = schedule(now_s)
        for rid in plan.given_up:
            given_up_first.setdefault(rid, now_s)
        return plan

    policy.schedule = recording
    result = simulate(trace, policy)
    met = {r.request_id for r in result.requests if r.met}
    assert set(given_up_first) == {r.request_id for r in result.requests} - met  # exactly the misses
    assert all(t == 0.0 for t in given_up_first.values())  # said at the first decision
    assert len(met) == 5 and sum(rid.startswith("s") for rid in met) == 4
    assert all(r.state == "completed" for r in result.requests)  # the given-up one still finishes
    paper = simulate(trace, make_policy("tetri-paper", 2, cost, round_s=0.1))
    assert result.sar > paper.sar  # the paper's per-request survival test protects all, and loses some


def test_given_up_is_said_once_and_marks_plans_late():
    policy = TetriPolicy(1, toy(), round_s=0.1)
    policy.add_request(req("ok", 1024, 5, 0.6))
    policy.add_request(req("lost", 1024, 5, 0.6))  # only one fits on one device
    plan = policy.schedule(0.0)
    assert plan.given_up == {"lost"} and policy.is_given_up("lost") and not policy.is_given_up("ok")
    assert plan.request_ids == ("ok",) and not plan.late
    done = policy.update_from_output(plan, RoundResult(plan.expected_s, {"ok": plan.groups[0].num_steps}))
    later = policy.schedule(plan.expected_s)
    assert not later.given_up  # announced once
    while policy.has_work():  # "lost" still runs to the end, flagged late
        if "lost" in later.request_ids:
            assert "lost" in later.late
        end = later.start_s + later.expected_s
        done += policy.update_from_output(later, RoundResult(end, {rid: g.num_steps for g in later.groups
                                                                   for rid in g.request_ids}))
        later = policy.schedule(end)
    assert {r.request_id for r in done} == {"ok", "lost"}


def test_late_requests_run_least_remaining_work_first_without_costing_an_on_time_one():
    # (Without scale-up, which would first give the spare device to the protected request.)
    policy = TetriPolicy(2, toy(), round_s=0.1, scale_up=False)
    policy.add_request(req("on_time", 1024, 10, 1.2))  # needs one device (1.01 s at degree 1)
    policy.add_request(req("late_long", 1024, 30, 0.5))  # cannot make it even alone: given up
    policy.add_request(req("late_short", 1024, 6, 0.3))  # nor this one (0.37 s at degree 2)
    plan = policy.schedule(0.0)
    assert plan.given_up == {"late_long", "late_short"}
    assert dict(plan.degrees) == {"on_time": 1, "late_short": 1}  # shortest late one on the spare device


def test_degrees_account_for_contention():
    # Two 1024^2 requests on 2 devices, each due in time for degree 1: both run at once, one device
    # each (cheapest), rather than one after the other at degree 2.
    policy = TetriPolicy(2, toy(), round_s=0.1, scale_up=False)
    policy.add_request(req("a", 1024, 10, 1.1))
    policy.add_request(req("b", 1024, 10, 1.1))
    plan = policy.schedule(0.0)
    assert dict(plan.degrees) == {"a": 1, "b": 1}
    # Alone, with a deadline degree 1 cannot meet (0.7 s): the cheapest plan that does is 2 steps at
    # degree 1, then 8 at degree 2 (0.2 + 0.48 + 0.01 s).
    alone = TetriPolicy(2, toy(), round_s=0.5, scale_up=False)
    alone.add_request(req("c", 1024, 10, 0.7))
    first = alone.schedule(0.0)
    assert dict(first.degrees) == {"c": 1} and first.groups[0].num_steps == 2
    alone.update_from_output(first, RoundResult(0.2, {"c": 2}))
    assert dict(alone.schedule(0.2).degrees) == {"c": 2}


def test_idle_devices_scale_up():
    for scale_up, degree in ((True, 2), (False, 1)):
        policy = TetriPolicy(2, toy(), round_s=0.5, scale_up=scale_up)
        policy.add_request(req("a", 1024, 10, 100.0))
        assert dict(policy.schedule(0.0).degrees) == {"a": degree}


def test_event_driven_a_finished_group_frees_its_devices_at_once():
    policy = TetriPolicy(2, toy(), round_s=0.1, scale_up=False)
    policy.add_request(req("small", 256, 5, 10.0))  # 50 ms
    policy.add_request(req("big", 2048, 10, 100.0))  # 800 ms steps: one step per group
    plan = policy.schedule(0.0)
    groups = {g.request_ids[0]: g for g in plan.groups}
    assert groups["big"].num_steps == 1 and groups["small"].num_steps == 5
    policy.update_from_output(plan, RoundResult(0.051, {"small": 5}))
    policy.add_request(req("new", 256, 5, 10.0, arrival_s=0.06))
    nxt = policy.schedule(0.06)  # "big" still runs: the free device is planned now, no round to wait for
    assert nxt.request_ids == ("new",) and not nxt.backfill and not policy.synchronous_rounds


def test_requests_keep_their_devices():
    policy = TetriPolicy(2, toy(), round_s=0.1, scale_up=False)
    policy.add_request(req("a", 1024, 10, 10.0))
    policy.add_request(req("b", 1024, 10, 10.0))
    first = policy.schedule(0.0)
    policy.update_from_output(first, RoundResult(first.expected_s, {rid: g.num_steps for g in first.groups
                                                                    for rid in g.request_ids}))
    second = policy.schedule(first.expected_s)
    assert second.moves == () and {g.request_ids: g.device_ids for g in second.groups} == \
        {g.request_ids: g.device_ids for g in first.groups}


def test_admission_fits_refuses_and_says_honestly_when_to_retry():
    cost = toy()
    policy = TetriPolicy(1, cost, round_s=0.1)
    policy.add_request(req("a", 1024, 10, 1.1))  # 1.01 s on the only device
    policy.schedule(0.0)
    # Impossible even alone: no retry time.
    impossible = policy.admission_check(1024, 1024, 10, deadline_s=0.5, now_s=0.0)
    assert not impossible.fits and impossible.retry_after_s is None and impossible.reason == "deadline_impossible"
    # Alone it would fit (1.01 s), but not beside "a": refused, retry once "a" is done.
    busy = policy.admission_check(1024, 1024, 10, deadline_s=1.2, now_s=0.0)
    assert not busy.fits and busy.reason == "busy"
    assert busy.retry_after_s == pytest.approx(1.01, abs=0.11)  # when "a" ends (as planned)
    # Retrying then, it does fit (the estimate is honest, not a constant).
    later = TetriPolicy(1, cost, round_s=0.1)
    assert later.admission_check(1024, 1024, 10, deadline_s=busy.retry_after_s + 1.2,
                                 now_s=busy.retry_after_s).fits
    # A request with room to spare fits now.
    assert policy.admission_check(256, 256, 5, deadline_s=5.0, now_s=0.0).fits


def test_admission_check_does_not_change_the_plan():
    policy = TetriPolicy(2, toy(), round_s=0.1)
    policy.add_request(req("a", 1024, 10, 1.1))
    policy.admission_check(2048, 2048, 10, deadline_s=9.0, now_s=0.0)
    plan = policy.schedule(0.0)
    assert plan.request_ids == ("a",) and not plan.given_up


@pytest.fixture(scope="module")
def h200():
    return CostModel.from_json(os.path.join(REPO, "bench", "profiles", "flux-dev-2xH200.json"))


@pytest.mark.parametrize("mix,arrival", [("skewed", "poisson"), ("uniform", "gamma"), ("mixed", "poisson")])
def test_bound_is_above_every_policy(h200, mix, arrival):
    trace = generate_trace(60, 6.0, mix, seed=4, arrival=arrival, cost=h200, max_degree=2)
    for scale in (1.0, 1.5):
        bound = sar_bound(trace, h200, 2, scale)
        assert 0.0 < bound.sar <= 1.0
        for name in ("tetri", "tetri-paper", "fixed1", "fixed2", "rssp", "edf1", "srpt"):
            assert simulate(trace, make_policy(name, 2, h200), slo_scale=scale).sar <= bound.sar + 1e-9, name
        assert sar_bound(trace, h200, 2, scale, integral=True, time_limit_s=30).sar <= bound.sar + 1e-6


def test_bound_on_hand_cases():
    cost = toy()
    # Alone with room: 1. Two that each need the single device for 1.01 s by 1.2 s: only one.
    assert sar_bound([TraceRequest(0.0, 1024, 1024, 10, 1200.0)], cost, 1).sar == pytest.approx(1.0)
    two = [TraceRequest(0.0, 1024, 1024, 10, 1200.0, "a"), TraceRequest(0.0, 1024, 1024, 10, 1200.0, "b")]
    lp = sar_bound(two, cost, 1)
    assert lp.sar < 1.0 and sar_bound(two, cost, 1, integral=True).sar == pytest.approx(0.5)
    # Impossible even alone: 0.
    assert sar_bound([TraceRequest(0.0, 1024, 1024, 10, 500.0)], cost, 1).sar == 0.0


def test_tetri_beats_the_paper_under_overload(h200):
    trace = generate_trace(120, 6.0, "skewed", seed=7, cost=h200, max_degree=2)
    ours = simulate(trace, make_policy("tetri", 2, h200), slo_scale=1.2)
    paper = simulate(trace, make_policy("tetri-paper", 2, h200), slo_scale=1.2)
    assert ours.sar > paper.sar and ours.slowdowns()["p99"] < paper.slowdowns()["p99"]
