"""What the engine knows of each accepted request, from admission to its one terminal state.

A `TrackedRequest` lives on the event loop only (executor threads never see it). Its `outputs`
queue feeds `AsyncEngine.generate()`; `finish()` in the engine is the single place that moves it to a
terminal state, which is how "exactly one final output per request" is kept.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tetri_engine.request import GenerationOutput, GenerationRequest, RequestMetrics, RequestState


@dataclass
class TrackedRequest:
    request: GenerationRequest  # validated copy: steps, guidance, seed, request_id filled in
    arrival_s: float  # monotonic clock, the same clock the policy is given
    deadline_at_s: float  # absolute (monotonic); arrival_s + deadline_rel_s
    deadline_rel_s: float
    best_effort: bool  # accepted although its deadline looked impossible (admission="best_effort")
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)

    state: RequestState = RequestState.WAITING
    encoded: bool = False  # prompt encoded and noise drawn: the policy knows it
    in_round: bool = False  # its steps are running in the executor right now
    steps_done: int = 0
    device_ids: tuple[int, ...] = ()  # the group of its last round
    cancel_reason: str | None = None  # set when asked to stop while its steps run
    last_step_reported: int = 0
    last_preview_step: int = 0

    # Metrics, filled in as it goes.
    encode_submitted_s: float | None = None
    first_round_s: float | None = None
    finished_s: float | None = None
    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    regroups: int = 0
    steps_at_degree: dict[int, int] = field(default_factory=dict)
    peak_memory_bytes: int = 0
    finished_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def request_id(self) -> str:
        return self.request.request_id  # type: ignore[return-value]

    @property
    def total_steps(self) -> int:
        return self.request.num_inference_steps  # type: ignore[return-value]

    @property
    def width(self) -> int:
        return self.request.width

    @property
    def height(self) -> int:
        return self.request.height

    def metrics(self) -> RequestMetrics:
        end_s = self.finished_s if self.finished_s is not None else self.arrival_s
        queue_end_s = self.first_round_s if self.first_round_s is not None else end_s
        met = None
        if self.state == RequestState.COMPLETED:
            met = end_s <= self.deadline_at_s
        elif self.state == RequestState.FAILED:
            met = False
        return RequestMetrics(
            # Waiting for devices; the prompt encode, which overlaps it, is reported apart.
            queue_s=max(0.0, queue_end_s - self.arrival_s - self.encode_s),
            encode_s=self.encode_s,
            denoise_s=self.denoise_s,
            decode_s=self.decode_s,
            total_s=max(0.0, end_s - self.arrival_s),
            steps_at_degree=dict(self.steps_at_degree),
            regroups=self.regroups,
            deadline_s=self.deadline_rel_s,
            deadline_met=met,
            peak_memory_bytes=self.peak_memory_bytes,
        )

    def output(self, kind: str, **fields) -> GenerationOutput:
        fields.setdefault("state", self.state)
        fields.setdefault("step", self.steps_done)
        fields.setdefault("total_steps", self.total_steps)
        fields.setdefault("seed", self.request.seed)
        return GenerationOutput(request_id=self.request_id, kind=kind, **fields)
