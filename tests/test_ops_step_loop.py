"""The native step loop (csrc/step_loop.cpp through tetri_engine.ops): the group's meetings, the per-step
protocol (verdicts, stop flags, segment ends) and its Python twin (executor/segments.py), which must
take the same decisions. One thread per rank, as the executor runs them; eager steps are Python
callbacks, as on CPU builds."""
from __future__ import annotations

import threading
import time

import pytest

from tetri_engine import ops
from tetri_engine.executor.agreement import RankAgreement
from tetri_engine.executor.segments import SegmentSpec, run_segment
from rank_threads import run_ranks

LOOPS = ["native", "python"]


def test_meet_waits_for_every_rank_and_releases_the_gil():
    group = ops.StepGroup(3)
    arrived = []

    def rank(r):
        time.sleep(0.05 * r)  # the late ranks run Python while the early ones wait in meet
        arrived.append(r)
        group.meet(r)
        return sorted(arrived)

    assert run_ranks(rank, range(3)) == [[0, 1, 2]] * 3


def test_abort_wakes_the_waiting_ranks_and_later_meetings_fail_at_once():
    group = ops.StepGroup(2)
    errors = []

    def waiter():
        try:
            group.meet(0)
        except ops.GroupAbortedError as exc:
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.1)
    group.abort()
    thread.join(10)
    assert not thread.is_alive() and len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert group.aborted
    with pytest.raises(ops.GroupAbortedError):
        group.meet(1)


def test_device_queue_is_a_no_op_on_the_cpu_and_refuses_a_gpu_in_a_cpu_build():
    queue = ops.DeviceQueue(-1, 2, trace=True)
    queue.wait_for_room()
    queue.mark("x")
    assert queue.marks_ms() == []
    if ops.backend_info()["build"] == "cpu":
        with pytest.raises(ValueError, match="no CUDA"):
            ops.DeviceQueue(0, 2)


def segment(loop, degree, scripts, max_steps=10, steps_left=(10,), stop_at=None, exit_flag=None, trace=False):
    """Run one segment on `degree` ranks. scripts[rank](k) -> (error or None, exchanges) of step k.
    stop_at: (request, k): rank 0's progress callback sets that request's stop flag after step k.
    -> (per-rank SegmentResult, per-rank committed steps, progress calls)."""
    agreement = RankAgreement(degree)
    flags = [ops.StopFlag() for _ in steps_left]
    commits = [0] * degree
    progress = []

    def rank(r):
        calls = iter(range(10**6))

        def on_step(k):
            progress.append(k)
            if stop_at is not None and k == stop_at[1]:
                flags[stop_at[0]].set()

        def commit():
            commits[r] += 1

        spec = SegmentSpec(max_steps=max_steps, steps_left=list(steps_left), stop_flags=flags, exit_flag=exit_flag,
                           step=lambda: scripts[r](next(calls)), commit=commit, on_step=on_step, trace=trace)
        return run_segment(loop, agreement, r, ops.DeviceQueue(-1, 2), spec)

    results = run_ranks(rank, range(degree))
    return results, commits, progress


def fine(k):
    return None, 4


@pytest.mark.parametrize("loop", LOOPS)
def test_a_segment_ends_at_its_budget_or_at_a_request_s_last_step(loop):
    results, commits, progress = segment(loop, 2, [fine, fine], max_steps=3, steps_left=(5, 7))
    assert [(r.steps, r.end) for r in results] == [(3, "budget")] * 2 and commits == [3, 3] and progress == [0, 1, 2]
    results, commits, _ = segment(loop, 2, [fine, fine], max_steps=10, steps_left=(5, 2))
    assert [(r.steps, r.end) for r in results] == [(2, "finished")] * 2 and commits == [2, 2]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stop_lands_at_the_same_step_on_every_rank(loop):
    """A cancel set after step 1 (from rank 0's progress callback) is read by rank 0 when it reports
    step 2: every rank commits step 2 and stops there, with the same mask."""
    results, commits, _ = segment(loop, 3, [fine] * 3, steps_left=(9, 9), stop_at=(1, 1))
    assert [(r.steps, r.end, r.stop_mask) for r in results] == [(3, "stopped", 0b10)] * 3 and commits == [3, 3, 3]
    exiting = ops.StopFlag()
    exiting.set()
    results, _, _ = segment(loop, 2, [fine, fine], steps_left=(9, 9, 9), exit_flag=exiting)
    assert [(r.steps, r.end, r.stop_mask) for r in results] == [(1, "stopped", 0b111)] * 2


@pytest.mark.parametrize("loop", LOOPS)
def test_verdicts_failed_when_in_step_out_of_step_otherwise(loop):
    def fails_at_2(k):
        return ("boom", 4) if k == 2 else (None, 4)

    def fails_early_at_2(k):  # failed before its exchanges: it did not catch up
        return ("boom", 1) if k == 2 else (None, 4)

    results, commits, _ = segment(loop, 2, [fine, fails_at_2])
    assert [(r.steps, r.end, r.errors) for r in results] == [(2, "failed", ["", "boom"])] * 2 and commits == [2, 2]
    results, _, _ = segment(loop, 2, [fine, fails_early_at_2])
    assert [(r.steps, r.end) for r in results] == [(2, "out_of_step")] * 2
    results, _, _ = segment(loop, 1, [fails_early_at_2])
    assert [(r.steps, r.end, r.errors) for r in results] == [(2, "failed", ["boom"])]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_callback_that_raises_aborts_the_group_instead_of_hanging_it(loop):
    def bug():
        raise KeyError("a bug")

    agreement = RankAgreement(2)

    def rank(r):
        spec = SegmentSpec(max_steps=5, steps_left=[5], stop_flags=[ops.StopFlag()], exit_flag=None,
                           step=bug if r == 1 else (lambda: (None, 0)))
        try:
            run_segment(loop, agreement, r, ops.DeviceQueue(-1, 2), spec)
        except Exception as exc:
            return type(exc).__name__
        return "returned"

    assert run_ranks(rank, range(2), join_s=20) == ["GroupAbortedError", "KeyError"]


def test_a_graph_step_that_cannot_launch_fails_the_step():
    """CPU: a graph launch is refused, reported as this rank's failure with no exchanges (the verdict
    then fails the batch: out of step beside a rank whose launch worked)."""
    agreement = RankAgreement(1)
    spec = SegmentSpec(max_steps=3, steps_left=[3], stop_flags=[ops.StopFlag()], exit_flag=None, step=None,
                       graph_exec=1, graph_exchanges=2)
    result = run_segment("native", agreement, 0, ops.DeviceQueue(-1, 2), spec)
    assert (result.steps, result.end) == (0, "failed") and "CUDA graph" in result.errors[0]


@pytest.mark.parametrize("loop", LOOPS)
def test_trace_records_the_host_time_of_each_phase_of_each_step(loop):
    def slow(k):
        time.sleep(0.01)
        return None, 0

    results, _, _ = segment(loop, 1, [slow], max_steps=3, steps_left=(3,), trace=True)
    phases = results[0].phases_s
    assert len(phases) == 3 and all(len(p) == 4 for p in phases)
    assert all(p[1] >= 0.009 for p in phases)  # the step phase holds the step's own time
