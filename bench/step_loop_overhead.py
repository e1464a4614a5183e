#!/usr/bin/env python3
"""Host cost of the executor's step loop per step: the native loop (csrc/step_loop.cpp) against its
Python twin (executor/segments.py), for the same protocol (wait for room, step, meet the group, commit).

1. ``loop``: the loop alone, on `degree` threads, with a step that does nothing but return (an eager
   step's callback, as on CPU builds: the native loop then enters Python once per step for it; with a
   CUDA graph it does not enter Python at all, which only a GPU can run: bench/corun_interference.py
   reports that as host us/step).
2. ``executor``: `Executor.submit_steps` on the tiny model (CPU virtual devices, eager forward), per-phase
   host time from the executor's trace (StepOptions.trace): launch (the forward), meet, commit.

    python bench/step_loop_overhead.py --steps 2000 --output out/step_loop_overhead.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tetri_engine import ops  # noqa: E402
from tetri_engine.executor import Executor  # noqa: E402
from tetri_engine.executor.agreement import RankAgreement  # noqa: E402
from tetri_engine.executor.options import StepOptions  # noqa: E402
from tetri_engine.executor.segments import SegmentSpec, run_segment  # noqa: E402
from tetri_engine.model import load_runtime  # noqa: E402
from tetri_engine.request import GenerationRequest  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from rank_threads import run_ranks  # noqa: E402


def loop_only(loop: str, degree: int, steps: int) -> float:
    """Microseconds per step of `steps` do-nothing steps on `degree` ranks."""
    agreement = RankAgreement(degree)

    def rank(r):
        spec = SegmentSpec(max_steps=steps, steps_left=[steps + 1], stop_flags=[ops.StopFlag()], exit_flag=None,
                           step=lambda: (None, 0), commit=lambda: None)
        start = time.perf_counter()
        result = run_segment(loop, agreement, r, ops.DeviceQueue(-1, 2), spec)
        assert result.steps == steps
        return time.perf_counter() - start

    return 1e6 * max(run_ranks(rank, range(degree), join_s=600)) / steps


def executor_steps(loop: str, degree: int, steps: int, side: int) -> dict:
    devices = [f"cpu:{i}" for i in range(degree)]
    runtime = load_runtime("tiny", devices)
    with Executor(runtime, devices, step_options=StepOptions(loop=loop, trace=True)) as ex:
        ex.submit_encode("r", GenerationRequest(prompt="overhead", width=side, height=side, seed=1,
                                                num_inference_steps=steps + 1)).result()
        ex.submit_steps(["r"], tuple(range(degree)), 1).result()  # first-use costs
        result = ex.submit_steps(["r"], tuple(range(degree)), steps).result()
    phases = [p for seg in result.trace["ranks"][0]["segments"] for p in seg["phases_s"]]
    launch, meet, commit = (statistics.median(p[j] for p in phases) for j in (1, 2, 3))
    return {"step_us": 1e6 * launch, "meet_us": 1e6 * meet, "commit_us": 1e6 * commit,
            "loop_us": 1e6 * (meet + commit), "per_step_ms": 1000 * result.seconds / steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="steps of the loop-only measurement")
    p.add_argument("--executor-steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64, help="image side of the executor measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    rows = []
    print(f"{'measure':9s} {'loop':7s} {'degree':>6s}  result (median of {args.repeats})")
    for degree in (1, 2, 4):
        for loop in ("native", "python"):
            us = statistics.median(loop_only(loop, degree, args.steps) for _ in range(args.repeats))
            rows.append({"measure": "loop", "loop": loop, "degree": degree, "us_per_step": us})
            print(f"{'loop':9s} {loop:7s} {degree:6d}  {us:8.1f} us/step (do-nothing step)", flush=True)
    for degree in (1, 2):
        for loop in ("native", "python"):
            runs = [executor_steps(loop, degree, args.executor_steps, args.size) for _ in range(args.repeats)]
            row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append({"measure": "executor", "loop": loop, "degree": degree, **row})
            print(f"{'executor':9s} {loop:7s} {degree:6d}  step {row['step_us']:8.0f} us, meet {row['meet_us']:6.1f} us, "
                  f"commit+progress {row['commit_us']:6.1f} us, {row['per_step_ms']:.2f} ms/step", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            for row in rows:
                f.write(json.dumps({"machine": "cpu", **row}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
