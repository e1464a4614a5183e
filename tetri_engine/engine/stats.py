"""Counters the engine keeps for `AsyncEngine.stats()` (the server's /health and /metrics) and the
per-round record the demo prints.

Latency figures are kept as the most recent `SAMPLE_WINDOW` raw samples (seconds) plus running
count and sum, so a Prometheus exporter can turn them into a histogram or summary itself and a
long-running server does not grow without bound.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

SAMPLE_WINDOW = 1000  # raw latency samples kept per series


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

    def median(self) -> float | None:
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


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
class EngineCounters:
    num_devices: int
    started_s: float  # monotonic time the engine became ready
    rounds: int = 0
    regroups: int = 0
    deadline_met: int = 0
    deadline_total: int = 0
    states: collections.Counter = field(default_factory=collections.Counter)
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
