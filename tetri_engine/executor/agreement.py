"""Rank agreement: the one place where the ranks of a steps job meet on the host.

Every decision that must be the same on every rank goes through here, in the same order on every rank:
the end of phase 1, the votes on a batch's CUDA graph, and each step's outcome. One barrier
(`ops.StepGroup`, native, the GIL released while waiting) serves both the Python votes (`all_ranks`) and
the native step loop's reports (csrc/step_loop.cpp), so a job has one meeting sequence.

Double buffering: a rank writes its value into one of two slot sets, alternating, then meets the others;
it cannot write the same set again before every rank has passed the next meeting, i.e. has read it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tetri_engine import ops
from tetri_engine.ops.step_loop import FAILED, OUT_OF_STEP


class RankAgreement:
    """The ranks 0..degree-1 of one job."""

    def __init__(self, degree: int):
        self.degree = degree
        self.group = ops.StepGroup(degree)
        self._slots: list[list[Any]] = [[None] * degree, [None] * degree]
        self._parity = [0] * degree

    def meet(self, rank: int) -> None:
        """Returns once every rank has met here (GroupAbortedError once aborted)."""
        self.group.meet(rank)

    def all_ranks(self, rank: int, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if self.degree == 1:
            return [value]
        parity = self._parity[rank]
        self._parity[rank] ^= 1
        self._slots[parity][rank] = value
        self.group.meet(rank)
        return list(self._slots[parity])

    def abort(self) -> None:
        """A rank failed outside the protocol: wake the others (GroupAbortedError) instead of letting
        them wait at the next meeting for ever."""
        self.group.abort()


def describe_failure(kind: str, errors: Sequence[str | None], devices: Sequence[str]) -> str:
    """The message a failed step gives its requests. kind: FAILED or OUT_OF_STEP; errors: per rank
    (None or "" for a rank that was fine); devices: the group's device names in rank order."""
    if len(errors) == 1:
        return errors[0] or "the step failed"
    message = "; ".join(f"rank {r} ({devices[r]}): {e}" for r, e in enumerate(errors) if e)
    if kind == OUT_OF_STEP:
        return "the group's ranks went out of step in a failed step, so its communicator cannot be trusted: " + message
    assert kind == FAILED, kind
    return message
