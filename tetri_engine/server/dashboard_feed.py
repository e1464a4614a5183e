"""What the live dashboard shows, built from the engine's public read-only API. No aiohttp here.

`DashboardFeed` samples `engine.live_requests()` every SAMPLE_S (sizes and deadlines of requests
that may finish between two publishes; the queue; groups running now) and every PUBLISH_S reads
`engine.round_records()` and `engine.stats()`: the groups that ended since the last publish, and
one sample of the deadline counters. Pages get a `snapshot()` (everything in their window) when
they connect or fall behind, then one `tick()` per publish (what changed). Times are seconds since
the engine started, the clock of round_records().

Bounded memory: the groups of the last HISTORY_S (at most MAX_GROUPS), the counter samples of the
last HISTORY_S, at most MAX_KNOWN request sizes and late marks, at most MAX_RUNNING groups that
run now or ended without a record yet. A page that falls behind is sent a new snapshot rather
than a backlog, so a slow page costs nothing here.

A block on the timeline is one group: its devices, request ids, degree, steps, the requests'
size, and `late`: those of its requests that were seen late (`live_requests()` decides that) or
whose deadline it ended after. Groups running now come from live_requests() ("running": true,
and "ended": true once they stopped) and give way to their record once their round has ended
(same start time and devices).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("tetri_engine.server.dashboard")

HISTORY_S = 300.0  # the longest window a page may ask for
SAMPLE_S = 0.05  # a request that starts and ends between two samples shows with its size unknown
PUBLISH_S = 0.5
MAX_GROUPS = 10_000
MAX_KNOWN = 4096
MAX_RUNNING = 256


@dataclass(frozen=True)
class CounterSample:
    t_s: float
    deadline_met: int
    deadline_total: int


class DashboardFeed:
    """One per app. `run()` is its sampling task; pages call `snapshot`, `tick` and `wait_after`."""

    def __init__(self, get_engine: Callable[[], Any]):
        self._get_engine = get_engine
        self.seq = 0  # publishes so far; a page that saw seq - 1 gets tick(), any other a snapshot()
        self.closed = False
        self._changed = asyncio.Event()
        self._header = _header(None, {})
        self._reset(epoch=None)

    def _reset(self, epoch: float | None) -> None:
        """Forget everything: a new engine clock (start-up, or switch_policy restarted it)."""
        self._epoch = epoch
        self._rounds_seen = 0
        self._known: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._late: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._running: dict[tuple, dict] = {}  # (start_s, devices) -> group running or awaiting its record
        self._groups: collections.deque[dict] = collections.deque(maxlen=MAX_GROUPS)
        self._samples: collections.deque[CounterSample] = collections.deque(
            maxlen=int(HISTORY_S / PUBLISH_S) + 2)
        self._new_groups: list[dict] = []
        self._queue: list[dict] = []
        self._stats: dict = {}
        self._now_s = 0.0
        self.seq += 2  # pages see a gap and ask for a snapshot

    # ---- the sampling task -------------------------------------------------------------------

    async def run(self) -> None:
        per_publish = max(1, round(PUBLISH_S / SAMPLE_S))
        count = 0
        while not self.closed:
            try:
                engine = self._get_engine()
                epoch = self._epoch
                if engine is not None and (engine.is_ready or engine.is_draining):
                    self.sample(engine)
                if count % per_publish == 0 or self._epoch != epoch:  # a new clock: show it at once
                    self.publish(engine)
            except Exception:  # the dashboard must never take the server down
                log.exception("dashboard sampling failed")
            count += 1
            await asyncio.sleep(SAMPLE_S)

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def wait_after(self, seq: int) -> None:
        """Return once a publish after `seq` happened (or the feed closed)."""
        while self.seq == seq and not self.closed:
            await self._changed.wait()

    def sample(self, engine) -> None:
        if engine.started_s != self._epoch:
            self._reset(engine.started_s)
        now_s = time.monotonic() - engine.started_s
        live = engine.live_requests()
        running: dict[tuple, dict] = {}
        for r in live:
            rid = r["request_id"]
            _remember(self._known, rid, {"width": r["width"], "height": r["height"],
                                         "deadline_s": r["deadline_s"]})
            if r["late"]:
                _remember(self._late, rid, None)
            if r["devices"]:
                key = (r["group_start_s"], tuple(r["devices"]))
                group = running.setdefault(key, {
                    "start_s": r["group_start_s"], "devices": list(r["devices"]), "request_ids": [],
                    "degree": len(r["devices"]), "width": r["width"], "height": r["height"],
                    "steps": 0, "running": True, "ended": False})
                group["request_ids"].append(rid)
        for key, group in self._running.items():  # ended, record not in yet: keep it where it stopped
            if key not in running:
                group["ended"] = True
        for key, group in running.items():
            group["end_s"] = now_s
            group["late"] = self._late_ids(group["request_ids"], now_s)
            self._running[key] = group
        while len(self._running) > MAX_RUNNING:
            self._running.pop(next(iter(self._running)))
        self._queue = [_queue_row(r, now_s) for r in sorted(live, key=lambda r: r["deadline_s"])]
        self._now_s = now_s

    def publish(self, engine) -> None:
        """Take in the rounds that ended and the counters; wake the pages."""
        self._new_groups = []
        if engine is not None and self._epoch is not None and engine.started_s == self._epoch:
            stats = engine.stats()
            records = engine.round_records()
            new = stats.get("rounds", 0) - self._rounds_seen
            for record in records[len(records) - new:] if new > 0 else []:
                for g in record.groups:
                    view = self._group_view(g)
                    self._running.pop((g.start_s, g.devices), None)
                    self._new_groups.append(view)
                    self._groups.append(view)
            self._rounds_seen = stats.get("rounds", 0)
            self._stats = stats
            self._now_s = time.monotonic() - engine.started_s
            self._samples.append(CounterSample(self._now_s, stats.get("deadline_met", 0),
                                               stats.get("deadline_total", 0)))
            horizon_s = self._now_s - HISTORY_S
            while self._groups and self._groups[0]["end_s"] < horizon_s:
                self._groups.popleft()
            for key in [k for k, g in self._running.items() if g["end_s"] < horizon_s]:
                del self._running[key]
        elif engine is not None:
            self._stats = engine.stats()
        self._header = _header(engine, self._stats)
        self.seq += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _group_view(self, g) -> dict:
        known = self._known.get(g.request_ids[0], {})
        return {"start_s": g.start_s, "end_s": g.end_s, "devices": list(g.devices),
                "request_ids": list(g.request_ids), "degree": g.degree,
                "steps": max(g.steps_done.values(), default=0),
                "width": known.get("width"), "height": known.get("height"),
                "late": self._late_ids(g.request_ids, g.end_s), "error": g.error, "running": False}

    def _late_ids(self, request_ids, end_s: float) -> list[str]:
        """Those seen late, or whose deadline had passed by end_s."""
        return [rid for rid in request_ids if rid in self._late
                or end_s > self._known.get(rid, {}).get("deadline_s", float("inf"))]

    # ---- what pages get ----------------------------------------------------------------------

    def snapshot(self, window_s: float) -> dict:
        """Everything a page needs to draw its window from scratch."""
        since_s = self._now_s - window_s
        groups = [g for g in self._groups if g["end_s"] >= since_s]
        return {**self._header, "now_s": self._now_s, "window_s": window_s, "groups": groups,
                **self._live_part(window_s)}

    def tick(self, window_s: float) -> dict:
        """What changed since the previous publish, for a page that has seen it."""
        return {**self._header, "now_s": self._now_s, "window_s": window_s,
                "groups": self._new_groups, **self._live_part(window_s)}

    def _live_part(self, window_s: float) -> dict:
        return {"running": list(self._running.values()), "queue": self._queue,
                "counters": self._counters(window_s)}

    def _counters(self, window_s: float) -> dict:
        stats = self._stats
        met, total = self._deadline_delta(window_s)
        cache = stats.get("comm_cache") or {}
        return {
            "window_s": window_s,
            "sar_window": met / total if total else None, "met_window": met, "missed_window": total - met,
            "sar_total": stats.get("sar"), "deadline_met": stats.get("deadline_met", 0),
            "deadline_total": stats.get("deadline_total", 0), "states": stats.get("states", {}),
            "queue_depth": stats.get("queue_depth", 0), "running": stats.get("running", 0),
            "regroups": stats.get("regroups", 0), "rounds": stats.get("rounds", 0),
            "comm_cache": {k: cache.get(k, 0) for k in ("hits", "misses", "created", "size")},
            "busy_window": self._busy_window(window_s),
            "busy_total": stats.get("device_busy_fraction", {}),
        }

    def _deadline_delta(self, window_s: float) -> tuple[int, int]:
        """(met, total) of the deadlines decided (completed or failed requests) in the last window_s."""
        if not self._samples:
            return 0, 0
        last = self._samples[-1]
        # The engine's counters start at zero with its clock; once samples were dropped, the oldest.
        base = self._samples[0] if len(self._samples) == self._samples.maxlen else CounterSample(0.0, 0, 0)
        for sample in reversed(self._samples):
            if sample.t_s <= last.t_s - window_s:
                base = sample
                break
        return last.deadline_met - base.deadline_met, last.deadline_total - base.deadline_total

    def _busy_window(self, window_s: float) -> dict[str, float]:
        """Per device: the share of the last window_s its blocks cover (ended and running groups)."""
        since_s = max(0.0, self._now_s - window_s)
        span_s = max(self._now_s - since_s, 1e-9)
        busy = {d: 0.0 for d in self._header.get("devices", [])}
        for g in [*self._groups, *self._running.values()]:
            overlap_s = min(g["end_s"], self._now_s) - max(g["start_s"], since_s)
            if overlap_s > 0:
                for d in g["devices"]:
                    busy[d] = busy.get(d, 0.0) + overlap_s
        return {d: min(1.0, s / span_s) for d, s in busy.items()}


def _remember(store: collections.OrderedDict, key: str, value) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > MAX_KNOWN:
        store.popitem(last=False)


def _queue_row(r: dict, now_s: float) -> dict:
    return {"request_id": r["request_id"], "width": r["width"], "height": r["height"],
            "steps_done": r["steps_done"], "num_steps": r["num_steps"], "state": r["state"],
            "devices": r["devices"], "deadline_in_s": r["deadline_s"] - now_s,
            "slack_s": r["slack_s"], "late": r["late"]}


def _header(engine, stats: dict) -> dict:
    if engine is None:
        return {"phase": "starting", "model": None, "policy": None, "devices": []}
    return {"phase": stats.get("phase", "starting"), "model": engine.model_name,
            "policy": engine.policy_name, "devices": engine.devices}
