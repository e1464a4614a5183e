"""Admission: check a GenerationRequest, fill in its defaults, fix its deadline, and decide at once
whether the engine takes it.

Two kinds of refusal, kept apart on purpose:
- `ValueError`: the request itself is wrong (size not a multiple of 16, too many steps, ...). Sending
  it again will never help; the message says what to change.
- `RequestRejected` (a `RejectionReason`): the request is fine but the engine cannot take it now
  (queue full, draining) or cannot meet its deadline even with every device on it. `retry_after_s`
  is a hint for clients.

Nothing here touches the event loop or the executor, so it is cheap to call before anything is queued.
The deadline test asks the policy (`admission_check`): whether the request fits alone and alongside
the requests the policy protects, and if not when it would.
"""
from __future__ import annotations

import math
import random
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable

from tetri_engine.config import AdmissionMode, EngineConfig
from tetri_engine.engine.edit_input import check_edit
from tetri_engine.engine.lora import normalize_lora
from tetri_engine.errors import RejectionReason, RequestRejected
from tetri_engine.request import MAX_GUIDANCE_SCALE, MAX_PROMPT_CHARS, CacheMode, GenerationRequest, SizeRule

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ModelLimits:
    """What admission needs to know of the loaded model (from the executor's ModelInfo)."""

    size_rule: SizeRule  # the engine's sizes narrowed by the model's
    default_steps: int
    default_guidance: float
    # (guidance_scale, cached) -> whether such a request may run CFG-parallel (ModelInfo.cfg_parallel)
    cfg_parallel: Callable[[float, bool], bool] | None = None
    # name -> ValueError for a LoRA adapter this engine cannot apply (None: it serves no adapters)
    lora_check: Callable[[str], Any] | None = None


def validate_request(request: GenerationRequest, config: EngineConfig, limits: ModelLimits) -> GenerationRequest:
    """Return a copy of `request` with every default filled in, or raise ValueError saying what is wrong."""
    if not isinstance(request, GenerationRequest):
        raise TypeError(f"expected a GenerationRequest, got {type(request).__name__}")
    check_text("prompt", request.prompt)
    if request.negative_prompt is not None:
        check_text("negative_prompt", request.negative_prompt)
    limits.size_rule.check(request.width, request.height)

    steps = limits.default_steps if request.num_inference_steps is None else request.num_inference_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= config.max_steps:
        raise ValueError(f"num_inference_steps={steps!r} is out of range: it must be an integer "
                         f"from 1 to {config.max_steps}")

    guidance = limits.default_guidance if request.guidance_scale is None else request.guidance_scale
    if not _is_number(guidance) or not 0 <= guidance <= MAX_GUIDANCE_SCALE:
        raise ValueError(f"guidance_scale={guidance!r} must be a number from 0 to {MAX_GUIDANCE_SCALE:g}")

    seed = request.seed
    if seed is None:
        seed = random.SystemRandom().randrange(0, 2**32)
    elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r} must be an integer from 0 to {MAX_SEED}")

    if request.deadline_s is not None and not (_is_number(request.deadline_s) and request.deadline_s > 0):
        raise ValueError(f"deadline_s={request.deadline_s!r} must be a positive number of seconds")
    slo_scale = config.slo_scale if request.slo_scale is None else request.slo_scale
    if not _is_number(slo_scale) or slo_scale <= 0:
        raise ValueError(f"slo_scale={slo_scale!r} must be a positive number")

    cache = CacheMode.parse(request.cache, "cache")
    if not isinstance(request.preview_every, int) or isinstance(request.preview_every, bool) \
            or request.preview_every < 0:
        raise ValueError(f"preview_every={request.preview_every!r} must be an integer >= 0")

    request_id = request.request_id
    if request_id is None:
        request_id = uuid.uuid4().hex
    elif not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id={request_id!r} must be a non-empty string")

    lora = normalize_lora(request.lora, limits.lora_check)
    edit = {}
    if request.image is not None or request.mask is not None or request.strength is not None:
        checked = check_edit(request.image, request.mask, request.strength)  # engine/edit_input.py
        edit = {"image": checked.rgb, "mask": checked.edit, "strength": checked.strength}

    return replace(request, num_inference_steps=steps, guidance_scale=float(guidance), seed=seed,
                   slo_scale=float(slo_scale), request_id=request_id, cache=cache, lora=lora, **edit)


def check_text(name: str, text: object) -> None:
    """A prompt is a string of at most MAX_PROMPT_CHARS characters that UTF-8 can encode (a lone
    UTF-16 surrogate, which JSON's \\ud800 escapes can carry, would fail in the tokenizer)."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are accepted")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid Unicode text: it holds a lone surrogate "
                         f"({text[exc.start]!r}) at character {exc.start}") from None


def _is_number(value: object) -> bool:
    """A finite int or float; not a bool (True is an int to Python, never a number to a user)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pending_requests(live: dict[str, Any]) -> list[Any]:
    """The live requests accepted but not in the policy yet (their prompts are being encoded), as
    SchedRequests: admission and estimates count them, so that a burst sees its earlier requests."""
    from tetri_engine.sched import SchedRequest

    return [SchedRequest(t.request_id, t.request.width, t.request.height, t.total_steps, t.arrival_s,
                         t.deadline_at_s, cached=t.request.cache == CacheMode.AUTO, cfg=t.cfg)
            for t in live.values() if not t.in_policy and t.first_round_s is None and not t.state.is_terminal]


class Admission:
    """Whether a request is taken, and its deadline. `cost` is the sched.CostModel the engine plans with."""

    def __init__(self, config: EngineConfig, limits: ModelLimits, cost: Any):
        self.config = config
        self.limits = limits
        self.cost = cost

    def check(self, request: GenerationRequest, *, policy: Any, live: dict[str, Any], draining: bool,
              now_s: float | None = None, group_size: int = 1) -> tuple[GenerationRequest, float]:
        """-> (the validated request, its deadline in seconds from now), or raise ValueError /
        RequestRejected. `live`: request_id -> TrackedRequest of the requests waiting or running.
        `group_size`: the request is the first of that many sent together (an HTTP request's n
        images): the queue must hold all of them, or none is taken."""
        req = validate_request(request, self.config, self.limits)
        try:
            self.cost.check(req.width, req.height)
        except ValueError as exc:
            raise ValueError(f"{req.width}x{req.height} cannot be scheduled on this engine: {exc}") from None
        if req.request_id in live:
            raise ValueError(f"request_id {req.request_id!r} is already in use by a live request")
        if draining:
            raise RequestRejected("the engine is draining (shutting down) and takes no new requests",
                                  reason=RejectionReason.DRAINING)
        if len(live) + group_size > self.config.max_queue:
            also = f", and this request comes with {group_size - 1} more" if group_size > 1 else ""
            raise RequestRejected(
                f"queue full: {len(live)} requests are waiting or running (max_queue={self.config.max_queue}){also}",
                reason=RejectionReason.QUEUE_FULL, retry_after_s=self._retry_after_s(live, policy))
        deadline_s = self._deadline_s(req, policy)
        self._check_deadline(req, deadline_s, policy, time.monotonic() if now_s is None else now_s, live)
        return req, deadline_s

    def cfg_parallel(self, req: GenerationRequest) -> bool:
        """Whether the validated request may run its guidance branches side by side (SchedRequest.cfg)."""
        rule = self.limits.cfg_parallel
        return rule is not None and rule(req.guidance_scale, req.cache == CacheMode.AUTO)

    def _deadline_s(self, req: GenerationRequest, policy: Any) -> float:
        """The request's own deadline, else the SLO table's for its size x its scale."""
        from tetri_engine.sched import slo_s

        if req.deadline_s is not None:
            return float(req.deadline_s)
        return slo_s(req.width, req.height, req.denoise_steps, cost=self.cost, scale=req.slo_scale,
                     max_degree=policy.max_degree)

    def _check_deadline(self, req: GenerationRequest, deadline_s: float, policy: Any, now_s: float,
                        live: dict[str, Any]) -> None:
        """Ask the policy whether the deadline can be met (`policy.admission_check`): not even alone on
        the widest group ("deadline_impossible"), or not alongside the requests it protects now ("busy",
        with its estimate of when it would fit). Admission "reject" refuses both; "best_effort" takes
        them, and the policy gives up whom it must (the request's "late" output says so)."""
        cached, cfg = req.cache == CacheMode.AUTO, self.cfg_parallel(req)
        answer = policy.admission_check(req.width, req.height, req.denoise_steps, now_s + deadline_s,
                                        now_s, cached=cached, cfg=cfg, pending=pending_requests(live))
        if answer.fits or self.config.admission != AdmissionMode.REJECT:
            return
        size = f"{req.width}x{req.height} in {req.denoise_steps} steps"
        if answer.reason == "busy":
            raise RequestRejected(
                f"deadline {deadline_s:.3g} s cannot be met alongside the requests already accepted: {size}"
                + (f" would fit in about {answer.retry_after_s:.3g} s" if answer.retry_after_s is not None else ""),
                reason=RejectionReason.BUSY,
                retry_after_s=answer.retry_after_s)
        fastest_s = policy.min_finish_s(req.width, req.height, req.denoise_steps, now_s, cached=cached,
                                        cfg=cfg) - now_s
        raise RequestRejected(
            f"deadline {deadline_s:.3g} s cannot be met: {size} takes at least {fastest_s:.3g} s here, "
            f"even alone on {policy.max_degree} device(s)", reason=RejectionReason.DEADLINE_IMPOSSIBLE)

    def _retry_after_s(self, live: dict[str, Any], policy: Any) -> float:
        """Hint for a client refused with queue_full: when the soonest live request should end."""
        soonest_s = math.inf
        for tracked in live.values():
            remaining = tracked.total_steps - tracked.last_step_reported
            soonest_s = min(soonest_s, self.cost.isolated_s(tracked.request.width, tracked.request.height,
                                                            remaining, policy.max_degree))
        return round(max(0.1, soonest_s if math.isfinite(soonest_s) else 1.0), 3)
