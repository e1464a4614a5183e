"""The shared rules under every layer: EngineConfig checks itself, SizeRule (the one size rule) and the
string enums, without an engine."""
from __future__ import annotations

import json

import pytest

from tetri_engine.config import AdmissionMode, EngineConfig
from tetri_engine.errors import RejectionReason, RequestRejected
from tetri_engine.request import CacheMode, OutputKind, RequestState, SizeRule


def test_engine_config_refuses_bad_values_at_construction():
    for fields, words in ((dict(max_queue=0), "max_queue"), (dict(round_steps=0), "round_steps"),
                          (dict(round_s=0.0), "round_s"), (dict(slo_scale=-1.0), "slo_scale"),
                          (dict(comm_cache_size=0), "comm_cache_size"), (dict(max_height=16), "max_height"),
                          (dict(admission="sometimes"), "admission must be 'reject' or 'best_effort'")):
        with pytest.raises(ValueError, match=words):
            EngineConfig(**fields)
    assert EngineConfig(admission="best_effort").admission is AdmissionMode.BEST_EFFORT


def test_the_size_rule_says_what_to_send_instead():
    rule = EngineConfig(max_width=1024, max_height=512).size_rule()
    rule.check(1024, 512)
    for (width, height), words in (((100, 64), "width=100 is not a multiple of 16.*try 96 or 112"),
                                   ((64, 32), "height=32 is below the minimum of 64"),
                                   ((64, 1040), "height=1040 is beyond the maximum of 512 px"),
                                   ((64.0, 64), "width must be an integer")):
        with pytest.raises(ValueError, match=words):
            rule.check(width, height)
    # A model's own limit (SD3's position grid) narrows the engine's, and only where it is smaller.
    model = SizeRule(multiple_px=16, min_px=16, max_width=768, max_height=768)
    both = rule.narrow(model)
    assert (both.multiple_px, both.min_px, both.max_width, both.max_height) == (16, 64, 768, 512)
    with pytest.raises(ValueError, match="do not nest"):
        rule.narrow(SizeRule(multiple_px=24))
    # An edit's input of any size: the nearest multiples (halves up, never below one multiple).
    assert rule.nearest(1000, 750) == (1008, 752) and rule.nearest(100, 70) == (96, 64)
    assert rule.nearest(24, 8) == (32, 16) and rule.nearest(1024, 512) == (1024, 512)


def test_enums_are_their_strings():
    assert OutputKind.STEP == "step" and f"{OutputKind.FINAL}" == "final" and str(RequestState.FAILED) == "failed"
    assert json.dumps({"state": RequestState.COMPLETED, "cache": CacheMode.AUTO}) == \
        '{"state": "completed", "cache": "auto"}'
    assert RequestRejected("full", reason="queue_full").reason is RejectionReason.QUEUE_FULL
    with pytest.raises(ValueError):
        RequestRejected("?", reason="invalid")  # not a reason admission gives
