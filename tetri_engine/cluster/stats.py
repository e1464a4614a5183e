"""ClusterStats: the replicas' `AsyncEngine.stats()` folded into one dict of the same shape, for the
server's /health and /metrics (which read one engine's stats and need not know there are several).

- Gauges (queue depth, running, device busy fractions, communicators alive) are summed, or joined, over
  the replicas that answered the last poll.
- Counters (requests by terminal state, deadlines met, regroups, rounds, communicator hits...) are summed
  over every replica ever seen: a replica that stops answering (dead, replaced by Ray) keeps its last
  counts, so the totals never go back (Prometheus counters must not); one that answers again is live.
- Latency series: each replica reports its recent samples with a life-time count and sum; the samples
  new since the previous poll go, in poll order, into one series whose count and sum are the totals,
  so the server's histograms fold exactly the new samples (server/metrics.py).
"""
from __future__ import annotations

import collections
from typing import Any, Iterable

from tetri_engine.cluster.wire import ReplicaStatus
from tetri_engine.engine.stats import SAMPLE_WINDOW

TERMINAL = ("completed", "failed", "cancelled", "rejected")
COUNTERS = ("deadline_met", "deadline_total", "regroups", "rounds")
CACHE_COUNTERS = ("created", "hits", "misses", "evicted", "creation_s")
SERIES = ("step_latency", "round_latency")


class MergedSeries:
    """One latency series over replicas: new samples appended as they are seen, counts and sums totalled."""

    def __init__(self) -> None:
        self.samples: collections.deque[float] = collections.deque(maxlen=SAMPLE_WINDOW)
        self.count = 0
        self.sum_s = 0.0
        self._seen: dict[str, tuple[int, float]] = {}  # replica -> (count, sum) last seen

    def update(self, replica: str, recent: list[float], count: int, sum_s: float) -> None:
        seen_count, seen_sum = self._seen.get(replica, (0, 0.0))
        if count < seen_count:  # its engine restarted its counters
            seen_count, seen_sum = 0, 0.0
        new = count - seen_count
        if new > 0:
            self.samples.extend(recent[-new:])
        self.count += new
        self.sum_s += sum_s - seen_sum
        self._seen[replica] = (count, sum_s)


class ClusterStats:
    def __init__(self) -> None:
        self.live: dict[str, ReplicaStatus] = {}  # replica -> its status in the last poll
        self._gone: dict[str, ReplicaStatus] = {}  # replicas that stopped answering: their last counts
        self._series = {name: MergedSeries() for name in SERIES}

    def update(self, statuses: Iterable[ReplicaStatus]) -> None:
        """A poll's answers (replicas that did not answer are left out)."""
        now = {s.replica: s for s in statuses}
        for replica in set(self.live) - set(now):
            self._gone[replica] = self.live[replica]
        for replica, status in now.items():
            self._gone.pop(replica, None)
            for name, series in self._series.items():
                st = status.stats
                series.update(replica, list(st.get(f"{name}_s") or []), int(st.get(f"{name}_count", 0)),
                              float(st.get(f"{name}_sum_s", 0.0)))
        self.live = now

    def stats(self) -> dict[str, Any]:
        """The AsyncEngine.stats() shape, over the cluster."""
        live = [s.stats for s in self.live.values()]
        every = live + [s.stats for s in self._gone.values()]
        states = {st: sum((s.get("states") or {}).get(st, 0) for s in every) for st in TERMINAL}
        states["waiting"] = sum((s.get("states") or {}).get("waiting", 0) for s in live)
        states["running"] = sum((s.get("states") or {}).get("running", 0) for s in live)
        totals = {key: sum(s.get(key, 0) for s in every) for key in COUNTERS}
        cache = {key: sum((s.get("comm_cache") or {}).get(key, 0) for s in every) for key in CACHE_COUNTERS}
        cache["size"] = sum((s.get("comm_cache") or {}).get("size", 0) for s in live)
        first = next(iter(self.live.values()), None)
        out: dict[str, Any] = {
            "phase": "ready" if any(s.ready for s in self.live.values()) else "starting",
            "model": first.model if first else None, "policy": first.policy if first else None,
            "replicas": sorted(self.live),
            "devices": [d for s in self.live.values() for d in s.devices],
            "queue_depth": sum(s.get("queue_depth", 0) for s in live),
            "running": sum(s.get("running", 0) for s in live), "states": states, **totals,
            "sar": totals["deadline_met"] / totals["deadline_total"] if totals["deadline_total"] else None,
            "device_busy_fraction": {d: f for s in live for d, f in (s.get("device_busy_fraction") or {}).items()},
            "comm_cache": cache,
            "plan_latency_s": [x for s in live for x in s.get("plan_latency_s") or []][-SAMPLE_WINDOW:],
            "round_overhead_s": [x for s in live for x in s.get("round_overhead_s") or []][-SAMPLE_WINDOW:],
        }
        for name, series in self._series.items():
            out[f"{name}_s"] = list(series.samples)
            out[f"{name}_count"] = series.count
            out[f"{name}_sum_s"] = series.sum_s
        return out
