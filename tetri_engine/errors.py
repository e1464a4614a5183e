"""Errors a user of the engine can meet, each with a message that says what to change."""
from __future__ import annotations


class RequestRejected(Exception):
    """Admission refused the request; nothing was queued.

    `reason` is one of "queue_full", "deadline_impossible", "invalid", "draining".
    `retry_after_s` is a hint for clients (HTTP 429 Retry-After), None when retrying will not help.
    """

    def __init__(self, message: str, reason: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class EngineNotRunning(Exception):
    """The engine is starting, draining or stopped (HTTP 503)."""
