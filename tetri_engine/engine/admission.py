"""Admission: check a GenerationRequest, fill in its defaults, and decide whether it can be queued.

Two kinds of refusal, kept apart on purpose:
- `ValueError`: the request itself is wrong (size not a multiple of 16, too many steps, ...). Sending
  it again will never help; the message says what to change.
- `RequestRejected`: the request is fine but the engine cannot take it now (queue full, draining) or
  cannot meet its deadline even with every device on it. `retry_after_s` is a hint for clients.

Nothing here touches the event loop or the executor, so it is cheap to call before anything is queued.
"""
from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass, replace

from tetri_engine.config import EngineConfig
from tetri_engine.request import GenerationRequest

# Below this an image is a handful of tokens: a degree-4 shard would be mostly padding.
MIN_SIZE_PX = 64
MAX_SEED = 2**63 - 1
CACHE_MODES = ("off", "auto")


@dataclass(frozen=True)
class ModelLimits:
    """What admission needs to know of the loaded model."""

    patch_px: int  # width and height must be multiples of this (16 for FLUX and SD3)
    default_steps: int
    default_guidance: float


def validate_request(request: GenerationRequest, config: EngineConfig, limits: ModelLimits) -> GenerationRequest:
    """Return a copy of `request` with every default filled in, or raise ValueError saying what is wrong."""
    if not isinstance(request, GenerationRequest):
        raise TypeError(f"expected a GenerationRequest, got {type(request).__name__}")
    if not isinstance(request.prompt, str):
        raise ValueError(f"prompt must be a string, got {type(request.prompt).__name__}")
    if request.negative_prompt is not None and not isinstance(request.negative_prompt, str):
        raise ValueError("negative_prompt must be a string or None")

    for name, value, limit in (("width", request.width, config.max_width),
                               ("height", request.height, config.max_height)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer number of pixels, got {value!r}")
        if value % limits.patch_px != 0:
            lower = value - value % limits.patch_px
            raise ValueError(f"{name}={value} is not a multiple of {limits.patch_px} "
                             f"(try {max(lower, limits.patch_px)} or {lower + limits.patch_px})")
        if value < MIN_SIZE_PX:
            raise ValueError(f"{name}={value} is below the minimum of {MIN_SIZE_PX} px")
        if value > limit:
            raise ValueError(f"{name}={value} is beyond this engine's maximum of {limit} px")

    steps = limits.default_steps if request.num_inference_steps is None else request.num_inference_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= config.max_steps:
        raise ValueError(f"num_inference_steps={steps!r} is out of range: it must be an integer "
                         f"from 1 to {config.max_steps}")

    guidance = limits.default_guidance if request.guidance_scale is None else request.guidance_scale
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance) \
            or guidance < 0:
        raise ValueError(f"guidance_scale={guidance!r} must be a finite number >= 0")

    seed = request.seed
    if seed is None:
        seed = random.SystemRandom().randrange(0, 2**32)
    elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r} must be an integer from 0 to {MAX_SEED}")

    if request.deadline_s is not None:
        if not isinstance(request.deadline_s, (int, float)) or not math.isfinite(request.deadline_s) \
                or request.deadline_s <= 0:
            raise ValueError(f"deadline_s={request.deadline_s!r} must be a positive number of seconds")
    slo_scale = config.slo_scale if request.slo_scale is None else request.slo_scale
    if not isinstance(slo_scale, (int, float)) or not math.isfinite(slo_scale) or slo_scale <= 0:
        raise ValueError(f"slo_scale={slo_scale!r} must be a positive number")

    if request.cache not in CACHE_MODES:
        raise ValueError(f"cache={request.cache!r} must be one of {', '.join(CACHE_MODES)}")
    if not isinstance(request.preview_every, int) or request.preview_every < 0:
        raise ValueError(f"preview_every={request.preview_every!r} must be an integer >= 0")
    if not isinstance(request.priority, int):
        raise ValueError(f"priority={request.priority!r} must be an integer")

    request_id = request.request_id
    if request_id is None:
        request_id = uuid.uuid4().hex
    elif not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id={request_id!r} must be a non-empty string")

    return replace(request, num_inference_steps=steps, guidance_scale=float(guidance), seed=seed,
                   slo_scale=float(slo_scale), request_id=request_id)
