"""RequestTracker: every accepted request from admission to its one terminal state, and what its user
sees of it (outputs, metrics), with the request counters of `stats()`.

Two rules keep "exactly one final output per request":
- `finish()` is the one place a request becomes terminal;
- `settle_cancel()` is the one place a cancel takes effect. `cancel()` records the wish: a request
  the executor is working on is stopped there at its next step boundary and settles when its work
  reports; any other request settles at once.

What the executor did for a request (steps, degrees, regroups, placement, times, memory) is the
executor's: `finish()` reads it once, as a `RequestProgress`, for the final output and the metrics.
Lives on the event loop only; executor threads never see a TrackedRequest.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tetri_engine.engine.stats import RequestCounters
from tetri_engine.request import GenerationOutput, GenerationRequest, OutputKind, RequestMetrics, RequestState

log = logging.getLogger("tetri_engine.engine")


@dataclass(eq=False)
class TrackedRequest:
    request: GenerationRequest  # validated copy: steps, guidance, seed, request_id, cache filled in
    arrival_s: float  # monotonic, the clock the policy is given
    deadline_s: float  # relative to arrival
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)  # read by AsyncEngine.generate()
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    state: RequestState = RequestState.WAITING
    in_policy: bool = False  # the policy holds it: from its encode until the policy reports it done or failed
    busy: bool = False  # the executor runs a group's steps or a decode of it: a cancel waits for them
    cancel_reason: str | None = None  # asked to stop (applied by `settle_cancel`)
    first_round_s: float | None = None
    finished_s: float | None = None
    last_step_reported: int = 0  # the last "step" output sent
    last_preview_step: int = 0
    late: bool = False  # the policy gave it up (announced once, in a "late" output)
    cfg: bool = False  # it may run CFG-parallel (admission: true CFG on a model offering it, no step cache)

    @property
    def request_id(self) -> str:
        return self.request.request_id  # type: ignore[return-value]

    @property
    def total_steps(self) -> int:
        return self.request.denoise_steps  # type: ignore[return-value]  # (an edit: its share of the schedule)

    @property
    def deadline_at_s(self) -> float:
        return self.arrival_s + self.deadline_s

    def output(self, kind: OutputKind, **fields) -> GenerationOutput:
        fields.setdefault("state", self.state)
        fields.setdefault("step", self.last_step_reported)
        fields.setdefault("total_steps", self.total_steps)
        fields.setdefault("seed", self.request.seed)
        fields.setdefault("late", self.late)
        return GenerationOutput(request_id=self.request_id, kind=kind, **fields)


class RequestTracker:
    """The live requests (accepted, not yet terminal). `executor`: what runs them (cancel, progress,
    release); `drop_from_policy(request_id)`: forget a request the policy still holds; `changed()`:
    the round clock should look again (a request ended)."""

    def __init__(self, executor: Any, devices: list[str], drop_from_policy: Callable[[str], Any],
                 changed: Callable[[], None]):
        self._executor = executor
        self._devices = devices
        self._drop_from_policy = drop_from_policy
        self._changed = changed
        self._measures_memory = devices[0].startswith("cuda")  # the executor measures GPU memory only
        self.live: dict[str, TrackedRequest] = {}
        self.counters = RequestCounters()
        self.all_ended = asyncio.Event()  # set while no request is live
        self.all_ended.set()

    def get(self, request_id: str) -> TrackedRequest | None:
        return self.live.get(request_id)

    def __len__(self) -> int:
        return len(self.live)

    def waiting(self) -> int:
        """Live requests that have had no devices yet."""
        return sum(1 for t in self.live.values() if t.first_round_s is None)

    # ---- the life of a request ------------------------------------------------------------------

    def add(self, tracked: TrackedRequest) -> None:
        waiting_ahead = self.waiting()
        self.live[tracked.request_id] = tracked
        self.all_ended.clear()
        tracked.outputs.put_nowait(tracked.output(OutputKind.QUEUED, queue_position=waiting_ahead))

    def count_rejected(self, count: int = 1) -> None:
        for _ in range(count):
            self.counters.record(RequestState.REJECTED)

    def start_group(self, tracked: TrackedRequest, devices: tuple[str, ...], layout: dict[str, int] | None = None) -> None:
        """Its steps are about to run on `devices`, in the parallel `layout` (GroupAssignment.layout)."""
        if tracked.first_round_s is None:
            tracked.first_round_s = time.monotonic()
        tracked.state = RequestState.RUNNING
        tracked.busy = True
        tracked.outputs.put_nowait(tracked.output(OutputKind.ROUND, degree=len(devices), devices=devices,
                                                  layout=layout))

    def step_done(self, request_id: str, step: int, devices: tuple[str, ...]) -> None:
        tracked = self.live.get(request_id)
        if tracked is None or tracked.state.is_terminal or step <= tracked.last_step_reported:
            return
        tracked.last_step_reported = step
        tracked.outputs.put_nowait(tracked.output(OutputKind.STEP, step=step, degree=len(devices), devices=devices))

    def preview_made(self, request_id: str, image: Any, devices: tuple[str, ...]) -> None:
        tracked = self.live.get(request_id)
        if tracked is not None and not tracked.state.is_terminal:
            tracked.outputs.put_nowait(tracked.output(OutputKind.PREVIEW, image=image, degree=len(devices),
                                                      devices=devices))

    def given_up(self, request_id: str) -> None:
        """The policy gave it up (RoundPlan.given_up): say so at once; it still runs, best effort."""
        tracked = self.live.get(request_id)
        if tracked is None or tracked.late or tracked.state.is_terminal:
            return
        tracked.late = True
        log.info("request %s is late: the scheduler gave it up (it runs on, best effort)", request_id)
        tracked.outputs.put_nowait(tracked.output(OutputKind.LATE))

    # ---- ending ---------------------------------------------------------------------------------

    def cancel(self, tracked: TrackedRequest, reason: str) -> None:
        """Ask a live request to stop: it ends CANCELLED at once, or, while the executor works on it,
        after its current step (the executor stops it there; it settles when its work reports)."""
        if tracked.state.is_terminal:
            return
        tracked.cancel_reason = tracked.cancel_reason or reason
        if tracked.busy:
            self._executor.cancel(tracked.request_id)
        else:
            self.settle_cancel(tracked)

    def settle_cancel(self, tracked: TrackedRequest, stopped_by_executor: bool = False) -> bool:
        """End the request CANCELLED if it was asked to stop (or the executor stopped it on its own, at
        interpreter exit). The one place a cancel takes effect; True when the request ended."""
        if stopped_by_executor and tracked.cancel_reason is None:
            tracked.cancel_reason = "cancelled: stopped by the executor"
        if tracked.cancel_reason is None:
            return False
        self.finish(tracked, RequestState.CANCELLED, error=tracked.cancel_reason)
        return True

    def cancel_all(self, reason: str) -> None:
        for tracked in list(self.live.values()):
            self.cancel(tracked, reason)

    def fail_idle(self, error: str) -> None:
        """Fail every request the policy holds that is not running (its planning broke)."""
        for tracked in list(self.live.values()):
            if tracked.in_policy and not tracked.busy:
                self.finish(tracked, RequestState.FAILED, error=error)

    def finish(self, tracked: TrackedRequest, state: RequestState, *, error: str | None = None,
               image: Any = None, png: bytes | None = None) -> None:
        """The one place a request becomes terminal; its one "final" output goes out here."""
        if tracked.state.is_terminal:
            return
        rid = tracked.request_id
        tracked.state = state
        tracked.finished_s = time.monotonic()
        if tracked.in_policy:  # cancelled, or failed in the engine: the policy still plans it
            tracked.in_policy = False
            self._drop_from_policy(rid)
        progress = self._executor.progress(rid)
        try:
            self._executor.release(rid)
        except Exception:  # releasing must never take the engine down
            log.exception("releasing %s failed", rid)
        self.live.pop(rid, None)
        metrics = self._metrics(tracked, progress)
        self.counters.record(state, metrics)
        placement = progress.placement if progress is not None and progress.placement else ()
        devices = tuple(self._devices[i] for i in placement)
        tracked.outputs.put_nowait(tracked.output(
            OutputKind.FINAL, image=image, png=png, metrics=metrics, error=error, devices=devices,
            degree=len(devices), step=progress.step if progress is not None else tracked.last_step_reported))
        tracked.ended.set()
        if not self.live:
            self.all_ended.set()
        self._changed()

    def _metrics(self, tracked: TrackedRequest, progress: Any) -> RequestMetrics:
        """progress: the executor's RequestProgress (None when it never held the request)."""
        end_s = tracked.finished_s if tracked.finished_s is not None else tracked.arrival_s
        queue_end_s = tracked.first_round_s if tracked.first_round_s is not None else end_s
        met = {RequestState.COMPLETED: end_s <= tracked.deadline_at_s, RequestState.FAILED: False}.get(tracked.state)
        metrics = RequestMetrics(total_s=max(0.0, end_s - tracked.arrival_s), deadline_s=tracked.deadline_s,
                                 deadline_met=met, late=tracked.late)
        if progress is not None:
            metrics.encode_s, metrics.denoise_s, metrics.decode_s = progress.encode_s, progress.steps_s, progress.decode_s
            metrics.steps_at_degree, metrics.regroups = dict(progress.steps_at_degree), progress.regroups
            metrics.peak_memory_bytes = progress.peak_memory_bytes
        if not self._measures_memory:  # CPU devices: the process's peak resident set (all of it)
            rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            metrics.peak_memory_bytes = max(metrics.peak_memory_bytes, int(rss_bytes))
        # Waiting for devices; the prompt encode, which overlaps it, is reported apart.
        metrics.queue_s = max(0.0, queue_end_s - tracked.arrival_s - metrics.encode_s)
        return metrics
