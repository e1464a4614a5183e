"""Errors a user of the engine can meet, each with a message that says what to change."""
from __future__ import annotations

from tetri_engine.request import StrEnum


class RejectionReason(StrEnum):
    """Why admission refused a request that was itself valid (bad input is a ValueError instead)."""

    QUEUE_FULL = "queue_full"  # max_queue requests are waiting or running; retry_after_s says when to retry
    DEADLINE_IMPOSSIBLE = "deadline_impossible"  # even alone on every device it would finish too late
    DRAINING = "draining"  # the engine is shutting down
    BUSY = "busy"  # would miss its deadline alongside the accepted requests; retry_after_s: when it would fit


class RequestRejected(Exception):
    """Admission refused the request; nothing was queued.

    `reason` is a RejectionReason (server/protocol.py REJECTIONS maps each to an HTTP answer).
    `retry_after_s` is a hint for clients (HTTP Retry-After), None when retrying will not help.
    """

    def __init__(self, message: str, reason: RejectionReason, retry_after_s: float | None = None):
        super().__init__(message)
        self.reason = RejectionReason(reason)
        self.retry_after_s = retry_after_s


class EngineNotRunning(Exception):
    """The engine is starting, draining or stopped (HTTP 503)."""
