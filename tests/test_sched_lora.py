"""LoRA adapter sets in the scheduler (issue 19): no policy ever puts requests with different sets in one
group, requests with the same set may batch, a group whose devices hold another set is costed with the
profile's switch time, and tetri places a request on devices that hold its set."""
from __future__ import annotations

import random

import pytest

from tetri_engine.sched import CostModel, PaperTetriPolicy, RoundResult, SchedRequest, make_policy
from tetri_engine.sched import POLICY_NAMES

TOY_MS = {
    (256, 256, 1, 1): 10, (256, 256, 2, 1): 12, (256, 256, 4, 1): 14,
    (1024, 1024, 1, 1): 100, (1024, 1024, 2, 1): 60, (1024, 1024, 4, 1): 40,
    (256, 256, 1, 2): 11, (256, 256, 1, 4): 20,
}
TOY_DECODE_MS = {(256, 256): 1.0, (1024, 1024): 10.0}
STYLE, INK = (("style", 1.0),), (("ink", 0.5),)


def toy(lora_switch_ms: float = 0.0) -> CostModel:
    return CostModel(dict(TOY_MS), dict(TOY_DECODE_MS), lora_switch_ms=lora_switch_ms)


def req(rid, side, steps, deadline_s, adapters=(), arrival_s=0.0):
    return SchedRequest(rid, side, side, steps, arrival_s, deadline_s, adapters=adapters)


def finish(policy, plan):
    end = plan.start_s + plan.expected_s
    policy.update_from_output(plan, RoundResult(end, {rid: g.num_steps for g in plan.groups for rid in g.request_ids}))
    return end


def test_batching_keeps_adapter_sets_apart():
    same = PaperTetriPolicy(1, toy(), round_s=0.1)
    for rid in "AB":
        same.add_request(req(rid, 256, 20, 1.0, adapters=STYLE))
    plan = same.schedule(0.0)
    assert [sorted(g.request_ids) for g in plan.groups] == [["A", "B"]]  # one set: batched as before

    mixed = PaperTetriPolicy(1, toy(), round_s=0.1)
    mixed.add_request(req("A", 256, 20, 1.0, adapters=STYLE))
    mixed.add_request(req("B", 256, 20, 1.0, adapters=INK))
    plan = mixed.schedule(0.0)
    assert [len(g.request_ids) for g in plan.groups] == [1]


@pytest.mark.parametrize("name", [n for n in POLICY_NAMES if not n.endswith("8")])  # 4 devices
def test_no_policy_groups_requests_of_different_adapter_sets(name):
    policy = make_policy(name, 4, toy(lora_switch_ms=2.0), round_steps=5)
    rng = random.Random(3)
    sets = [(), STYLE, INK, STYLE + INK]
    adapters = {}
    for i in range(24):
        rid = f"r{i}"
        adapters[rid] = rng.choice(sets)
        policy.add_request(req(rid, rng.choice([256, 1024]), rng.randint(4, 12), 0.5 + rng.random(), adapters[rid]))
    now, done = 0.0, set()
    while policy.has_work():
        plan = policy.schedule(now)
        assert not plan.is_empty
        for group in plan.groups:
            assert len({adapters[rid] for rid in group.request_ids}) == 1, (name, group)
        now = finish(policy, plan)
    assert policy.queue_depth == 0


def test_a_group_pays_the_switch_when_its_devices_hold_another_set():
    policy = make_policy("fixed1", 1, toy(lora_switch_ms=50.0))
    expected = {}
    now = 0.0
    for rid, adapters in (("plain", ()), ("a", STYLE), ("b", STYLE), ("c", INK), ("d", ())):
        policy.add_request(req(rid, 256, 5, None, adapters, arrival_s=now))
        plan = policy.schedule(now)
        expected[rid] = plan.groups[0].expected_s
        now = finish(policy, plan)
    alone = 5 * 0.010 + 0.001  # 5 steps + decode
    assert expected["plain"] == pytest.approx(alone)  # devices start with the plain model
    assert expected["a"] == pytest.approx(alone + 0.050)
    assert expected["b"] == pytest.approx(alone)  # the device holds STYLE already
    assert expected["c"] == pytest.approx(alone + 0.050)
    assert expected["d"] == pytest.approx(alone + 0.050)  # back to the plain weights


def test_tetri_places_a_request_where_its_set_is_held():
    policy = make_policy("tetri", 2, toy(lora_switch_ms=5.0), round_steps=5)
    policy.add_request(req("warm0", 256, 1, 10.0, ()))
    policy.add_request(req("warm1", 256, 1, 10.0, INK))
    plan = policy.schedule(0.0)
    held = {g.request_ids[0]: g.device_ids for g in plan.groups}
    now = finish(policy, plan)
    policy.add_request(req("next", 256, 1, 10.0, INK, arrival_s=now))
    plan = policy.schedule(now)
    assert [g.device_ids for g in plan.groups] == [held["warm1"]]
    assert plan.groups[0].expected_s == pytest.approx(0.011)  # no switch


def test_profile_round_trips_the_switch_time():
    cost = toy(lora_switch_ms=12.5)
    assert CostModel.from_dict(cost.to_dict()).lora_switch_s == pytest.approx(0.0125)
    assert cost.with_cache().lora_switch_s == pytest.approx(0.0125)
    assert toy().with_lora_switch_s(0.003).lora_switch_s == pytest.approx(0.003)
    with pytest.raises(ValueError, match="lora_switch_ms"):
        toy(lora_switch_ms=-1.0)
