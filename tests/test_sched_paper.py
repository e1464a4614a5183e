"""The paper-faithful TetriServe policy (`tetri-paper`): each step of a round on hand-built cases with
known answers, and the protocol."""
from __future__ import annotations

import itertools
import random

import pytest

from tetri_engine.sched import CostModel, PaperTetriPolicy as TetriPolicy, RoundResult, SchedRequest, SchedState, make_policy

# Toy profile (ms). 256^2 is launch-bound (more devices: slower; batch 2 almost free); 1024^2 and
# 2048^2 scale sub-linearly.
TOY_MS = {
    (256, 256, 1, 1): 10, (256, 256, 2, 1): 12, (256, 256, 4, 1): 14, (256, 256, 8, 1): 16,
    (1024, 1024, 1, 1): 100, (1024, 1024, 2, 1): 60, (1024, 1024, 4, 1): 40, (1024, 1024, 8, 1): 35,
    (2048, 2048, 1, 1): 800, (2048, 2048, 2, 1): 420, (2048, 2048, 4, 1): 230, (2048, 2048, 8, 1): 140,
    (256, 256, 1, 2): 11, (256, 256, 1, 4): 20,
}
TOY_DECODE_MS = {(256, 256): 1.0, (1024, 1024): 10.0, (2048, 2048): 40.0}


def toy(**kw) -> CostModel:
    return CostModel(dict(TOY_MS), dict(TOY_DECODE_MS))


def req(rid, side, steps, deadline_s, arrival_s=0.0):
    return SchedRequest(rid, side, side, steps, arrival_s, deadline_s)


def run_plan(policy, plan, end_s=None):
    end = plan.start_s + plan.expected_s if end_s is None else end_s
    return policy.update_from_output(plan, RoundResult(end, {rid: g.num_steps for g in plan.groups for rid in g.request_ids}))


def groups_by_request(plan):
    return {rid: g for g in plan.groups for rid in g.request_ids}


# ---- 1. allocation ------------------------------------------------------------------------------

def test_allocation_known_answer():
    p = TetriPolicy(8, toy(), round_s=0.1)
    # 10 steps of 1024^2 in 0.8 s: all at degree 1 takes 1.0 s; 5 at 1 + 5 at 2 takes 0.8 s
    # for 0.5 + 5 * 0.12 = 1.1 GPU-s (cheapest); all at 2 would cost 1.2 GPU-s.
    gpu_s, segs = p.allocate(1024, 1024, 10, 0.8)
    assert segs == [(1, 5), (2, 5)] and gpu_s == pytest.approx(1.1)
    assert p.allocate(1024, 1024, 10, 1.0) == (pytest.approx(1.0), [(1, 10)])
    assert p.allocate(1024, 1024, 10, 0.34) is None  # faster than 10 x 35 ms is impossible
    # 256^2 never benefits from parallelism: its hull is degree 1 only.
    assert [h.degree for h in p.hull(256, 256)] == [1]


def test_allocation_matches_brute_force():
    cost = toy()
    p = TetriPolicy(8, cost, round_s=0.1)
    rng = random.Random(1)
    for _ in range(300):
        side = rng.choice([1024, 2048])
        steps = rng.randint(1, 10)
        t = {k: cost.step_s(side, side, k) for k in (1, 2, 4, 8)}
        budget = rng.uniform(steps * t[8] * 0.9, steps * t[1] * 1.1)
        best = None
        for n in itertools.product(range(steps + 1), repeat=3):
            if sum(n) > steps:
                continue
            counts = dict(zip((1, 2, 4), n))
            counts[8] = steps - sum(n)
            if sum(counts[k] * t[k] for k in counts) <= budget + 1e-9:
                c = sum(counts[k] * k * t[k] for k in counts)
                best = c if best is None else min(best, c)
        got = p.allocate(side, side, steps, budget)
        assert (got is None) == (best is None)
        if got:
            assert got[0] == pytest.approx(best)
            assert sum(n for _, n in got[1]) == steps
            assert sum(n * t[d] for d, n in got[1]) <= budget + 1e-9


# ---- 2. packing ---------------------------------------------------------------------------------

def test_packing_saves_more_requests():
    # 2 devices, round 50 ms. A (1024^2) survives only if it runs on both devices now; B and C
    # (256^2) each survive only if they run now on one device. Two survivors beat one.
    p = TetriPolicy(2, toy(), round_s=0.05, scale_up=False)
    p.add_request(req("A", 1024, 10, 10 * 0.060 + 0.010 + 0.001))
    p.add_request(req("B", 256, 10, 0.105))
    p.add_request(req("C", 256, 10, 0.105))
    plan = p.schedule(0.0)
    assert sorted(plan.request_ids) == ["B", "C"]


def test_packing_prefers_the_request_that_cannot_wait():
    # 1 device: A's deadline leaves no room for waiting a round, B has plenty of slack.
    p = TetriPolicy(1, toy(), round_s=0.05, batching=False)
    p.add_request(req("B", 256, 10, 5.0))
    p.add_request(req("A", 256, 10, 0.12))
    plan = p.schedule(0.0)
    assert plan.request_ids == ("A",)


# ---- 3. placement preservation ------------------------------------------------------------------

def test_requests_keep_their_devices_between_rounds():
    p = TetriPolicy(8, toy(), round_s=0.1, scale_up=False)
    p.add_request(req("A", 1024, 40, 40 * 0.06 + 0.5))  # needs degree 2 for part of its steps
    p.add_request(req("B", 256, 40, 5.0))
    first = p.schedule(0.0)
    placed = {rid: g.device_ids for rid, g in groups_by_request(first).items()}
    run_plan(p, first)
    second = p.schedule(first.start_s + first.expected_s)
    assert second.moves == ()
    for rid, g in groups_by_request(second).items():
        if len(g.device_ids) == len(placed[rid]):
            assert g.device_ids == placed[rid]


def test_moves_are_reported_when_a_group_changes():
    p = TetriPolicy(8, toy(), round_s=0.1, scale_up=False)
    r = req("A", 1024, 30, 100.0)
    p.add_request(r)
    plan = p.schedule(0.0)
    run_plan(p, plan)
    # Now it needs degree 8 for every step left (one step at degree 4 would be 5 ms too slow).
    r.deadline_s = plan.expected_s + r.remaining_steps * 0.035 + 0.010 + 0.001
    plan2 = p.schedule(plan.expected_s)
    assert plan2.degrees["A"] == 8
    assert [(m.request_id, m.src_device_ids, m.dst_device_ids) for m in plan2.moves] == [
        ("A", plan.groups[0].device_ids, tuple(range(8)))]


# ---- 4. elastic scale-up ------------------------------------------------------------------------

def test_idle_devices_scale_up_a_request_that_benefits():
    p = TetriPolicy(8, toy(), round_s=0.2)
    p.add_request(req("A", 1024, 50, 100.0))  # cheapest plan: degree 1
    plan = p.schedule(0.0)
    assert plan.degrees["A"] == 8 and plan.groups[0].device_ids == tuple(range(8))
    q = TetriPolicy(8, toy(), round_s=0.2, scale_up=False)
    q.add_request(req("A", 1024, 50, 100.0))
    assert q.schedule(0.0).degrees["A"] == 1


def test_scale_up_skips_resolutions_that_get_slower():
    p = TetriPolicy(8, toy(), round_s=0.2)
    p.add_request(req("A", 256, 50, 100.0))
    assert p.schedule(0.0).degrees["A"] == 1


def test_scale_up_biggest_benefit_first():
    # 3 devices: 2048^2 and 1024^2 at degree 1 each, 1 idle: the 2048^2 saves more per device
    # (50 x (800 - 420) ms vs 50 x (100 - 60) ms), so it gets the idle device.
    p = TetriPolicy(3, toy(), round_s=1.0)
    p.add_request(req("small", 1024, 50, 100.0))
    p.add_request(req("big", 2048, 50, 1000.0))
    assert dict(p.schedule(0.0).degrees) == {"big": 2, "small": 1}
    # 4 devices: big doubles first, then the last idle device doubles small.
    p = TetriPolicy(4, toy(), round_s=1.0)
    p.add_request(req("small", 1024, 50, 100.0))
    p.add_request(req("big", 2048, 50, 1000.0))
    assert dict(p.schedule(0.0).degrees) == {"big": 2, "small": 2}


# ---- 5. late requests ---------------------------------------------------------------------------

def test_late_request_gets_one_device_at_most():
    p = TetriPolicy(8, toy(), round_s=0.1)
    p.add_request(req("L", 1024, 50, 0.5))  # 50 x 35 ms > 0.5 s: late from the start
    plan = p.schedule(0.0)
    assert plan.degrees == {"L": 1} and plan.late == frozenset({"L"})


def test_late_request_never_takes_a_device_an_on_time_one_needs():
    p = TetriPolicy(2, toy(), round_s=0.1)
    p.add_request(req("L", 1024, 50, 0.5))
    p.add_request(req("A", 1024, 10, 10 * 0.060 + 0.010 + 0.001))  # needs both devices now
    plan = p.schedule(0.0)
    assert plan.degrees == {"A": 2}


# ---- 6. selective batching ----------------------------------------------------------------------

def test_batches_identical_small_requests_when_devices_are_short():
    p = TetriPolicy(1, toy(), round_s=0.1)
    p.add_request(req("A", 256, 20, 1.0))
    p.add_request(req("B", 256, 20, 1.0))
    plan = p.schedule(0.0)
    assert len(plan.groups) == 1 and sorted(plan.groups[0].request_ids) == ["A", "B"]
    assert plan.groups[0].expected_s == pytest.approx(plan.groups[0].num_steps * 0.011)


def test_no_batching_when_devices_suffice():
    p = TetriPolicy(2, toy(), round_s=0.1)
    p.add_request(req("A", 256, 20, 1.0))
    p.add_request(req("B", 256, 20, 1.0))
    plan = p.schedule(0.0)
    assert sorted(len(g.request_ids) for g in plan.groups) == [1, 1]


def test_no_batching_when_it_would_break_a_deadline():
    p = TetriPolicy(1, toy(), round_s=0.1)
    p.add_request(req("A", 256, 20, 0.205))  # alone: 0.2 s + 1 ms decode; batched: 0.22 s
    p.add_request(req("B", 256, 20, 5.0))
    plan = p.schedule(0.0)
    assert plan.request_ids == ("A",)


# ---- decode and rounds --------------------------------------------------------------------------

def test_last_round_decodes_and_accounts_decode_time():
    p = TetriPolicy(1, toy(), round_s=0.1)
    p.add_request(req("A", 1024, 1, 1.0))
    plan = p.schedule(0.0)
    g = plan.groups[0]
    assert g.decode_after and g.num_steps == 1
    assert g.expected_s == pytest.approx(0.100 + 0.010)
    done = run_plan(p, plan)
    assert [r.request_id for r in done] == ["A"] and done[0].state is SchedState.COMPLETED
    assert done[0].finish_s == pytest.approx(0.110) and done[0].deadline_met


def test_round_fill_uses_the_longest_groups_length():
    p = TetriPolicy(2, toy(), round_s=0.05, scale_up=False)
    p.add_request(req("big", 1024, 50, 100.0))  # one 100 ms step > round: sets the round length
    p.add_request(req("small", 256, 50, 100.0))  # 10 ms steps: 5 fit in 50 ms, 10 in 100 ms
    plan = p.schedule(0.0)
    steps = {rid: g.num_steps for rid, g in groups_by_request(plan).items()}
    assert steps == {"big": 1, "small": 10}


def test_round_length_from_round_steps():
    cost = toy()
    p = make_policy("tetri-paper", 4, cost, round_steps=5)
    assert p.round_s == pytest.approx(5 * cost.typical_step_s())


# ---- protocol -----------------------------------------------------------------------------------

def test_synchronous_rounds_and_partial_results():
    p = TetriPolicy(2, toy(), round_s=0.1, scale_up=False)
    p.add_request(req("A", 256, 50, 10.0))
    p.add_request(req("B", 1024, 50, 10.0))
    plan = p.schedule(0.0)
    assert len(plan.groups) == 2 and not plan.backfill
    round_end = plan.expected_s
    assert p.schedule(0.01).is_empty  # round in flight, nobody waiting
    ga, gb = groups_by_request(plan)["A"], groups_by_request(plan)["B"]
    # A's group reports early (say it ran faster than planned): only its device is freed.
    p.update_from_output(plan, RoundResult(0.02, {"A": ga.num_steps}))
    assert p.busy_devices == frozenset(gb.device_ids)
    # Mid-round, A may only backfill the idle device with steps that end by the round's end.
    fill = p.schedule(0.02)
    assert fill.backfill and fill.request_ids == ("A",) and fill.groups[0].device_ids == ga.device_ids
    assert 0.02 + fill.expected_s <= round_end + 1e-9
    assert fill.groups[0].num_steps == int((round_end - 0.02) / 0.010 + 1e-9)
    p.update_from_output(fill, RoundResult(round_end, {"A": fill.groups[0].num_steps}))
    assert p.schedule(round_end).is_empty  # B's group is still running: no new round yet
    p.update_from_output(plan, RoundResult(round_end + 0.01, {"B": gb.num_steps}))
    nxt = p.schedule(round_end + 0.01)
    assert not nxt.is_empty and not nxt.backfill
    with pytest.raises(ValueError):
        p.update_from_output(plan, RoundResult(0.2, {"A": 1}))  # no longer in flight


def test_new_arrival_mid_round_is_backfilled():
    p = TetriPolicy(2, toy(), round_s=0.1, scale_up=False)
    p.add_request(req("A", 1024, 50, 10.0))
    plan = p.schedule(0.0)
    assert plan.degrees == {"A": 1}
    p.add_request(req("B", 256, 50, 10.0, arrival_s=0.03))
    fill = p.schedule(0.03)
    assert fill.backfill and fill.request_ids == ("B",)
    assert 0.03 + fill.expected_s <= plan.expected_s + 1e-9
    # Without backfill (the paper's strict rounds) B waits for the next round.
    q = TetriPolicy(2, toy(), round_s=0.1, scale_up=False, backfill=False)
    q.add_request(req("A", 1024, 50, 10.0))
    q.schedule(0.0)
    q.add_request(req("B", 256, 50, 10.0, arrival_s=0.03))
    assert q.schedule(0.03).is_empty


def test_abort_and_failure():
    p = TetriPolicy(2, toy(), round_s=0.05, scale_up=False)
    p.add_request(req("A", 256, 50, 10.0))
    p.add_request(req("B", 256, 50, 10.0))
    plan = p.schedule(0.0)
    assert p.abort("A") and not p.abort("nope")
    done = p.update_from_output(plan, RoundResult(0.05, {"A": 5}, failed={"B"}))
    assert [(r.request_id, r.state) for r in done] == [("B", SchedState.FAILED)]
    assert not p.has_work() and p.busy_devices == frozenset()


def test_admission_helpers_and_errors():
    p = TetriPolicy(8, toy(), round_s=0.1)
    assert p.min_finish_s(1024, 1024, 10, now_s=1.0) == pytest.approx(1.0 + 10 * 0.035 + 0.010)
    with pytest.raises(ValueError, match="outside the profiled range"):
        p.add_request(req("X", 4096, 10, 1.0))
    p.add_request(req("A", 256, 10, 1.0))
    with pytest.raises(ValueError, match="already"):
        p.add_request(req("A", 256, 10, 1.0))
    assert (0, 1, 2, 3, 4, 5, 6, 7) in p.candidate_groups()


def test_no_deadline_is_best_effort_but_runs():
    p = TetriPolicy(2, toy(), round_s=0.1)
    p.add_request(SchedRequest("A", 256, 256, 10, 0.0, None))
    plan = p.schedule(0.0)
    assert plan.request_ids == ("A",)
