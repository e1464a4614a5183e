"""Simulator invariants for every policy on random traces, determinism, and the trace generator."""
from __future__ import annotations

import os
from collections import defaultdict

import pytest

from tetri_engine.sched import CostModel, make_policy
from tetri_engine.sched.simulator import simulate
from tetri_engine.sched.trace import TraceRequest, generate_trace, mix_probabilities, read_trace, write_trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H200 = os.path.join(REPO, "bench", "profiles", "flux-dev-h200-modelled.json")
POLICIES = ["tetri", "tetri-paper", "fixed1", "fixed2", "fixed4", "fixed8", "rssp", "edf1", "edf2", "srpt"]


@pytest.fixture(scope="module")
def cost():
    return CostModel.from_json(H200)


def check_invariants(result, trace, cost, num_devices):
    # Every request ends, completed, with exactly its steps, at profiled degrees <= N.
    assert len(result.requests) == len(trace)
    for r in result.requests:
        assert r.state == "completed", r
        assert sum(r.steps_at_degree.values()) == r.steps
        assert all(d in cost.degrees and d <= num_devices for d in r.steps_at_degree)
        assert r.finish_s >= r.arrival_s
    # No device runs two things at once; device ids in range; a request is never on two groups at once.
    per_device = defaultdict(list)
    per_request = defaultdict(set)
    for b in result.busy:
        assert 0 <= b.device_id < num_devices and b.end_s > b.start_s and b.degree <= num_devices
        per_device[b.device_id].append((b.start_s, b.end_s))
        for rid in b.request_ids:
            per_request[rid].add((b.start_s, b.end_s, b.num_steps))
    for intervals in per_device.values():
        intervals.sort()
        for (s0, e0), (s1, e1) in zip(intervals, intervals[1:]):
            assert s1 >= e0 - 1e-9, (s0, e0, s1, e1)
    for rid, spans in per_request.items():
        spans = sorted(spans)
        for (s0, e0, _), (s1, e1, _) in zip(spans, spans[1:]):
            assert s1 >= e0 - 1e-9, rid
        # Steps in order: the groups of one request add up to its steps exactly once.
        rec = next(r for r in result.requests if r.request_id == rid)
        assert sum(n for _, _, n in spans) == rec.steps


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("num_devices,mix,arrival", [(8, "skewed", "poisson"), (4, "uniform", "gamma"),
                                                     (2, "uniform", "poisson"), (3, "skewed", "gamma")])
def test_invariants_on_random_traces(cost, policy, num_devices, mix, arrival):
    try:
        make_policy(policy, num_devices, cost)
    except ValueError:
        pytest.skip(f"{policy} needs more than {num_devices} devices")
    trace = generate_trace(40, 10.0 * num_devices / 8 + 2, mix, seed=num_devices, arrival=arrival, cost=cost,
                           max_degree=num_devices)
    result = simulate(trace, make_policy(policy, num_devices, cost), jitter_cv=0.05, seed=1)
    check_invariants(result, trace, cost, num_devices)
    assert 0.0 <= result.sar <= 1.0


def test_same_seed_same_result(cost):
    trace_a = generate_trace(60, 12, "skewed", seed=5, cost=cost)
    trace_b = generate_trace(60, 12, "skewed", seed=5, cost=cost)
    assert trace_a == trace_b
    assert generate_trace(60, 12, "skewed", seed=6, cost=cost) != trace_a
    runs = [simulate(trace_a, make_policy("tetri", 8, cost), jitter_cv=0.02, seed=3) for _ in range(2)]
    assert runs[0].summary() == runs[1].summary()
    assert [(b.device_id, b.start_s, b.end_s, b.request_ids) for b in runs[0].busy] == \
           [(b.device_id, b.start_s, b.end_s, b.request_ids) for b in runs[1].busy]


def test_unloaded_tetri_meets_every_deadline(cost):
    # One request at a time (far apart): each can be served alone at its best degree within SLO.
    trace = [TraceRequest(100.0 * i, s, s, 50, 1000 * 1.5 * cost.isolated_s(s, s, 50, 8) + 30, f"r{i}")
             for i, s in enumerate((256, 512, 1024, 2048, 768))]
    result = simulate(trace, make_policy("tetri", 8, cost))
    assert result.sar == 1.0


def test_mix_probabilities():
    assert mix_probabilities("uniform") == [0.25] * 4
    skewed = mix_probabilities("skewed")
    assert skewed == sorted(skewed) and abs(sum(skewed) - 1) < 1e-12
    # p proportional to exp(L / L_max): the 2048^2 share over the 256^2 share is e^(1 - 1/64).
    assert skewed[3] / skewed[0] == pytest.approx(2.718281828 ** (1 - 1 / 64))
    with pytest.raises(ValueError):
        mix_probabilities("zipf")


def test_generator_rate_and_shares():
    trace = generate_trace(4000, 12, "skewed", seed=0)
    span_min = trace[-1].arrival_s / 60
    assert 4000 / span_min == pytest.approx(12, rel=0.05)
    share_2048 = sum(r.width == 2048 for r in trace) / len(trace)
    assert share_2048 == pytest.approx(mix_probabilities("skewed")[3], abs=0.03)
    assert {r.steps for r in trace} == {50}
    assert {r.slo_ms for r in trace if r.width == 256} == {1500.0}  # the paper's table without a profile


def test_gamma_arrivals_are_burstier():
    def cv(trace):
        gaps = [b.arrival_s - a.arrival_s for a, b in zip(trace, trace[1:])]
        mean = sum(gaps) / len(gaps)
        return (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean

    assert cv(generate_trace(3000, 12, seed=1)) == pytest.approx(1.0, abs=0.1)
    assert cv(generate_trace(3000, 12, seed=1, arrival="gamma", burstiness_cv=3.0)) > 2.0


def test_trace_file_round_trip(tmp_path):
    trace = generate_trace(20, 12, "uniform", seed=2)
    path = str(tmp_path / "t.jsonl")
    write_trace(path, trace)
    assert read_trace(path) == trace
    (tmp_path / "bad.jsonl").write_text('{"arrival_s": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_trace(str(tmp_path / "bad.jsonl"))


def test_mixed_workload_has_non_square_sizes_and_steps_per_request(cost):
    trace = generate_trace(200, 12, "mixed", seed=1, cost=cost, max_degree=8)
    assert any(r.width != r.height for r in trace) and len({r.steps for r in trace}) == 3
    # SLOs follow the request's own size and steps: more steps, a later deadline.
    by = {(r.width, r.height, r.steps): r.slo_ms for r in trace}
    pairs = [(k, v) for k, v in by.items() if (k[0], k[1], 50) in by and k[2] < 50]
    assert pairs and all(v < by[(k[0], k[1], 50)] for k, v in pairs)
    for name in ("tetri", "tetri-paper", "srpt"):
        result = simulate(trace, make_policy(name, 8, cost), slo_scale=1.2)
        check_invariants(result, trace, cost, 8)
        assert all(r.slowdown >= 1.0 - 1e-9 for r in result.requests)  # nobody beats running alone
