"""LoRA adapter sets in the scheduler (issue 19): requests batch only with the same set (`batch_key`), a group whose
devices hold another set pays the cost model's switch, tetri places a group on devices holding its set."""
from __future__ import annotations

import random

import pytest

from tetri_engine.sched import POLICY_NAMES, CostModel, GroupSpec, PaperTetriPolicy, RoundResult, SchedRequest, make_policy
from tetri_engine.sched.policy import Policy

STEP_MS = {(256, 256, 1, 1): 10, (256, 256, 2, 1): 12, (256, 256, 1, 2): 11, (256, 256, 1, 4): 20,
           (1024, 1024, 1, 1): 100, (1024, 1024, 2, 1): 60}
DECODE_MS = {(256, 256): 1.0, (1024, 1024): 10.0}
INK, NEON = (("ink", 1.0),), (("neon", 0.5),)


def cost(switch_ms: float = 0.0) -> CostModel:
    data = CostModel(dict(STEP_MS), dict(DECODE_MS)).to_dict()
    return CostModel.from_dict({**data, "lora_switch_ms": switch_ms} if switch_ms else data)


def req(rid: str, adapters=(), side: int = 256, steps: int = 20, deadline_s: float = 1.0) -> SchedRequest:
    return SchedRequest(rid, side, side, steps, 0.0, deadline_s, adapters=adapters)


def finish(policy, plan) -> None:
    policy.update_from_output(plan, RoundResult(plan.start_s + plan.expected_s,
                                                {rid: g.num_steps for g in plan.groups for rid in g.request_ids}))


def test_batching_pairs_only_requests_with_the_same_adapter_set():
    p = PaperTetriPolicy(1, cost(), round_s=0.1)
    for rid, adapters in (("a1", INK), ("n1", NEON), ("a2", INK), ("n2", NEON)):
        p.add_request(req(rid, adapters, deadline_s=5.0))
    plan = p.schedule(0.0)
    [group] = plan.groups
    assert len(group.request_ids) == 2  # devices are short: a batch of two ...
    assert len({p.get(rid).adapters for rid in group.request_ids}) == 1  # ... of one set


def test_plain_requests_still_batch_together():
    p = PaperTetriPolicy(1, cost(), round_s=0.1)
    p.add_request(req("A", deadline_s=5.0))
    p.add_request(req("B", deadline_s=5.0))
    assert sorted(p.schedule(0.0).groups[0].request_ids) == ["A", "B"]


class MixingPolicy(Policy):
    """A buggy policy: batches whatever is ready."""

    def _plan(self, now_s, idle, ready):
        return [GroupSpec((idle[0],), tuple(r.request_id for r in ready), 1)]


def test_a_plan_batching_two_adapter_sets_is_refused():
    p = MixingPolicy(1, cost())
    p.add_request(req("a", INK))
    p.add_request(req("n", NEON))
    with pytest.raises(RuntimeError, match="one adapter set"):
        p.schedule(0.0)


def test_a_group_pays_the_switch_only_when_its_devices_hold_another_set():
    p = make_policy("fixed1", 1, cost(switch_ms=30.0))
    p.add_request(req("a", INK, steps=2, deadline_s=None))
    p.add_request(req("b", INK, steps=2, deadline_s=None))
    p.add_request(req("c", (), steps=2, deadline_s=None))
    expected = []
    for _ in range(3):
        plan = p.schedule(0.0)
        expected.append(plan.groups[0].expected_s)
        finish(p, plan)
    plain_s = 2 * 0.010 + 0.001
    assert expected == pytest.approx([plain_s + 0.030, plain_s, plain_s + 0.030])  # ink, ink again, plain
    assert p.held_adapters == {0: ()}


def test_no_switch_cost_without_a_measured_one():
    p = make_policy("fixed1", 1, cost())
    p.add_request(req("a", INK, steps=2, deadline_s=None))
    assert p.schedule(0.0).groups[0].expected_s == pytest.approx(2 * 0.010 + 0.001)


def test_tetri_puts_a_new_request_on_a_device_holding_its_set():
    p = make_policy("tetri", 2, cost(switch_ms=30.0), round_s=10.0, scale_up=False)
    p.held_adapters.update({0: INK, 1: NEON})
    p.add_request(req("n", NEON, side=256, steps=5, deadline_s=10.0))
    [group] = p.schedule(0.0).groups
    assert group.device_ids == (1,) and group.expected_s == pytest.approx(5 * 0.010 + 0.001)


def test_the_switch_cost_travels_in_the_profile():
    model = cost(switch_ms=12.5)
    assert model.lora_switch_s == pytest.approx(0.0125)
    assert CostModel.from_dict(model.to_dict()).lora_switch_s == pytest.approx(0.0125)
    assert cost().with_lora_switch_s(0.004).lora_switch_s == pytest.approx(0.004)
    assert "lora_switch_ms" not in cost().to_dict() and "lora_switch_ms" not in model.meta
    # The derived machines keep it (the simulator's --no-layouts, a workload that caches).
    assert model.with_cache().lora_switch_s == pytest.approx(0.0125)
    assert model.without_layouts().lora_switch_s == pytest.approx(0.0125)
    with pytest.raises(ValueError, match="lora_switch_ms"):
        cost(switch_ms=-1.0)


@pytest.mark.parametrize("name", [n for n in POLICY_NAMES if n[-1] not in "48"])  # profiled degrees 1, 2
def test_no_policy_ever_groups_requests_of_different_adapter_sets(name):
    """Every policy, a random mix of sizes, step counts, deadlines and adapter sets, run to the end."""
    policy = make_policy(name, 2, cost(switch_ms=2.0), round_steps=5)
    rng = random.Random(3)
    adapters = {}
    for i in range(24):
        rid = f"r{i}"
        adapters[rid] = rng.choice([(), INK, NEON, INK + NEON])
        policy.add_request(req(rid, adapters[rid], side=rng.choice([256, 1024]), steps=rng.randint(4, 12),
                               deadline_s=0.5 + rng.random()))
    now = 0.0
    while policy.has_work():
        plan = policy.schedule(now)
        assert not plan.is_empty
        for group in plan.groups:
            assert len({adapters[rid] for rid in group.request_ids}) == 1, (name, group)
        finish(policy, plan)
        now = plan.start_s + plan.expected_s
    assert policy.queue_depth == 0
