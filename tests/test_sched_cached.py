"""Requests with step caching (SchedRequest.cached, `cache: auto`) are planned with the cached step time
(the profile's cache_step_factor) by every policy; without a measured factor nothing changes."""
from __future__ import annotations

import pytest

from tetri_engine.sched import CostModel, RoundResult, SchedRequest, make_policy
from tetri_engine.sched.simulator import simulate
from tetri_engine.sched.trace import TraceRequest, generate_trace, read_trace, write_trace

MS = {
    (256, 256, 1, 1): 10, (256, 256, 2, 1): 12,
    (1024, 1024, 1, 1): 100, (1024, 1024, 2, 1): 60,
    (256, 256, 1, 2): 11, (256, 256, 1, 4): 20,
}
DECODE_MS = {(256, 256): 1.0, (1024, 1024): 10.0}
POLICIES = ("tetri", "tetri-paper", "fixed1", "fixed2", "edf1", "rssp", "srpt")


def cost(factor: float | None = None) -> CostModel:
    data = CostModel(dict(MS), dict(DECODE_MS)).to_dict()
    if factor is not None:
        data["cache_step_factor"] = factor
    return CostModel.from_dict(data)


def req(rid, side, steps, deadline_s, cached=False, arrival_s=0.0):
    return SchedRequest(rid, side, side, steps, arrival_s, deadline_s, cached=cached)


def run_alone(policy, request):
    """Drive one request to the end; (finish_s, groups as (devices, steps))."""
    policy.add_request(request)
    now, groups = 0.0, []
    while policy.has_work():
        plan = policy.schedule(now)
        assert not plan.is_empty
        groups += [(g.device_ids, g.num_steps, round(g.expected_s, 9)) for g in plan.groups]
        now = plan.start_s + plan.expected_s
        policy.update_from_output(plan, RoundResult(now, {rid: g.num_steps for g in plan.groups
                                                          for rid in g.request_ids}))
    return request.finish_s, groups


@pytest.mark.parametrize("name", POLICIES)
def test_min_finish_uses_the_cached_step_time(name):
    p = make_policy(name, 2, cost(0.5), round_s=0.3)
    plain = p.min_finish_s(1024, 1024, 20, 0.0)
    cached = p.min_finish_s(1024, 1024, 20, 0.0, cached=True)
    assert plain == pytest.approx(20 * 0.06 + 0.01)
    assert cached == pytest.approx(20 * 0.03 + 0.01)
    # Without a measured factor a cached request is promised nothing more.
    q = make_policy(name, 2, cost(), round_s=0.3)
    assert q.min_finish_s(1024, 1024, 20, 0.0, cached=True) == q.min_finish_s(1024, 1024, 20, 0.0) == plain


@pytest.mark.parametrize("name", POLICIES)
def test_a_cached_request_is_planned_and_run_at_the_cached_time(name):
    c = cost(0.5)
    finish = {}
    for cached in (False, True):
        p = make_policy(name, 2, c, round_s=0.3)
        finish[cached], groups = run_alone(p, req("a", 1024, 20, 100.0, cached=cached))
        for devs, steps, expected_s in groups:
            decode = 0.01 if expected_s > steps * c.step_s(1024, 1024, len(devs), cached=cached) + 1e-9 else 0.0
            assert expected_s == pytest.approx(steps * c.step_s(1024, 1024, len(devs), cached=cached) + decode)
    assert finish[True] < finish[False]


@pytest.mark.parametrize("name", ["tetri", "tetri-paper"])
def test_tetri_keeps_a_deadline_only_the_cached_time_meets(name):
    # 2 devices, 1024^2, 20 steps, deadline 0.8 s: uncached, even degree 2 takes 1.2 s (late, best
    # effort: one device in the paper's policy); cached (x0.5) degree 2 takes 0.6 s, so it must be
    # planned on time.
    c = cost(0.5)
    plans = {}
    for cached in (False, True):
        p = make_policy(name, 2, c, round_s=0.3)
        p.add_request(req("a", 1024, 20, 0.8, cached=cached))
        plans[cached] = p.schedule(0.0)
    assert plans[False].late == {"a"}
    if name == "tetri-paper":
        assert plans[False].groups[0].degree == 1
    else:
        assert plans[False].given_up == {"a"}  # given up at once, and said so
    assert not plans[True].late and not plans[True].given_up

    # Competition: one cached and one uncached request with the same tight deadline on 2 devices:
    # only the cached one can make it, and it does.
    trace = [TraceRequest(0.0, 1024, 1024, 20, 800.0, "plain"),
             TraceRequest(0.0, 1024, 1024, 20, 800.0, "cached", cache="auto")]
    result = simulate(trace, make_policy(name, 2, c, round_s=0.3))
    met = {r.request_id: r.met for r in result.requests}
    assert met == {"plain": False, "cached": True}
    # The same trace without a measured factor: neither can.
    result = simulate(trace, make_policy(name, 2, cost(), round_s=0.3))
    assert not any(r.met for r in result.requests)


def test_rssp_picks_the_cheapest_degree_at_the_cached_time():
    p = make_policy("rssp", 2, cost(0.5))
    # Default SLO of 1024^2 x 50 steps here: 1.5 x (50 x 60 ms + 10 ms) = 4.515 s. Uncached degree 1
    # takes 5.01 s (too slow) -> 2; cached degree 1 takes 2.51 s -> 1.
    assert p.degree_for(1024, 1024, 50) == 2
    assert p.degree_for(1024, 1024, 50, cached=True) == 1
    assert make_policy("rssp", 2, cost()).degree_for(1024, 1024, 50, cached=True) == 2


def mixed_trace(c, n=60):
    trace = generate_trace(n, 90.0, "uniform", seed=3, steps=20, sides_px=(256, 1024), cost=c, max_degree=2)
    return [TraceRequest(t.arrival_s, t.width, t.height, t.steps, t.slo_ms, t.request_id,
                         "auto" if i % 2 else "off") for i, t in enumerate(trace)]


def outcome(result):
    return ([(r.request_id, r.finish_s, r.state, r.steps_at_degree) for r in result.requests],
            [(b.device_id, b.start_s, b.end_s, b.request_ids, b.num_steps) for b in result.busy])


@pytest.mark.parametrize("name", POLICIES)
def test_without_a_measured_factor_cached_requests_plan_identically(name):
    c = cost()
    trace = mixed_trace(c)
    plain = [TraceRequest(t.arrival_s, t.width, t.height, t.steps, t.slo_ms, t.request_id) for t in trace]
    a = simulate(trace, make_policy(name, 2, c, round_s=0.3))
    b = simulate(plain, make_policy(name, 2, c, round_s=0.3))
    assert outcome(a) == outcome(b)


@pytest.mark.parametrize("name", ["tetri", "tetri-paper"])
def test_mixed_workload_cached_requests_gain(name):
    c = cost(0.5)
    trace = mixed_trace(c, 120)
    mixed = simulate(trace, make_policy(name, 2, c, round_s=0.3))
    plain = simulate([TraceRequest(t.arrival_s, t.width, t.height, t.steps, t.slo_ms, t.request_id) for t in trace],
                     make_policy(name, 2, c, round_s=0.3))
    assert mixed.sar > plain.sar


def test_tetri_paper_batches_cached_and_uncached_requests_apart():
    c = cost(0.5)
    trace = generate_trace(80, 600.0, "uniform", seed=3, steps=20, sides_px=(256,), cost=c, max_degree=1)
    trace = [TraceRequest(t.arrival_s, t.width, t.height, t.steps, t.slo_ms, t.request_id,
                          "auto" if i % 2 else "off") for i, t in enumerate(trace)]
    p = make_policy("tetri-paper", 1, c, round_s=0.3)
    batches = []
    schedule = p.schedule

    def recording_schedule(now_s):
        plan = schedule(now_s)
        for g in plan.groups:
            if len(g.request_ids) > 1:
                batches.append({p.get(rid).cached for rid in g.request_ids})
                flag = p.get(g.request_ids[0]).cached
                assert g.expected_s >= g.num_steps * c.step_s(256, 256, 1, len(g.request_ids), cached=flag) - 1e-9
        return plan

    p.schedule = recording_schedule
    simulate(trace, p)
    assert {True} in batches and {False} in batches  # both kinds were batched, never together
    assert all(len(flags) == 1 for flags in batches)


def test_trace_files_carry_the_cache_field(tmp_path):
    path = str(tmp_path / "t.jsonl")
    trace = [TraceRequest(0.0, 256, 256, 4, 100.0, "a"), TraceRequest(1.0, 256, 256, 4, 100.0, "b", cache="auto")]
    write_trace(path, trace)
    lines = open(path).read().splitlines()
    assert "cache" not in lines[0] and '"cache": "auto"' in lines[1]
    assert read_trace(path) == trace
    (tmp_path / "bad.jsonl").write_text('{"arrival_s": 0, "width": 256, "height": 256, "steps": 4, '
                                        '"slo_ms": 100, "cache": "on"}\n')
    with pytest.raises(ValueError, match="cache"):
        read_trace(str(tmp_path / "bad.jsonl"))
