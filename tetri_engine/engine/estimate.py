"""`AsyncEngine.estimate`: if this engine took a request now, would it meet its deadline, when would it
finish, and what would it cost the requests it holds? Answered for a router in front of several engines
(tetri_engine.cluster, sched/routing.py), cheaply: no executor call, nothing queued, nothing changed.

The answer is the admission's own decision (admission.py: validation, draining, the queue bound, the
deadline rule) and the scheduler's feasibility model (`Policy.estimate`: tetri's virtual schedule, the
same one its admission and triage use). Requests accepted but still being encoded are not in the
policy yet; they are passed to it as pending, so that a burst routed one request after another sees
the earlier ones.
"""
from __future__ import annotations

import math
from typing import Any

from tetri_engine.config import AdmissionMode
from tetri_engine.engine.admission import Admission, pending_requests, validate_request
from tetri_engine.request import CacheMode, GenerationRequest
from tetri_engine.sched.routing import Quote


def estimate_request(admission: Admission, policy: Any, live: dict[str, Any], draining: bool,
                     request: GenerationRequest, now_s: float) -> Quote:
    """The Quote for `request` on an engine whose admission, policy and live requests (request_id ->
    TrackedRequest) these are. ValueError for a request admission would call invalid."""
    req = validate_request(request, admission.config, admission.limits)
    try:
        admission.cost.check(req.width, req.height)
    except ValueError as exc:
        raise ValueError(f"{req.width}x{req.height} cannot be scheduled on this engine: {exc}") from None
    deadline_s = admission._deadline_s(req, policy)  # admission.py owns the deadline rule
    cached = req.cache == CacheMode.AUTO
    e = policy.estimate(req.width, req.height, req.denoise_steps, now_s + deadline_s, now_s, cached,
                        pending=pending_requests(live), cfg=admission.cfg_parallel(req))
    held = len(live)
    refusal = None
    if draining:
        refusal = ("draining", None)
    elif held >= admission.config.max_queue:
        refusal = ("queue_full", admission._retry_after_s(live, policy))
    if refusal is not None:
        return Quote(False, e.fits, e.finish_s - now_s, e.cost_s, e.delay_s, refusal[1], refusal[0],
                        deadline_s, held)
    accepts = e.fits or admission.config.admission != AdmissionMode.REJECT
    retry = e.retry_after_s if e.retry_after_s is None or math.isfinite(e.retry_after_s) else None
    return Quote(accepts, e.fits, e.finish_s - now_s, e.cost_s, e.delay_s, retry, e.reason, deadline_s, held)
