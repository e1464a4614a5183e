"""Cost model (profile loading, interpolation, errors) and the SLO rule."""
from __future__ import annotations

import json
import math
import os

import pytest

from tetri_engine.sched import CostModel, slo_s, table_slo_s
from tetri_engine.sched.slo import SLO_HEADROOM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H200 = os.path.join(REPO, "bench", "profiles", "flux-dev-h200-modelled.json")

PROFILE = {
    "model": "toy", "machine": "test", "num_devices": 4,
    "step_ms": [
        {"width": 256, "height": 256, "degree": 1, "batch": 1, "ms": 10.0},
        {"width": 256, "height": 256, "degree": 2, "batch": 1, "ms": 12.0},
        {"width": 1024, "height": 1024, "degree": 1, "batch": 1, "ms": 100.0},
        {"width": 1024, "height": 1024, "degree": 2, "batch": 1, "ms": 60.0},
        {"width": 256, "height": 256, "degree": 1, "batch": 2, "ms": 11.0},
    ],
    "decode_ms": [{"width": 256, "height": 256, "ms": 1.0}, {"width": 1024, "height": 1024, "ms": 16.0}],
    "encode_ms": 5.0,
}


def test_exact_lookup_and_units():
    cost = CostModel.from_dict(PROFILE)
    assert cost.step_s(1024, 1024, 2) == pytest.approx(0.060)
    assert cost.step_s(256, 256, 1, batch=2) == pytest.approx(0.011)
    assert cost.decode_s(1024, 1024) == pytest.approx(0.016)
    assert cost.encode_s() == pytest.approx(0.005)
    assert cost.degrees == (1, 2)


def test_interpolates_by_token_count():
    cost = CostModel.from_dict(PROFILE)
    # 512x512 = 1024 tokens, between 256 (10 ms) and 4096 tokens (100 ms) at degree 1.
    expected_ms = 10.0 + (100.0 - 10.0) * (1024 - 256) / (4096 - 256)
    assert cost.step_s(512, 512, 1) == pytest.approx(expected_ms / 1000)
    # A non-square size with the same token count as 1024x1024 gets its time.
    assert cost.step_s(2048, 512, 2) == pytest.approx(0.060)


def test_out_of_range_and_unknown_degree_are_clear_errors():
    cost = CostModel.from_dict(PROFILE)
    with pytest.raises(ValueError, match="outside the profiled range"):
        cost.step_s(2048, 2048, 1)
    with pytest.raises(ValueError, match="no step times for degree 4"):
        cost.step_s(256, 256, 4)
    with pytest.raises(ValueError, match="batch 2"):
        cost.step_s(1024, 1024, 1, batch=2)
    with pytest.raises(ValueError, match="power of two"):
        CostModel({(256, 256, 3, 1): 1.0})
    with pytest.raises(ValueError, match="no degree-1"):
        CostModel({(256, 256, 2, 1): 1.0})


def test_decode_extrapolates_proportionally_to_pixels():
    cost = CostModel.from_dict(PROFILE)
    assert cost.decode_s(2048, 2048) == pytest.approx(4 * 0.016)
    assert CostModel({(256, 256, 1, 1): 1.0}).decode_s(256, 256) == 0.0


def test_json_round_trip(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PROFILE))
    cost = CostModel.from_json(str(path))
    again = CostModel.from_dict(cost.to_dict())
    assert again.step_ms == cost.step_ms and again.decode_ms == cost.decode_ms and again.encode_ms == cost.encode_ms


def test_fastest_and_batch_queries():
    cost = CostModel.from_dict(PROFILE)
    assert cost.fastest_step(1024, 1024, 4) == (2, pytest.approx(0.060))
    assert cost.fastest_step(1024, 1024, 1) == (1, pytest.approx(0.100))
    assert cost.fastest_step(256, 256, 8)[0] == 1  # degree 2 is slower at 256^2
    assert cost.max_batch(256, 256) == 2 and cost.max_batch(1024, 1024) == 1
    assert cost.isolated_s(1024, 1024, 10, 2) == pytest.approx(10 * 0.060 + 0.016)


def test_h200_profile_is_labelled_and_loads():
    with open(H200) as f:
        raw = json.load(f)
    assert "MEASURED" in raw["source"] and "MODELLED" in raw["source"]
    cost = CostModel.from_json(H200)
    assert cost.degrees == (1, 2, 4, 8)
    assert cost.step_s(1024, 1024, 1) == pytest.approx(0.1756)  # measured
    assert cost.step_s(2048, 2048, 2) == pytest.approx(0.4757)  # measured
    # Modelled degrees keep the measured trend: large images scale, small ones get slower.
    assert cost.step_s(2048, 2048, 8) < cost.step_s(2048, 2048, 4) < cost.step_s(2048, 2048, 2)
    assert cost.step_s(512, 512, 8) > cost.step_s(512, 512, 1)


def test_slo_table_interpolation_and_scale():
    assert table_slo_s(256, 256) == pytest.approx(1.5)
    assert table_slo_s(2048, 2048) == pytest.approx(5.0)
    assert 2.0 < table_slo_s(768, 768) < 3.0
    assert table_slo_s(1024, 1024, steps=25) == pytest.approx(1.5)
    assert slo_s(512, 512, scale=1.2) == pytest.approx(2.4)


def test_slo_rebased_on_a_slow_profile():
    cost = CostModel.from_dict(PROFILE)
    # 1024^2, 50 steps: fastest is degree 2 -> 50 * 60 ms + 16 ms decode + 5 ms encode = 3.021 s.
    isolated = 0.005 + 50 * 0.060 + 0.016
    assert slo_s(1024, 1024, 50, cost, 1.0) == pytest.approx(max(3.0, SLO_HEADROOM * isolated))
    # On one device the fastest is degree 1, so the SLO is looser.
    assert slo_s(1024, 1024, 50, cost, 1.0, max_degree=1) == pytest.approx(SLO_HEADROOM * (0.005 + 5.0 + 0.016))
    # A fast profile keeps the paper's table.
    fast = CostModel({(256, 256, 1, 1): 1.0})
    assert slo_s(256, 256, 50, fast, 1.1) == pytest.approx(1.65)
    assert math.isclose(slo_s(256, 256, 50, cost, 1.5), 1.5 * slo_s(256, 256, 50, cost, 1.0))
