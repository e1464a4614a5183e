"""tetri_engine.sched and `tetri-engine simulate` work with torch and asyncio unimportable (and without
highspy, whose absence only turns the `bound` row into a note)."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
sys.modules["torch"] = None      # any `import torch` now raises ImportError
sys.modules["asyncio"] = None
sys.modules["highspy"] = None    # the LP bound's solver is optional: the rest must not need it
import tetri_engine.sched as sched
from tetri_engine.sched import CostModel, make_policy, SchedRequest, RoundResult
from tetri_engine.sched.simulator import simulate
from tetri_engine.sched.trace import generate_trace
from tetri_engine.sched.report import run_sweep
import tetri_engine.commands.simulate
cost = CostModel.from_json("bench/profiles/flux-dev-h200-modelled.json")
trace = generate_trace(10, 30, "uniform", seed=1, cost=cost, max_degree=4)
res = simulate(trace, make_policy("tetri", 4, cost))
assert len(res.requests) == 10
sweep = run_sweep(trace, cost, 4, ["tetri"], [1.0], bound="lp")
assert sweep.bound is None and "highspy" in sweep.bound_note, sweep.bound_note
bad = [m for m in ("torch", "asyncio", "highspy") if sys.modules.get(m) is not None]
assert not bad, bad
print("ok")
"""


def test_sched_imports_neither_torch_nor_asyncio():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
