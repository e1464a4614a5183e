"""Routing over several hosts: each policy's estimate (`Policy.estimate`), the routing rules
(sched/routing.py) and the N-host simulator (sched/cluster_sim.py)."""
from __future__ import annotations

import os
import random

import pytest

from tetri_engine.sched import CostModel, SchedRequest, TetriPolicy, make_policy
from tetri_engine.sched.cluster_sim import simulate_cluster
from tetri_engine.sched.routing import Offer, Refusal, RoundRobin, choose_by_deadline, choose_pow2
from tetri_engine.sched.simulator import simulate
from tetri_engine.sched.trace import generate_trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_MS = {(256, 256, 1, 1): 10, (256, 256, 2, 1): 12, (1024, 1024, 1, 1): 100, (1024, 1024, 2, 1): 60}
TOY_DECODE_MS = {(256, 256): 1.0, (1024, 1024): 10.0}


def toy() -> CostModel:
    return CostModel(dict(TOY_MS), dict(TOY_DECODE_MS))  # no encode time


def req(rid: str, side: int, steps: int, deadline_s: float) -> SchedRequest:
    return SchedRequest(rid, side, side, steps, 0.0, deadline_s)


# ---- Policy.estimate ---------------------------------------------------------------------------------


def test_estimate_on_an_idle_machine_is_its_cheapest_plan():
    policy = TetriPolicy(2, toy(), round_s=0.1)
    e = policy.estimate(1024, 1024, 10, deadline_s=2.0, now_s=0.0)
    # The cheapest degree that makes it: 1 device, 10 x 0.1 s + 0.01 s decode.
    assert e.fits and e.reason == "fits" and e.retry_after_s is None and e.displaced == 0
    assert e.finish_s == pytest.approx(1.01) and e.cost_s == pytest.approx(1.01) and e.delay_s == 0
    tight = policy.estimate(1024, 1024, 10, deadline_s=0.7, now_s=0.0)  # only degree 2 makes it
    assert tight.fits and tight.finish_s <= 0.7 and tight.cost_s > 1.01


def test_estimate_says_what_a_request_costs_the_requests_held():
    policy = TetriPolicy(1, toy(), round_s=0.1)
    policy.add_request(req("a", 1024, 10, deadline_s=3.0))  # 1.01 s on the only device
    urgent = policy.estimate(256, 256, 5, deadline_s=0.2, now_s=0.0)
    # It goes first (earlier deadline): "a" ends 0.051 s later, still in time.
    assert urgent.fits and urgent.finish_s == pytest.approx(0.051)
    assert urgent.delay_s == pytest.approx(0.051) and urgent.displaced == 0
    relaxed = policy.estimate(256, 256, 5, deadline_s=5.0, now_s=0.0)
    assert relaxed.fits and relaxed.delay_s == 0 and relaxed.finish_s == pytest.approx(1.01 + 0.051)
    assert policy.schedule(0.0).request_ids == ("a",)  # asking changed nothing


def test_estimate_counts_pending_requests_and_agrees_with_admission():
    policy = TetriPolicy(1, toy(), round_s=0.1)
    pending = [req("p", 1024, 10, deadline_s=1.1)]  # accepted, prompt still encoding
    alone = policy.estimate(1024, 1024, 10, deadline_s=1.2, now_s=0.0)
    beside = policy.estimate(1024, 1024, 10, deadline_s=1.2, now_s=0.0, pending=pending)
    assert alone.fits == policy.admission_check(1024, 1024, 10, 1.2, 0.0).fits is True
    assert not beside.fits and beside.reason == "busy" and beside.retry_after_s > 0
    # Given up beside "p", it would run after it, on one device: ends at about 2 x 1.01 s.
    assert beside.finish_s == pytest.approx(2.02, abs=0.02)
    impossible = policy.estimate(1024, 1024, 10, deadline_s=0.5, now_s=0.0)
    assert not impossible.fits and impossible.reason == "deadline_impossible" and impossible.retry_after_s is None


def test_the_base_estimate_is_first_come_first_served():
    policy = make_policy("fixed1", 1, toy())
    policy.add_request(req("a", 1024, 10, deadline_s=3.0))
    e = policy.estimate(1024, 1024, 10, deadline_s=1.5, now_s=0.0)
    # After the 1.01 s of work held, then its own 1.01 s: 0.52 s late, so it fits in about 0.52 s.
    assert e.finish_s == pytest.approx(2.02) and not e.fits and e.reason == "busy"
    assert e.retry_after_s == pytest.approx(0.52) and e.delay_s == 0
    assert policy.estimate(1024, 1024, 10, deadline_s=2.5, now_s=0.0).fits


# ---- the routing rules -------------------------------------------------------------------------------


def offer(name, *, fits=True, accepts=None, finish=1.0, cost=1.0, delay=0.0, retry=None, reason=None, held=0):
    accepts = fits if accepts is None else accepts
    return Offer(accepts, fits, finish, cost, delay, retry, reason or ("fits" if fits else "busy"), 10.0, held,
                 replica=name)


def test_deadline_routing_meets_the_deadline_at_the_least_cost():
    rng = random.Random(0)
    offers = [offer("late", fits=False, accepts=True, finish=0.5, cost=0.1),
              offer("dear", cost=3.0, finish=0.9), offer("cheap", cost=1.0, finish=2.0)]
    assert choose_by_deadline(offers, rng).replica == "cheap"
    tied = [offer("delays", cost=1.0, delay=0.5), offer("free", cost=1.0, delay=0.0)]
    assert choose_by_deadline(tied, rng).replica == "free"
    loaded = [offer("busy", held=5), offer("idle", held=0)]
    assert choose_by_deadline(loaded, rng).replica == "idle"
    # Costs within COST_TOLERANCE (replicas' profiles differ by measurement noise) count as equal.
    noisy = [offer("measured-fast", cost=1.0, held=4), offer("measured-slow", cost=1.05, held=0)]
    assert choose_by_deadline(noisy, rng).replica == "measured-slow"
    shrinking = [offer("a", cost=-0.5, held=3), offer("b", cost=-0.48, held=0), offer("c", cost=0.2)]
    assert choose_by_deadline(shrinking, rng).replica == "b"  # a plan may get cheaper with it


def test_deadline_routing_falls_back_to_the_earliest_finish_then_refuses():
    rng = random.Random(0)
    taking = [offer("slow", fits=False, accepts=True, finish=9.0), offer("soon", fits=False, accepts=True, finish=3.0),
              offer("full", fits=False, accepts=False, finish=1.0, reason="queue_full", retry=0.5)]
    assert choose_by_deadline(taking, rng).replica == "soon"
    refused = choose_by_deadline([offer("a", fits=False, retry=4.0), offer("b", fits=False, retry=2.5),
                                  offer("c", fits=False, reason="deadline_impossible")], rng)
    assert refused == Refusal("busy", 2.5)  # the soonest any replica estimated
    assert choose_by_deadline([offer("a", fits=False, reason="deadline_impossible")], rng) == \
        Refusal("deadline_impossible", None)
    assert choose_by_deadline([offer("a", fits=False, reason="draining")], rng) == Refusal("draining", None)
    with pytest.raises(ValueError):
        choose_by_deadline([], rng)


def test_pow2_takes_the_shorter_of_two_queues_and_round_robin_cycles():
    rng = random.Random(0)
    assert all(choose_pow2({"a": 3, "b": 1}, rng) == "b" for _ in range(20))
    picks = {choose_pow2({"a": 0, "b": 0, "c": 9}, rng) for _ in range(100)}
    assert picks == {"a", "b"}  # c is the longer queue of any pair it is drawn in
    rr = RoundRobin()
    assert [rr.choose(["x", "y", "z"]) for _ in range(5)] == ["x", "y", "z", "x", "y"]


# ---- the N-host simulator ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h200() -> CostModel:
    return CostModel.from_json(os.path.join(REPO, "bench", "profiles", "flux-dev-2xH200.json"))


def test_one_host_taking_everything_is_the_single_host_simulator(h200):
    trace = generate_trace(80, 3.0, "skewed", seed=1, cost=h200, max_degree=2)
    one = simulate(trace, make_policy("tetri", 2, h200), slo_scale=1.1)
    cluster = simulate_cluster(trace, lambda: make_policy("tetri", 2, h200), 1, "round-robin", slo_scale=1.1,
                               admission="best_effort")
    assert cluster.sar == one.sar and cluster.rejected == 0
    assert [r.finish_s for r in cluster.requests] == [r.finish_s for r in one.requests]


def test_deadline_routing_beats_queue_length_and_round_robin(h200):
    # 4 hosts x 2 GPUs at the paper's per-GPU rate, Skewed mix (bench/sim_cluster.py runs more seeds).
    trace = generate_trace(300, 12.0, "skewed", seed=0, cost=h200, max_degree=2)
    results = {routing: simulate_cluster(trace, lambda: make_policy("tetri", 2, h200), 4, routing, seed=0)
               for routing in ("deadline", "pow2", "round-robin")}
    assert results["deadline"].sar > max(results["pow2"].sar, results["round-robin"].sar)
    assert results["deadline"].rejected < results["round-robin"].rejected
    for result in results.values():
        assert sum(result.requests_per_host()) == 300 - sum(h is None for h in result.host_of.values())
        refused = [r for r in result.requests if r.state == "rejected"]
        assert len(refused) == result.rejected and not any(r.met for r in refused)  # refused = missed
    assert results["round-robin"].requests_per_host() == [75, 75, 75, 75]


def test_cluster_simulator_refuses_bad_options(h200):
    with pytest.raises(ValueError, match="routing"):
        simulate_cluster([], lambda: make_policy("tetri", 2, h200), 2, "random")
    with pytest.raises(ValueError, match="admission"):
        simulate_cluster([], lambda: make_policy("tetri", 2, h200), 2, "pow2", admission="maybe")
