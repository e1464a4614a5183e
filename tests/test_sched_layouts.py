"""Parallel layouts in the scheduler (issue 16): the cost model's CFG-parallel step and patch-parallel
decode rows, `tetri` choosing them by the same time / GPU-cost / deadline logic as degrees, the plan
saying which layout each group runs, and the baselines keeping sequence parallelism only."""
from __future__ import annotations

import os

import pytest

from tetri_engine.sched import CostModel, GroupSpec, RoundResult, SchedRequest, TetriPolicy, make_policy
from tetri_engine.sched.simulator import simulate
from tetri_engine.sched.trace import TraceRequest
from tetri_engine.sched.triage import Job, fit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SD3-like: on 2 devices the guidance branches side by side (cfg 2) beat Ulysses-2 at every size; a
# patch-parallel decode halves the 2048^2 decode.
PROFILE = {
    "model": "toy-sd3", "machine": "test",
    "step_ms": [
        {"width": 512, "height": 512, "degree": 1, "ms": 20.0},
        {"width": 512, "height": 512, "degree": 2, "ms": 18.0},
        {"width": 512, "height": 512, "degree": 2, "cfg": 2, "ms": 11.0},
        {"width": 1024, "height": 1024, "degree": 1, "ms": 44.5},
        {"width": 1024, "height": 1024, "degree": 2, "ms": 32.9},
        {"width": 1024, "height": 1024, "degree": 2, "cfg": 2, "ms": 23.0},
        {"width": 2048, "height": 2048, "degree": 1, "ms": 307.0},
        {"width": 2048, "height": 2048, "degree": 2, "ms": 184.0},
        {"width": 2048, "height": 2048, "degree": 2, "cfg": 2, "ms": 160.0},
    ],
    "decode_ms": [
        {"width": 512, "height": 512, "ms": 70.0}, {"width": 2048, "height": 2048, "ms": 1110.0},
        {"width": 512, "height": 512, "degree": 2, "ms": 90.0},  # slower split: one device wins there
        {"width": 2048, "height": 2048, "degree": 2, "ms": 580.0},
    ],
    "encode_ms": 10.0,
}


def cost() -> CostModel:
    return CostModel.from_dict(PROFILE)


def test_layout_rows_are_read_and_priced():
    c = cost()
    assert c.degrees == (1, 2) and c.cfg_degrees == (2,) and c.decode_degrees == (1, 2)
    assert c.step_s(1024, 1024, 2, cfg=2) == pytest.approx(0.023)
    assert c.step_s(1024, 1024, 2) == pytest.approx(0.0329)
    assert c.step_options(1024, 1024, 2, cfg=True) == {1: (pytest.approx(0.0445), 1), 2: (pytest.approx(0.023), 2)}
    assert c.step_options(1024, 1024, 2) == {1: (pytest.approx(0.0445), 1), 2: (pytest.approx(0.0329), 1)}
    assert c.step_options(1024, 1024, 2, cached=True, cfg=True)[2][1] == 1  # the cache has no CFG layout
    assert c.decode_s(2048, 2048, 2) == pytest.approx(0.58)
    assert c.group_decode(2048, 2048, 2) == (2, pytest.approx(0.58))
    assert c.group_decode(512, 512, 2) == (1, pytest.approx(0.07))
    assert c.group_decode(2048, 2048, 1) == (1, pytest.approx(1.11))
    assert c.fastest_step(2048, 2048, 2, cfg=True) == (2, pytest.approx(0.160))
    assert c.isolated_s(2048, 2048, 10, 2, cfg=True) == pytest.approx(10 * 0.160 + 0.58)
    again = CostModel.from_dict(c.to_dict())
    assert again.cfg_step_ms == c.cfg_step_ms and again.parallel_decode_ms == c.parallel_decode_ms
    plain = c.without_layouts()
    assert plain.cfg_degrees == () and plain.decode_degrees == (1,) and plain.step_ms == c.step_ms


def test_a_profile_without_layout_rows_offers_none():
    flux = CostModel.from_json(os.path.join(REPO, "bench", "profiles", "flux-dev-2xH200.json"))
    assert flux.cfg_degrees == () and flux.decode_degrees == (1,)
    assert all(layout == 1 for _, layout in flux.step_options(1024, 1024, 2, cfg=True).values())
    with pytest.raises(ValueError, match="no step times for degree 2 batch 1 cfg 2"):
        flux.step_s(1024, 1024, 2, cfg=2)
    with pytest.raises(ValueError, match="no decode times at degree 2"):
        flux.decode_s(1024, 1024, 2)
    with pytest.raises(ValueError, match="cfg must be 1 or 2"):
        CostModel.from_dict({"step_ms": [{"width": 64, "height": 64, "degree": 1, "ms": 1.0},
                                         {"width": 64, "height": 64, "degree": 2, "cfg": 3, "ms": 1.0}]})
    with pytest.raises(ValueError, match="power of two >= 2"):
        CostModel({(64, 64, 1, 1): 1.0}, cfg_step_ms={(64, 64, 1, 1): 1.0})


def first_group(policy, rid):
    plan = policy.schedule(0.0)
    return plan, next(g for g in plan.groups if rid in g.request_ids)


def test_tetri_runs_a_cfg_request_in_its_fastest_layout_and_says_so():
    policy = make_policy("tetri", 2, cost(), round_s=1.0)
    # 28 steps + a 0.19 s decode on 2 devices: 1.11 s in Ulysses-2, 0.83 s side by side: CFG or miss
    policy.add_request(SchedRequest("cfg", 1024, 1024, 28, 0.0, 0.9, cfg=True))
    plan, group = first_group(policy, "cfg")
    assert (group.degree, group.cfg, group.sp_degree) == (2, 2, 1)
    assert group.layout == {"cfg": 2, "sp": 1, "decode": 0} and not plan.given_up
    assert group.expected_s == pytest.approx(group.num_steps * 0.023)

    plain = make_policy("tetri", 2, cost(), round_s=1.0)
    plain.add_request(SchedRequest("sp", 1024, 1024, 28, 0.0, 0.9))  # no true CFG: Ulysses only
    assert plain.schedule(0.0).given_up == {"sp"}


def test_tetri_decodes_on_the_devices_that_decode_fastest():
    policy = make_policy("tetri", 2, cost(), round_s=10.0)
    policy.add_request(SchedRequest("big", 2048, 2048, 4, 0.0, 3.0, cfg=True))
    plan, group = first_group(policy, "big")
    assert group.decode_after and group.decode_degree == 2 and group.layout["decode"] == 2
    assert group.expected_s == pytest.approx(4 * 0.160 + 0.58)
    small = make_policy("tetri", 2, cost(), round_s=10.0)
    small.add_request(SchedRequest("small", 512, 512, 4, 0.0, 3.0, cfg=True))
    assert first_group(small, "small")[1].decode_degree == 1  # one device decodes 512^2 faster


@pytest.mark.parametrize("name", ["fixed2", "tetri-paper", "rssp", "srpt"])
def test_the_baselines_keep_sequence_parallelism_and_one_device_decodes(name):
    policy = make_policy(name, 2, cost(), round_s=10.0)
    policy.add_request(SchedRequest("big", 2048, 2048, 4, 0.0, 30.0, cfg=True))
    plan = policy.schedule(0.0)
    assert all(g.cfg == 1 and g.decode_degree == 1 for g in plan.groups) and plan.groups


def test_admission_sees_the_cfg_layout():
    policy = make_policy("tetri", 2, cost(), round_s=1.0)
    # 28 steps at 1024^2 after a 10 ms encode: 0.92 s in Ulysses-2, 0.64 s side by side, then a 0.19 s
    # decode on 2 devices (0.28 s on one)
    assert policy.admission_check(1024, 1024, 28, 1.0, 0.0, cfg=True).fits
    assert policy.admission_check(1024, 1024, 28, 1.0, 0.0).reason == "deadline_impossible"
    assert policy.min_finish_s(1024, 1024, 28, 0.0, cfg=True) == pytest.approx(0.01 + 28 * 0.023 + 0.188)
    fixed = make_policy("fixed2", 2, cost())
    assert fixed.admission_check(1024, 1024, 28, 1.0, 0.0, cfg=True).reason == "deadline_impossible"
    assert fixed.min_finish_s(1024, 1024, 28, 0.0, cfg=True) == pytest.approx(0.01 + 28 * 0.0329 + 0.278)


def test_a_cfg_group_for_a_request_without_cfg_is_a_policy_bug():
    class Wrong(TetriPolicy):
        def _plan(self, now_s, idle, ready):
            return [GroupSpec((0, 1), (ready[0].request_id,), 1, cfg=2)]

    policy = Wrong(2, cost())
    policy.add_request(SchedRequest("x", 512, 512, 4, 0.0, 10.0))
    with pytest.raises(RuntimeError, match="cfg 2"):
        policy.schedule(0.0)


def test_candidate_groups_include_the_twins_of_a_four_device_cfg_layout():
    four = dict(PROFILE, step_ms=PROFILE["step_ms"] + [
        {"width": 512, "height": 512, "degree": 4, "ms": 17.0},
        {"width": 512, "height": 512, "degree": 4, "cfg": 2, "ms": 10.0}])
    groups = make_policy("tetri", 4, CostModel.from_dict(four)).candidate_groups()
    assert {(0, 1), (2, 3), (0, 1, 2, 3), (0, 2), (1, 3)} <= set(groups)
    assert (0, 2) not in make_policy("fixed4", 4, CostModel.from_dict(four)).candidate_groups()


def test_triage_decodes_at_the_degree_a_plan_ends_at():
    # 10 steps and a decode by 1.5 s: ending at degree 1 (1 s + 1 s decode) or at 2 with a 1 s decode
    # (0.6 + 1) misses; ending at degree 2 with its 0.5 s decode makes it, cheapest as 9 steps at 1, 1 at 2
    job = Job("j", 0.0, 1.5, 10, 1.0, ((1, 0.1), (2, 0.06)), decodes=((1, 1.0), (2, 0.5)))
    slot = fit(job, [0.0, 0.0])
    assert (slot.degree, slot.first_steps, slot.then_degree) == (1, 9, 2) and slot.end_s == pytest.approx(1.46)
    assert fit(Job("j", 0.0, 1.5, 10, 1.0, ((1, 0.1), (2, 0.06))), [0.0, 0.0]) is None
    assert job.fastest_end_s() == pytest.approx(1.1) and job.cost_s == pytest.approx(10 * 0.1 + 1.0)


def test_progress_is_reported_and_steps_count_per_layout():
    policy = make_policy("tetri", 2, cost(), round_s=1.0)
    policy.add_request(SchedRequest("cfg", 1024, 1024, 28, 0.0, 0.9, cfg=True))
    plan, group = first_group(policy, "cfg")
    policy.update_from_output(plan, RoundResult(plan.expected_s, steps_done={"cfg": group.num_steps}))
    assert policy.get("cfg").steps_at_degree == {2: group.num_steps}


def test_layouts_raise_sar_on_an_sd3_trace():
    """1024^2 SD3 requests with true CFG, 28 steps, 1 s deadlines, one every 0.9 s, on 2 devices: 1.12 s
    in Ulysses-2 (1.52 s on one device), 0.84 s with the branches side by side: only the layout makes it."""
    trace = [TraceRequest(0.9 * i, 1024, 1024, 28, 1000.0, f"r{i}") for i in range(6)]
    with_layouts = simulate(trace, make_policy("tetri", 2, cost(), round_s=0.2), cfg=True)
    without = simulate(trace, make_policy("tetri", 2, cost().without_layouts(), round_s=0.2), cfg=True)
    assert with_layouts.sar > without.sar
