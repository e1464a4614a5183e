"""What the engine counts for `AsyncEngine.stats()` (the server's /health and /metrics) and the record of
rounds the demo prints: round records (`RoundLog`), round-clock counters (`RoundCounters`, kept by the
core) and request counters (`RequestCounters`, kept by the tracker). Per-request facts (steps,
degrees, regroups, times) are the executor's; this module only aggregates.

Latency figures are kept as the most recent `SAMPLE_WINDOW` raw samples (seconds) plus running
count and sum, so a Prometheus exporter can turn them into a histogram or summary itself and a
long-running server does not grow without bound.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from tetri_engine.request import RequestMetrics, RequestState

SAMPLE_WINDOW = 1000  # raw latency samples kept per series
ROUND_LOG_SIZE = 10_000  # rounds kept for round_records() (the demo's schedule and Gantt)


class LatencySeries:
    """Recent samples (seconds) of one latency, with count and sum over the engine's whole life."""

    def __init__(self, window: int = SAMPLE_WINDOW):
        self.samples: collections.deque[float] = collections.deque(maxlen=window)
        self.count = 0
        self.sum_s = 0.0

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        self.count += 1
        self.sum_s += seconds

    def recent(self) -> list[float]:
        return list(self.samples)


@dataclass(frozen=True)
class GroupRecord:
    """One device group of one round, as it actually ran."""

    request_ids: tuple[str, ...]
    device_ids: tuple[int, ...]  # indices into the engine's device list
    devices: tuple[str, ...]
    planned_steps: int
    steps_done: dict[str, int]  # request_id -> steps it actually ran this round
    executor_s: float  # the executor's own time for this group: regroup + steps + decode
    start_s: float  # dispatch, seconds since the engine started
    end_s: float  # the loop saw the group finish, seconds since the engine started
    error: str | None = None  # the whole group failed (the future raised)

    @property
    def degree(self) -> int:
        return len(self.device_ids)


@dataclass(frozen=True)
class RoundRecord:
    """One round of the round clock. Times are seconds since the engine started."""

    index: int
    start_s: float
    end_s: float
    plan_s: float  # time spent in policy.schedule()
    groups: tuple[GroupRecord, ...]

    @property
    def wall_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def overhead_s(self) -> float:
        """Round wall time not spent in the executor: loop + plan + dispatch + bookkeeping."""
        busiest_s = max((g.executor_s for g in self.groups), default=0.0)
        return max(0.0, self.wall_s - busiest_s)


@dataclass
class RoundCounters:
    """The round clock's counters since the engine started (or switched policy)."""

    num_devices: int
    started_s: float  # monotonic
    rounds: int = 0
    regroups: int = 0  # latent moves the executor reported, over every request
    device_busy_s: list[float] = field(default_factory=list)
    step_latency: LatencySeries = field(default_factory=LatencySeries)
    round_latency: LatencySeries = field(default_factory=LatencySeries)
    plan_latency: LatencySeries = field(default_factory=LatencySeries)
    round_overhead: LatencySeries = field(default_factory=LatencySeries)

    def __post_init__(self) -> None:
        if not self.device_busy_s:
            self.device_busy_s = [0.0] * self.num_devices

    def record_round(self, record: RoundRecord) -> None:
        self.rounds += 1
        self.round_latency.add(record.wall_s)
        self.plan_latency.add(record.plan_s)
        self.round_overhead.add(record.overhead_s)
        for group in record.groups:
            for device_id in group.device_ids:
                self.device_busy_s[device_id] += group.executor_s

    def busy_fractions(self, now_s: float) -> list[float]:
        elapsed_s = max(now_s - self.started_s, 1e-9)
        return [min(1.0, busy / elapsed_s) for busy in self.device_busy_s]


@dataclass
class _OpenRound:
    start_s: float  # monotonic, when schedule() was called
    plan_s: float
    num_groups: int
    groups: dict[int, GroupRecord] = field(default_factory=dict)


class RoundLog:
    """Rounds as they ran: a round's record is complete once each of its groups has reported."""

    def __init__(self, counters: RoundCounters, size: int = ROUND_LOG_SIZE):
        self.counters = counters
        self._open: dict[int, _OpenRound] = {}  # round_index -> its groups reported so far
        self._done: collections.deque[RoundRecord] = collections.deque(maxlen=size)

    def open(self, round_index: int, num_groups: int, start_s: float, plan_s: float) -> None:
        self._open[round_index] = _OpenRound(start_s, plan_s, num_groups)

    def discard(self, round_index: int) -> None:
        self._open.pop(round_index, None)

    def close_group(self, round_index: int, group_index: int, record: GroupRecord) -> None:
        """Record one finished group; the round's record is complete with its last group."""
        round_ = self._open.get(round_index)
        if round_ is None:
            return
        round_.groups[group_index] = record
        if len(round_.groups) == round_.num_groups:
            del self._open[round_index]
            t0 = self.counters.started_s
            done = RoundRecord(index=round_index, start_s=round_.start_s - t0, end_s=record.end_s,
                               plan_s=round_.plan_s, groups=tuple(round_.groups[i] for i in range(round_.num_groups)))
            self._done.append(done)
            self.counters.record_round(done)

    def records(self) -> list[RoundRecord]:
        return list(self._done)


@dataclass
class RequestCounters:
    """Requests by terminal state, and deadlines met, since the engine started (or switched policy)."""

    states: collections.Counter = field(default_factory=collections.Counter)
    deadline_met: int = 0
    deadline_total: int = 0  # completed + failed: cancelled and rejected requests do not count

    def record(self, state: RequestState, metrics: RequestMetrics | None = None) -> None:
        self.states[state.value] += 1
        if metrics is not None and metrics.deadline_met is not None:
            self.deadline_total += 1
            self.deadline_met += int(metrics.deadline_met)


def stats_dict(*, requests: RequestCounters, rounds: RoundCounters, devices: list[str], waiting: int,
               running: int, now_s: float) -> dict[str, Any]:
    """The counters part of `AsyncEngine.stats()` (docs/ARCHITECTURE.md, `engine`)."""
    states = {s.value: 0 for s in RequestState}
    states.update(requests.states)
    states[RequestState.WAITING.value] = waiting
    states[RequestState.RUNNING.value] = running
    return {
        "queue_depth": waiting,
        "running": running,
        "states": states,
        "sar": requests.deadline_met / requests.deadline_total if requests.deadline_total else None,
        "deadline_met": requests.deadline_met,
        "deadline_total": requests.deadline_total,
        "device_busy_fraction": dict(zip(devices, rounds.busy_fractions(now_s))),
        "regroups": rounds.regroups,
        "rounds": rounds.rounds,
        "step_latency_s": rounds.step_latency.recent(),
        "step_latency_count": rounds.step_latency.count,
        "step_latency_sum_s": rounds.step_latency.sum_s,
        "round_latency_s": rounds.round_latency.recent(),
        "round_latency_count": rounds.round_latency.count,
        "round_latency_sum_s": rounds.round_latency.sum_s,
        "plan_latency_s": rounds.plan_latency.recent(),
        "round_overhead_s": rounds.round_overhead.recent(),
    }
