"""What travels between a replica (replica.py) and the ingress (engine.py): plain picklable dataclasses,
every one naming the replica it comes from (its Ray Serve replica id, 8 characters).

A replica's `generate` yields `Refused` (admission said no; nothing was queued) or `Accepted` (with
the "queued" output) first, then the engine's outputs with their images as PNG bytes only (a PIL image
does not cross processes), their devices labelled "<replica>/<device>" and the final metrics as
`ClusterRequestMetrics` (the response's `metrics[i].replica` says who served it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tetri_engine.errors import EngineNotRunning, RejectionReason, RequestRejected
from tetri_engine.request import GenerationOutput, RequestMetrics, SizeRule
from tetri_engine.sched.routing import Offer, Quote


@dataclass
class ClusterRequestMetrics(RequestMetrics):
    replica: str = ""  # the replica that served the request

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "replica": self.replica}


def device_label(replica: str, device: str) -> str:
    """A device named across the cluster: every replica has its own cpu:0 / cuda:0."""
    return f"{replica}/{device}"


def label_output(out: GenerationOutput, replica: str, png: bytes | None) -> GenerationOutput:
    """`out` as it travels: no PIL image (png instead), devices labelled, final metrics tagged."""
    metrics = out.metrics
    if metrics is not None:
        metrics = ClusterRequestMetrics(**dataclasses.asdict(metrics), replica=replica)
    return dataclasses.replace(out, image=None, png=png, metrics=metrics,
                               devices=tuple(device_label(replica, d) for d in out.devices))


@dataclass(frozen=True)
class Refused:
    """The replica's admission refused the request; nothing was queued. kind: "rejected" (a
    RequestRejected: reason, retry_after_s), "invalid" (a ValueError: the request itself is wrong) or
    "not_running" (EngineNotRunning)."""

    replica: str
    kind: str
    message: str
    reason: str | None = None
    retry_after_s: float | None = None

    @classmethod
    def of(cls, replica: str, exc: Exception) -> Refused:
        if isinstance(exc, RequestRejected):
            return cls(replica, "rejected", str(exc), exc.reason.value, exc.retry_after_s)
        if isinstance(exc, EngineNotRunning):
            return cls(replica, "not_running", str(exc))
        return cls(replica, "invalid", str(exc))

    def to_exception(self) -> Exception:
        """The exception AsyncEngine.generate would have raised, for the server to map as it does."""
        if self.kind == "rejected":
            return RequestRejected(self.message, RejectionReason(self.reason), self.retry_after_s)
        if self.kind == "not_running":
            return EngineNotRunning(self.message)
        return ValueError(self.message)


@dataclass(frozen=True)
class Accepted:
    """The replica took the request: its process (for faults) and the "queued" output."""

    replica: str
    pid: int
    queued: GenerationOutput


@dataclass(frozen=True)
class ReplicaEstimate:
    """A replica's `AsyncEngine.estimate` for one request, or why it could not give one (error: the
    request is invalid; the same message every replica would give)."""

    replica: str
    estimate: Quote | None = None
    error: str | None = None

    def offer(self) -> Offer:
        return Offer(**vars(self.estimate), replica=self.replica)


@dataclass(frozen=True)
class ReplicaStatus:
    """What the ingress polls: the replica's engine stats (AsyncEngine.stats(), devices labelled) and the
    facts the server needs before a request (model, sizes, default steps)."""

    replica: str
    pid: int
    ready: bool
    draining: bool
    model: str
    policy: str
    devices: tuple[str, ...]  # labelled
    busy_devices: tuple[str, ...]  # labelled
    default_steps: int | None
    size_rule: SizeRule
    stats: dict[str, Any]
