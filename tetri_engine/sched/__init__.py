"""Scheduling: the policies (tetri, the paper-faithful tetri-paper, baselines, the srpt tail
reference), cost model, SLOs, traces, simulator, the SAR upper bound and the report.

Pure Python: imports neither torch nor asyncio (tests/test_sched_import.py checks), and time is
always an argument, so the very same policy objects drive the live engine and the simulator.

    cost = CostModel.from_json("bench/profiles/flux-dev-h200-modelled.json")
    policy = make_policy("tetri", num_devices=8, cost=cost)
    policy.add_request(SchedRequest("r1", 1024, 1024, 50, arrival_s=0.0, deadline_s=6.0))
    plan = policy.schedule(now_s=0.0)
    policy.update_from_output(plan, RoundResult(end_s=0.9, steps_done={"r1": 5}))
"""
from __future__ import annotations

from tetri_engine.sched.baselines import EDFPolicy, FixedSPPolicy, RSSPPolicy, SRPTPolicy
from tetri_engine.sched.cost import CostModel, num_tokens
from tetri_engine.sched.plan import GroupAssignment, LatentMove, RoundPlan, RoundResult, SchedRequest, SchedState
from tetri_engine.sched.policy import Admission, Estimate, GroupSpec, Policy
from tetri_engine.sched.paper import PaperTetriPolicy
from tetri_engine.sched.slo import slo_s, table_slo_s
from tetri_engine.sched.tetri import TetriPolicy

# The one list of policy names (the engine validates its config against it).
POLICY_NAMES = ("tetri", "tetri-paper", "fixed1", "fixed2", "fixed4", "fixed8", "rssp", "edf1", "edf2", "edf4",
                "edf8", "srpt")


def available_policies() -> tuple[str, ...]:
    """Every name make_policy accepts (fixedK / edfK also for other profiled K)."""
    return POLICY_NAMES


def make_policy(name: str, num_devices: int, cost: CostModel, *, round_steps: int = 5,
                round_s: float | None = None, **options) -> Policy:
    """A policy by name: "tetri" (default everywhere), "tetri-paper" (the paper-faithful reference),
    "fixedK" (xDiT-style fixed SP=K, FCFS), "rssp", "edfK", "srpt" (deadline-blind tail reference).

    round_steps / round_s size a group's steps for tetri, tetri-paper and srpt (ignored by the
    run-to-completion baselines). Extra keyword options go to the policy (e.g. tetri: scale_up=False,
    rescue_slowdown=3.0; tetri-paper: batching=False).
    """
    key = name.strip().lower()
    common = dict(round_steps=round_steps, round_s=round_s)
    if key == "tetri":
        return TetriPolicy(num_devices, cost, **common, **options)
    if key == "tetri-paper":
        return PaperTetriPolicy(num_devices, cost, **common, **options)
    if key == "srpt":
        return SRPTPolicy(num_devices, cost, **common, **options)
    if key == "rssp":
        return RSSPPolicy(num_devices, cost, **common, **options)
    for prefix, cls in (("fixed", FixedSPPolicy), ("edf", EDFPolicy)):
        if key.startswith(prefix) and key[len(prefix):].isdigit():
            return cls(num_devices, cost, int(key[len(prefix):]), **common, **options)
    raise ValueError(f"unknown policy {name!r}: choose from {', '.join(POLICY_NAMES)} (fixedK/edfK for any profiled K)")


__all__ = [
    "Admission",
    "CostModel",
    "EDFPolicy",
    "Estimate",
    "FixedSPPolicy",
    "GroupAssignment",
    "GroupSpec",
    "LatentMove",
    "POLICY_NAMES",
    "Policy",
    "RSSPPolicy",
    "RoundPlan",
    "RoundResult",
    "SchedRequest",
    "SchedState",
    "SRPTPolicy",
    "PaperTetriPolicy",
    "TetriPolicy",
    "available_policies",
    "make_policy",
    "num_tokens",
    "slo_s",
    "table_slo_s",
]
