"""Python face of the native step loop (csrc/step_loop.h): what an executor rank uses to run the steps of
one batch with the GIL released and to agree each step with the other ranks of its group.

* ``StopFlag()``: ``set()``, ``clear()``, ``is_set()``; set from any thread, read by the loop without a lock
  (a request's cancel, the executor's exit).
* ``StepGroup(degree)``: the ranks of one job. ``meet(rank)`` returns once every rank has called it (at
  once at degree 1; GIL released while waiting); ``abort()`` wakes every waiting rank with
  `GroupAbortedError`, and every later meeting raises it at once; ``aborted``, ``degree``.
* ``DeviceQueue(device_index, max_queued, trace=False)``: a rank's device as the loop sees it (-1: CPU,
  where every call is a no-op). ``wait_for_room()`` marks the end of the work queued so far on the
  thread's current stream and waits (sleeping, GIL released) until at most ``max_queued - 1`` marks
  are pending (0: no bound); ``launch_graph(exec)`` launches a ``cudaGraphExec_t`` there -> "" or the
  error; trace mode: ``mark(label)`` records a timing event, ``marks_ms()`` (after a device sync) gives
  ``[(label, ms since the previous mark), ...]``.
* ``SegmentSpec(max_steps, steps_left, stop_flags, exit_flag=None, graph_exec=0, graph_exchanges=0,
  first_error="", trace=False)`` and ``run_segment(group, rank, queue, spec, step=None, commit=None,
  on_step=None) -> SegmentOutcome`` (``steps``, ``end``, ``stop_mask``, ``errors``, ``phases_s``): the
  steps of one unchanged batch on one rank. Each step: wait for room; launch the graph (graph_exec != 0)
  or call ``step() -> (error or None, exchanges)``; rank 0 reads the stop flags; every rank's report
  meets the others' (`StepGroup`); the verdict (`step_verdict`) is the same everywhere: commit
  (``commit()``, then ``on_step(k)`` on rank 0), or end the segment "failed" (every rank made the same
  exchanges) or "out_of_step" (they did not). It also ends "budget" (max_steps committed), "finished"
  (a request reached its last step) or "stopped" (rank 0 reported a stop: ``stop_mask`` bit i =
  request i). Python runs only inside the callbacks; a callback that raises aborts the group.
"""
from __future__ import annotations

from collections.abc import Sequence

from tetri_engine import _C

if not hasattr(_C, "run_segment"):  # pragma: no cover - a stale build
    raise ImportError("tetri_engine._C predates the native step loop (csrc/step_loop.cpp): rebuild it "
                      "(`python setup.py build_ext --inplace`, or `pip install --no-build-isolation -e .`)")

StopFlag = _C.StopFlag
StepGroup = _C.StepGroup
GroupAbortedError = _C.GroupAbortedError
DeviceQueue = _C.DeviceQueue
SegmentSpec = _C.SegmentSpec
SegmentOutcome = _C.SegmentOutcome
run_segment = _C.run_segment

# The ends of a segment (SegmentOutcome.end).
BUDGET, FINISHED, STOPPED, FAILED, OUT_OF_STEP = "budget", "finished", "stopped", "failed", "out_of_step"


def step_verdict(reports: Sequence[tuple[str | None, int]]) -> str:
    """The verdict the native loop takes from every rank's (error or None, exchanges), in Python (the
    Python twin of the loop uses it): "" (commit), FAILED (every rank made the same exchanges: the
    group is in step) or OUT_OF_STEP (its communicator cannot be trusted)."""
    if all(error is None for error, _ in reports):
        return ""
    return FAILED if len({n for _, n in reports}) == 1 else OUT_OF_STEP
