"""Baselines: fixed SP FCFS (xDiT-style), EDF at a fixed degree, RSSP; make_policy names."""
from __future__ import annotations

import pytest

from tetri_engine.sched import CostModel, EDFPolicy, FixedSPPolicy, RoundResult, RSSPPolicy, SchedRequest, make_policy

MS = {
    (256, 256, 1, 1): 10, (256, 256, 2, 1): 12, (256, 256, 4, 1): 14,
    (1024, 1024, 1, 1): 100, (1024, 1024, 2, 1): 60, (1024, 1024, 4, 1): 40,
}


def cost():
    return CostModel(dict(MS), {(256, 256): 1.0, (1024, 1024): 10.0})


def req(rid, side, steps, deadline_s, arrival_s=0.0):
    return SchedRequest(rid, side, side, steps, arrival_s, deadline_s)


def finish_group(policy, plan, group, end_s):
    return policy.update_from_output(plan, RoundResult(end_s, {rid: group.num_steps for rid in group.request_ids}))


def test_fixed_sp_static_groups_fcfs_non_preemptive():
    p = make_policy("fixed2", 4, cost())
    assert isinstance(p, FixedSPPolicy) and p.groups == [(0, 1), (2, 3)]
    for i in range(3):
        p.add_request(req(f"r{i}", 1024, 20, 100.0, arrival_s=i))
    plan = p.schedule(0.0)
    # First come first served; each request gets all its steps (non-preemptive) and its decode.
    assert [(g.request_ids, g.device_ids, g.num_steps, g.decode_after) for g in plan.groups] == [
        (("r0",), (0, 1), 20, True), (("r1",), (2, 3), 20, True)]
    assert p.schedule(0.1).is_empty  # both groups busy
    done = finish_group(p, plan, plan.groups[1], 1.21)
    assert [r.request_id for r in done] == ["r1"]
    nxt = p.schedule(1.21)
    assert [(g.request_ids, g.device_ids) for g in nxt.groups] == [(("r2",), (2, 3))]


def test_edf_orders_by_deadline():
    p = make_policy("edf1", 1, cost())
    assert isinstance(p, EDFPolicy)
    p.add_request(req("late_deadline", 256, 5, 9.0, arrival_s=0.0))
    p.add_request(req("early_deadline", 256, 5, 1.0, arrival_s=0.5))
    assert p.schedule(1.0).request_ids == ("early_deadline",)
    q = make_policy("fixed1", 1, cost())
    q.add_request(req("late_deadline", 256, 5, 9.0, arrival_s=0.0))
    q.add_request(req("early_deadline", 256, 5, 1.0, arrival_s=0.5))
    assert q.schedule(1.0).request_ids == ("late_deadline",)


def test_rssp_degree_from_profile_and_head_of_line():
    p = make_policy("rssp", 4, cost())
    assert isinstance(p, RSSPPolicy)
    # 256^2: degree 1 meets its SLO alone. 1024^2 (50 steps): SLO = max(3.0 (table), 1.5 x 2.01 s
    # (fastest alone: degree 4)) = 3.015 s; degree 1 takes 5.01 s, degree 2 3.01 s -> 2.
    assert p.degree_for(256, 256, 50) == 1
    assert p.degree_for(1024, 1024, 50) == 2
    p = RSSPPolicy(4, cost(), degree_by_size={(1024, 1024): 4})
    p.add_request(req("small", 256, 50, 100.0, arrival_s=0.0))
    p.add_request(req("big", 1024, 50, 100.0, arrival_s=1.0))
    p.add_request(req("small2", 256, 50, 100.0, arrival_s=2.0))
    plan = p.schedule(2.0)
    # small runs on device 0; big needs all 4 and blocks the queue (no overtaking by small2).
    assert [(g.request_ids, g.device_ids) for g in plan.groups] == [(("small",), (0,))]
    finish_group(p, plan, plan.groups[0], 2.6)
    plan = p.schedule(2.6)
    assert [(g.request_ids, g.device_ids) for g in plan.groups] == [(("big",), (0, 1, 2, 3))]


def test_rssp_explicit_degrees():
    p = RSSPPolicy(4, cost(), degree_by_size={(1024, 1024): 2})
    assert p.degree_for(1024, 1024, 50) == 2


def test_make_policy_errors():
    with pytest.raises(ValueError, match="needs at least 8 devices"):
        make_policy("fixed8", 4, CostModel({**MS, (256, 256, 8, 1): 20, (1024, 1024, 8, 1): 35}))
    with pytest.raises(ValueError, match="not in profile"):
        make_policy("fixed8", 8, cost())
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("sjf", 4, cost())


def _finish_times(policy_name: str, scale: float) -> dict[str, float]:
    from pathlib import Path

    from tetri_engine.sched.simulator import simulate
    from tetri_engine.sched.trace import generate_trace

    profile = CostModel.from_json(str(Path(__file__).resolve().parents[1] / "bench/profiles/flux-dev-2xH200.json"))
    # A loaded trace (36 req/min on 2 GPUs): queues form, so any deadline-driven choice would show.
    trace = generate_trace(40, 36.0, "uniform", seed=3, cost=profile, max_degree=2)
    result = simulate(trace, make_policy(policy_name, 2, profile), slo_scale=scale)
    return {r.request_id: r.finish_s for r in result.requests}


@pytest.mark.parametrize("name", ["fixed1", "fixed2", "rssp", "edf1", "srpt", "tetri", "tetri-paper"])
def test_uses_deadlines_says_whether_the_slo_scale_changes_the_schedule(name):
    """bench/e2e_slo.py runs a policy with uses_deadlines False once and scores it at every SLO
    scale: that is only right if its schedule really does not depend on the deadlines."""
    policy = make_policy(name, 2, cost())
    tight, loose = _finish_times(name, 1.0), _finish_times(name, 1.5)
    if policy.uses_deadlines:
        assert tight != loose  # (on this trace every deadline-aware policy does change its schedule)
    else:
        assert tight == loose
