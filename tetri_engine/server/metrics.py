"""GET /metrics: the engine's stats and the server's counters in Prometheus text format (0.0.4).

Written by hand (no prometheus_client at run time): the engine already keeps the numbers
(`AsyncEngine.stats()`), so this is formatting only. Every family is always present, with zeros
before the engine is ready, so dashboards and alerts do not see series appear and vanish.

Latency histograms: the engine keeps the most recent samples of each latency plus an exact count
and sum over its life (`tetri_engine/engine/stats.py`). Prometheus histograms must be cumulative,
so `LatencyHistograms` folds the samples that are new since the previous scrape into cumulative
buckets. If more samples arrived between two scrapes than the engine keeps, the values of the
oldest are gone: they still count in `_count`, `_sum` and the `+Inf` bucket, not in finite buckets.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. A tiny model step on CPU is ~1 ms, a FLUX 2048^2 step ~1 s, a round up to ~10 s.
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ROUND_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TERMINAL_STATES = ("completed", "failed", "cancelled", "rejected")


@dataclass
class Histogram:
    buckets_s: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per finite bucket, not cumulative
    count: int = 0  # every observation, including those whose value was lost
    sum_s: float = 0.0

    def __post_init__(self):
        self.counts = [0] * len(self.buckets_s)

    def fold(self, recent: list[float], count: int, sum_s: float) -> None:
        """Take the engine's series (recent samples, life-time count and sum)."""
        new = count - self.count
        if new < 0:  # a new engine (counters restarted): start again
            self.__post_init__()
            self.count, self.sum_s, new = 0, 0.0, count
        for value in recent[max(0, len(recent) - new):]:
            for i, bound in enumerate(self.buckets_s):
                if value <= bound:
                    self.counts[i] += 1
                    break
        self.count, self.sum_s = count, sum_s

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip(self.buckets_s, self.counts):
            total += n
            out.append((_number(bound), total))
        out.append(("+Inf", self.count))
        return out


@dataclass
class LatencyHistograms:
    step: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS_S))
    round: Histogram = field(default_factory=lambda: Histogram(ROUND_BUCKETS_S))

    def fold(self, stats: dict[str, Any]) -> None:
        for hist, key in ((self.step, "step_latency_s"), (self.round, "round_latency_s")):
            recent = list(stats.get(key) or [])
            count = stats.get(key.removesuffix("_s") + "_count", len(recent))
            sum_s = stats.get(key.removesuffix("_s") + "_sum_s", sum(recent))
            hist.fold(recent, int(count), float(sum_s))


def render(stats: dict[str, Any] | None, responses: Counter, latency: LatencyHistograms,
           ready: bool, draining: bool, connections: int = 0) -> str:
    """The exposition text. `stats` is `AsyncEngine.stats()`, None before the engine is ready."""
    s = stats or {}
    if stats is not None:
        latency.fold(stats)
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict, float]]):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{_labels(labels)} {_number(value)}")

    family("tetri_engine_ready", "gauge", "1 when the engine serves requests.",
           [({}, int(ready))])
    family("tetri_server_draining", "gauge", "1 while the server shuts down.",
           [({}, int(draining))])
    family("tetri_http_responses_total", "counter",
           "HTTP answers by route and status code (route \"malformed\": refused before routing; \"client_gone\" 499: the client left before its request was read).",
           [({"route": route, "status": str(status)}, n)
            for (route, status), n in sorted(responses.items())])
    family("tetri_http_open_connections", "gauge", "Client connections open now.", [({}, connections)])

    states = Counter(s.get("states") or {})
    family("tetri_requests_total", "counter", "Engine requests by terminal state.",
           [({"state": st}, states.get(st, 0)) for st in TERMINAL_STATES])
    family("tetri_queue_depth", "gauge", "Requests accepted and not yet running.",
           [({}, s.get("queue_depth", 0))])
    family("tetri_running_requests", "gauge", "Requests with steps in progress.",
           [({}, s.get("running", 0))])
    sar = s.get("sar")
    family("tetri_slo_attainment_ratio", "gauge",
           "Finished requests that met their deadline / finished requests (NaN before any).",
           [({}, math.nan if sar is None else sar)])
    family("tetri_deadline_met_total", "counter", "Requests finished by their deadline.",
           [({}, s.get("deadline_met", 0))])
    family("tetri_deadline_total", "counter", "Requests counted for SLO attainment.",
           [({}, s.get("deadline_total", 0))])
    family("tetri_device_busy_fraction", "gauge",
           "Fraction of time since start-up each device spent running steps.",
           [({"device": d}, f) for d, f in sorted((s.get("device_busy_fraction") or {}).items())])
    family("tetri_regroups_total", "counter",
           "Latent moves because a request's device group changed between rounds.",
           [({}, s.get("regroups", 0))])
    family("tetri_rounds_total", "counter", "Rounds run by the round clock.",
           [({}, s.get("rounds", 0))])

    cache = s.get("comm_cache") or {}
    family("tetri_comm_cache_hits_total", "counter", "Communicator cache hits (group reused).",
           [({}, cache.get("hits", 0))])
    family("tetri_comm_cache_misses_total", "counter",
           "Communicator cache misses (group created).", [({}, cache.get("misses", 0))])
    family("tetri_comm_cache_evicted_total", "counter", "Communicators destroyed by the LRU.",
           [({}, cache.get("evicted", 0))])
    family("tetri_comm_cache_size", "gauge", "Communicators alive.",
           [({}, cache.get("size", 0))])
    family("tetri_comm_cache_creation_seconds_total", "counter",
           "Time spent creating communicators.", [({}, cache.get("creation_s", 0.0))])

    lines += _histogram_lines(latency)
    return "\n".join(lines) + "\n"


def _histogram_lines(latency: LatencyHistograms) -> list[str]:
    lines = []
    for name, hist, help_text in (
            ("tetri_step_latency_seconds", latency.step, "Time of one denoising step."),
            ("tetri_round_latency_seconds", latency.round, "Wall time of one round.")):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} histogram")
        for bound, n in hist.cumulative():
            lines.append(f'{name}_bucket{{le="{bound}"}} {n}')
        lines.append(f"{name}_sum {_number(hist.sum_s)}")
        lines.append(f"{name}_count {hist.count}")
    return lines


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(int(value))
