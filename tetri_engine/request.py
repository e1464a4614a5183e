"""What a user sends (GenerationRequest) and what comes back (GenerationOutput, RequestMetrics)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestState(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    @property
    def is_terminal(self) -> bool:
        return self in (RequestState.COMPLETED, RequestState.FAILED, RequestState.CANCELLED,
                        RequestState.REJECTED)


@dataclass
class GenerationRequest:
    prompt: str
    width: int = 512
    height: int = 512
    num_inference_steps: int | None = None  # None: the model's default
    guidance_scale: float | None = None  # None: the model's default
    negative_prompt: str | None = None
    seed: int | None = None  # None: drawn at random (reported in the output)
    # Deadline in seconds from arrival. None: SLO table for the resolution x slo_scale.
    deadline_s: float | None = None
    slo_scale: float | None = None
    priority: int = 0
    request_id: str | None = None
    cache: str = "off"  # step caching: "off" | "auto"
    preview_every: int = 0  # >0: a low-cost preview image every K steps (streaming)


@dataclass
class RequestMetrics:
    queue_s: float = 0.0
    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    steps_at_degree: dict[int, int] = field(default_factory=dict)  # degree -> steps run at it
    regroups: int = 0
    deadline_s: float | None = None  # relative to arrival
    deadline_met: bool | None = None
    peak_memory_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue_s": self.queue_s,
            "encode_s": self.encode_s,
            "denoise_s": self.denoise_s,
            "decode_s": self.decode_s,
            "total_s": self.total_s,
            "steps_at_degree": {str(k): v for k, v in sorted(self.steps_at_degree.items())},
            "regroups": self.regroups,
            "deadline_s": self.deadline_s,
            "deadline_met": self.deadline_met,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


@dataclass
class GenerationOutput:
    """One item of `AsyncEngine.generate()`.

    kind: "queued" (always first; queue_position), "round" (degree, devices assigned for a round),
    "step" (step k of total done), "preview" (image is a low-cost preview), "final" (last item:
    state is terminal; image/png set when completed, error set otherwise).
    """

    request_id: str
    kind: str
    state: RequestState = RequestState.WAITING
    step: int = 0
    total_steps: int = 0
    degree: int = 0
    devices: tuple[str, ...] = ()
    queue_position: int | None = None
    image: Any = None  # PIL.Image.Image
    png: bytes | None = None
    seed: int | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.kind == "final"
