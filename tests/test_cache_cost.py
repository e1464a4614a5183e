"""The cost model's cached step time (profile key "cache_step_factor"), what the scheduler plans with
for requests that run with step caching. Pure Python, like the rest of sched."""
from __future__ import annotations

import pytest

from tetri_engine.sched import CostModel, make_policy
from tetri_engine.sched.simulator import simulate
from tetri_engine.sched.trace import generate_trace

PROFILE = {
    "model": "m", "machine": "x",
    "step_ms": [{"width": 512, "height": 512, "degree": d, "batch": 1, "ms": ms} for d, ms in ((1, 100.0), (2, 60.0))]
    + [{"width": 1024, "height": 1024, "degree": d, "batch": 1, "ms": ms} for d, ms in ((1, 400.0), (2, 220.0))],
    "decode_ms": [{"width": 1024, "height": 1024, "ms": 40.0}],
    "encode_ms": 10.0,
}


def test_cached_step_time_is_the_factor_times_the_plain_one():
    cost = CostModel.from_dict({**PROFILE, "cache_step_factor": 0.6})
    assert cost.step_s(512, 512, 1) == pytest.approx(0.1)
    assert cost.step_s(512, 512, 1, cached=True) == pytest.approx(0.06)
    assert cost.step_s(768, 768, 2, cached=True) == pytest.approx(0.6 * cost.step_s(768, 768, 2))  # interpolated
    assert cost.to_dict()["cache_step_factor"] == 0.6
    assert CostModel.from_dict(cost.to_dict()).step_s(1024, 1024, 2, cached=True) == pytest.approx(0.132)
    cached = cost.with_cache()
    assert cached.step_s(1024, 1024, 1) == pytest.approx(0.24)
    assert cached.decode_s(1024, 1024) == cost.decode_s(1024, 1024) and cached.encode_s() == cost.encode_s()


def test_profiles_without_the_key_are_unchanged():
    cost = CostModel.from_dict(PROFILE)
    assert cost.cache_step_factor == 1.0
    assert cost.step_s(512, 512, 2, cached=True) == cost.step_s(512, 512, 2)
    assert "cache_step_factor" not in cost.to_dict()
    with pytest.raises(ValueError, match="cache_step_factor"):
        CostModel.from_dict({**PROFILE, "cache_step_factor": 0})


def test_faster_cached_steps_raise_sar_in_the_simulator():
    cost = CostModel.from_dict({**PROFILE, "cache_step_factor": 0.5})
    trace = generate_trace(60, 40.0, "uniform", seed=1, steps=20, sides_px=(512, 1024), cost=cost, max_degree=2)
    plain = simulate(trace, make_policy("tetri", 2, cost))
    cached = simulate(trace, make_policy("tetri", 2, cost.with_cache()))
    assert cached.sar > plain.sar
