"""The wire format of the images API: request validation, response and stream-event bodies, errors.

Pure functions over plain dicts: no aiohttp, no engine, so every rule here is unit-tested directly
(tests/test_server_protocol.py). Shapes follow OpenAI's images API as the official `openai` Python
client parses it (`openai.types.ImagesResponse`, `ImageGenPartialImageEvent`,
`ImageGenCompletedEvent`); what we add is under names OpenAI does not use (`metrics`, `tetri.*`
events, the request extensions listed in GENERATION_EXTENSIONS).
"""
from __future__ import annotations

import base64
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from tetri_engine.engine.lora import normalize_lora
from tetri_engine.errors import RejectionReason, RequestRejected
from tetri_engine.request import (MAX_GUIDANCE_SCALE, MAX_PROMPT_CHARS, PATCH_PX, CacheMode, GenerationOutput,
                                  GenerationRequest, LoraRef, SizeRule)

MAX_SEED = 2**63 - 1
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit
MAX_DEADLINE_MS = 86_400_000.0  # a day: beyond it a deadline means nothing to a serving engine
MAX_SLO_SCALE = 1000.0
MAX_SHOWN_CHARS = 60  # of a client's value quoted back in an error message (and so in the log)
# ASCII digits only ('²' and '٦' are digits to str.isdigit(), not to int()), five at most.
SIZE_PATTERN = re.compile(r" *([0-9]{1,5}) *[xX] *([0-9]{1,5}) *")

# OpenAI parameters we accept. Those in IGNORED_CHOICES and IGNORED_OTHER change nothing here (a DiT
# has no quality knob or moderation pass); they are accepted so that clients written for OpenAI work
# unchanged, and checked against OpenAI's spec (openai.types.ImageGenerateParams) so that a wrong
# value is a 400 as it would be there.
IGNORED_CHOICES = {"quality": ("low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"),
                   "style": ("vivid", "natural"), "moderation": ("low", "auto")}
IGNORED_OTHER = {"safety_identifier", "output_compression"}  # a string; an integer 0..100
OPENAI_PARAMS = {"prompt", "n", "size", "response_format", "model", "user", "output_format",
                 "stream", "partial_images", "background", *IGNORED_CHOICES, *IGNORED_OTHER}
GENERATION_EXTENSIONS = {"num_inference_steps", "guidance_scale", "negative_prompt", "seed",
                         "deadline_ms", "slo_scale", "preview_every", "progress_events", "cache", "lora"}


class APIError(Exception):
    """An error answered in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def shown(value: Any) -> str:
    """A client's value as quoted back to it: repr (ASCII-safe for any string), at most
    MAX_SHOWN_CHARS characters."""
    text = ascii(value)
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    suffix = f"...({len(text)} chars)"
    return text[:MAX_SHOWN_CHARS - len(suffix)] + suffix


# --- engine refusals ----------------------------------------------------------------------------

# How each RejectionReason is answered: (status, error type). The one table: a new reason gets a row
# here (tests/test_server_protocol.py checks every reason has one). The official `openai` client
# retries 408, 409, 429 and 5xx (its `_should_retry`) and nothing else, so a refusal that waiting
# cannot cure must be another 4xx.
REJECTIONS: dict[RejectionReason, tuple[int, str]] = {
    RejectionReason.QUEUE_FULL: (429, "rate_limit_error"),  # Retry-After: the engine's estimate
    RejectionReason.DEADLINE_IMPOSSIBLE: (400, "invalid_request_error"),  # never retried: it cannot succeed
    RejectionReason.DRAINING: (503, "server_error"),  # another replica may take it
    RejectionReason.BUSY: (429, "rate_limit_error"),  # not alongside the accepted: Retry-After, the policy's estimate
}


def rejection_error(exc: RequestRejected, deadline_param: str | None = None) -> APIError:
    """The answer to an admission refusal. deadline_param: the request's field that set its
    deadline ('deadline_ms' or 'slo_scale'), named in a deadline_impossible answer."""
    status, error_type = REJECTIONS.get(exc.reason, (503, "server_error"))
    headers = {}
    if exc.retry_after_s is not None and status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))  # whole seconds
    message = str(exc)
    param = None
    if exc.reason == RejectionReason.DEADLINE_IMPOSSIBLE:
        message += ". Send a later 'deadline_ms' or a larger 'slo_scale'."
        param = deadline_param
    return APIError(status, message, type=error_type, param=param, code=exc.reason.value, headers=headers)


# --- request ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What the server accepts: from ServerConfig, and the engine's size rule (`AsyncEngine.size_rule`:
    the configured sizes narrowed by the model's)."""

    model_name: str
    size_rule: SizeRule = SizeRule()
    max_steps: int = 100
    max_n: int = 4
    default_size: str = "512x512"
    lora_check: Callable[[str], Any] | None = None  # engine.lora_check: ValueError for an unknown LoRA adapter


@dataclass(frozen=True)
class ImageGenerationParams:
    """A validated `POST /v1/images/generations` body."""

    prompt: str
    n: int
    width: int
    height: int
    stream: bool = False
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    deadline_ms: float | None = None
    slo_scale: float | None = None
    partial_images: int | None = None  # OpenAI: previews wanted over the whole generation
    preview_every: int | None = None  # ours: a preview every K steps
    progress_events: bool = True  # stream tetri.queued / tetri.round / tetri.step events too
    cache: CacheMode = CacheMode.OFF  # step caching (GenerationRequest.cache)
    user: str | None = None
    lora: tuple[LoraRef, ...] = ()  # LoRA adapters (GenerationRequest.lora), checked and sorted by name
    event_prefix: str = "image_generation"  # OpenAI's stream event types: "image_edit" for /v1/images/edits

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def to_requests(self, default_steps: int, request_id: str | None = None) -> list[GenerationRequest]:
        """One engine request per image; image i gets seed + i when a seed was given."""
        base_id = request_id or new_request_id()
        steps = self.num_inference_steps or default_steps
        previews = self.preview_interval(steps)
        requests = []
        for i in range(self.n):
            requests.append(GenerationRequest(
                prompt=self.prompt,
                width=self.width,
                height=self.height,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                negative_prompt=self.negative_prompt,
                seed=None if self.seed is None else self.seed + i,
                deadline_s=None if self.deadline_ms is None else self.deadline_ms / 1000.0,
                slo_scale=self.slo_scale,
                request_id=base_id if self.n == 1 else f"{base_id}-{i}",
                preview_every=previews,
                cache=self.cache,
                lora=self.lora,
            ))
        return requests

    def preview_interval(self, num_steps: int) -> int:
        """Steps between previews: preview_every as given, else partial_images spread evenly."""
        if not self.stream:
            return 0  # previews only travel on a stream
        if self.preview_every:
            return self.preview_every
        if self.partial_images:
            # p previews over N steps: one every N // (p + 1) steps lands p of them before the end.
            return max(1, num_steps // (self.partial_images + 1))
        return 0


def new_request_id() -> str:
    return "img-" + uuid.uuid4().hex[:20]


def parse_json_body(raw: bytes) -> Any:
    """JSON text (UTF-8) -> value; NaN / Infinity (which Python's json accepts) are malformed here."""
    def reject_constant(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=reject_constant)
    except UnicodeDecodeError as exc:
        raise bad_request(f"The request body is not UTF-8 text (byte {exc.start}); JSON must be UTF-8.",
                          code="invalid_json") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise bad_request(f"The request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    except RecursionError:  # e.g. [[[[...]]]] nested deeper than the parser's stack
        raise bad_request("The request body is nested too deeply.", code="invalid_json") from None


def parse_size(text: Any, default_size: str, size_rule: SizeRule, param: str = "size") -> tuple[int, int]:
    """'WxH' (or 'auto' / None: the default size) -> (width, height), checked against `size_rule`."""
    if text is None or text == "auto":
        text = default_size
    if not isinstance(text, str):
        raise bad_request(f"'{param}' must be a string like '512x512'.", param)
    match = SIZE_PATTERN.fullmatch(text)
    if match is None:
        raise bad_request(f"'{param}' must look like '512x512' (WIDTHxHEIGHT) or 'auto', "
                          f"got {shown(text)}.", param)
    width, height = int(match.group(1)), int(match.group(2))
    try:
        size_rule.check(width, height)
    except ValueError as exc:
        raise bad_request(f"'{param}' {width}x{height}: {exc}.", param) from None
    return width, height


def parse_generation_request(body: Any, limits: Limits) -> ImageGenerationParams:
    """Validate a decoded JSON body; raise APIError(400) naming the first bad parameter."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    unknown = sorted(set(body) - OPENAI_PARAMS - GENERATION_EXTENSIONS)
    if unknown:
        raise bad_request(f"Unknown parameter: {shown(unknown[0])}. Supported extensions: "
                          f"{', '.join(sorted(GENERATION_EXTENSIONS))}.", shown(unknown[0]).strip("'"),
                          code="unknown_parameter")
    _check_unicode(body)

    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("Missing required parameter: 'prompt'.", "prompt",
                          code="missing_required_parameter")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request("'prompt' must be a non-empty string.", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad_request(f"'prompt' is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}.",
                          "prompt")

    _check_model_and_format(body, limits)
    _check_ignored(body)
    n = _int(body, "n", 1, 1, limits.max_n)
    width, height = parse_size(body.get("size"), limits.default_size, limits.size_rule)
    stream = _bool(body, "stream")
    progress_events = _bool(body, "progress_events", default=True)
    if stream and n != 1:
        raise bad_request("Streaming returns one image: send n=1 with stream=true (or several "
                          "requests).", "n")
    steps = _int(body, "num_inference_steps", None, 1, limits.max_steps)
    guidance = _float(body, "guidance_scale", 0.0, MAX_GUIDANCE_SCALE)
    negative = _string(body, "negative_prompt", MAX_PROMPT_CHARS)
    n_seed_max = MAX_SEED - (n - 1)  # image i gets seed + i
    seed = _int(body, "seed", None, 0, n_seed_max)
    deadline_ms = _float(body, "deadline_ms", 0.0, MAX_DEADLINE_MS, positive=True)
    slo_scale = _float(body, "slo_scale", 0.0, MAX_SLO_SCALE, positive=True)
    if deadline_ms is not None and slo_scale is not None:
        raise bad_request("Send either 'deadline_ms' or 'slo_scale', not both.", "slo_scale")
    partial_images = _int(body, "partial_images", None, 0, MAX_PARTIAL_IMAGES)
    preview_every = _int(body, "preview_every", None, 0, limits.max_steps)
    cache = CacheMode.OFF if body.get("cache") is None else body["cache"]
    if not isinstance(cache, str) or cache not in set(CacheMode):
        raise bad_request(f"'cache' must be 'off' (every step computed) or 'auto' (step caching with "
                          f"the model's cache plan), got {shown(cache)}.", "cache")
    user = _string(body, "user")
    try:
        lora = normalize_lora(body.get("lora"), limits.lora_check)
    except ValueError as exc:
        raise bad_request(f"'lora': {exc}", "lora") from None

    return ImageGenerationParams(
        prompt=prompt, n=n, width=width, height=height, stream=stream,
        num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative, seed=seed,
        deadline_ms=deadline_ms, slo_scale=slo_scale, partial_images=partial_images, preview_every=preview_every,
        progress_events=progress_events, cache=CacheMode(cache), user=user, lora=lora)



def _check_model_and_format(body: dict, limits: Limits) -> None:
    """The model asked for must be the one served, and the answer a PNG in base64 JSON."""
    model = body.get("model")
    if model is not None and model != limits.model_name:
        raise bad_request(f"The model {shown(model)} is not served here; this server serves "
                          f"'{limits.model_name}' (GET /v1/models).", "model",
                          code="model_not_found")

    response_format = body.get("response_format")
    if response_format == "url":
        raise bad_request("response_format 'url' is not supported: this server does not host "
                          "image files. Use 'b64_json' (the default).", "response_format",
                          code="unsupported_value")
    if response_format not in (None, "b64_json"):
        raise bad_request(f"'response_format' must be 'b64_json', got {shown(response_format)}.",
                          "response_format")
    output_format = body.get("output_format")
    if output_format not in (None, "png"):
        raise bad_request(f"'output_format' {shown(output_format)} is not supported; only 'png'.",
                          "output_format", code="unsupported_value")
    background = body.get("background")
    if background not in (None, "auto", "opaque"):
        raise bad_request(f"'background' {shown(background)} is not supported; images are opaque.",
                          "background", code="unsupported_value")


def _check_ignored(body: dict) -> None:
    """The OpenAI parameters that change nothing here still take only the values OpenAI takes."""
    for name, choices in IGNORED_CHOICES.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, str) or value not in choices):
            raise bad_request(f"'{name}' must be one of {', '.join(choices)} (it changes nothing here), "
                              f"got {shown(value)}.", name)
    _string(body, "safety_identifier")
    _int(body, "output_compression", None, 0, 100)


def _check_unicode(body: dict) -> None:
    """Every string must be text UTF-8 can carry: JSON's \\ud800 escapes can smuggle a lone
    surrogate in, which the tokenizer (or a log line) would choke on."""
    for name, value in body.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise bad_request(f"'{name}' is not valid Unicode text: it holds a lone surrogate "
                                  f"({ascii(value[exc.start])}) at character {exc.start}.", name) from None


def _string(body: dict, name: str, max_chars: int | None = None) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string.", name)
    if value is not None and max_chars is not None and len(value) > max_chars:
        raise bad_request(f"'{name}' is {len(value)} characters; at most {max_chars}.", name)
    return value


def _int(body: dict, name: str, default, low: int, high: int):
    value = body.get(name)
    if value is None:
        return default
    # JSON true/false are ints to Python; 4.0 is accepted as 4 (some clients send floats).
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer.", name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}, got {shown(value)}.", name)
    return value


def _float(body: dict, name: str, low: float, high: float, positive: bool = False):
    value = body.get(name)
    if value is None:
        return None
    try:  # an integer of 400 digits is valid JSON, and too large for a float
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite:
        raise bad_request(f"'{name}' must be a number, got {shown(value)}.", name)
    if (positive and value <= low) or value < low or value > high:
        bound = f"greater than {low:g}" if positive else f"at least {low:g}"
        bound += f" and at most {high:g}"
        raise bad_request(f"'{name}' must be {bound}, got {shown(value)}.", name)
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false.", name)
    return value


# --- response ---------------------------------------------------------------------------------


def b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def usage(params: ImageGenerationParams, num_images: int) -> dict[str, Any]:
    """OpenAI's `usage` block. There is no tokenizer in the server: text tokens are the prompt's
    whitespace-separated words; an image's tokens are its DiT sequence length, (W/16)*(H/16)."""
    text_tokens = len(params.prompt.split()) + len((params.negative_prompt or "").split())
    image_tokens = num_images * (params.width // PATCH_PX) * (params.height // PATCH_PX)
    return {
        "input_tokens": text_tokens,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
        "output_tokens": image_tokens,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": image_tokens},
        "total_tokens": text_tokens + image_tokens,
    }


def request_metrics(final: GenerationOutput) -> dict[str, Any]:
    """Our per-image metrics block: ids, seed, state, and the engine's RequestMetrics."""
    block = {"request_id": final.request_id, "seed": final.seed, "state": final.state.value}
    if final.metrics is not None:
        block.update(final.metrics.to_dict())
    return block


def images_response(params: ImageGenerationParams, finals: list[GenerationOutput],
                    created: int | None = None) -> dict[str, Any]:
    """The non-streaming answer; `metrics[i]` describes `data[i]`."""
    return {
        "created": int(time.time()) if created is None else created,
        "data": [{"b64_json": b64(f.png)} for f in finals],
        "background": "opaque",
        "output_format": "png",
        "size": params.size,
        "usage": usage(params, len(finals)),
        "metrics": [request_metrics(f) for f in finals],
    }


# --- server-sent events -------------------------------------------------------------------------


def sse(event_type: str, data: dict[str, Any]) -> bytes:
    """One SSE frame; `data` carries its own "type" too, as OpenAI's events do."""
    payload = json.dumps({"type": event_type, **data}, separators=(",", ":"))
    return f"event: {event_type}\ndata: {payload}\n\n".encode()


def _image_event_fields(params: ImageGenerationParams) -> dict[str, Any]:
    return {"background": "opaque", "output_format": "png", "quality": "auto",
            "size": params.size, "created_at": int(time.time())}


def queued_event(out: GenerationOutput) -> bytes:
    return sse("tetri.queued", {"request_id": out.request_id, "queue_position": out.queue_position,
                                "created_at": int(time.time())})


def round_event(out: GenerationOutput) -> bytes:
    return sse("tetri.round", {"request_id": out.request_id, "degree": out.degree,
                               "devices": list(out.devices), "layout": out.layout, "step": out.step,
                               "total_steps": out.total_steps})


def step_event(out: GenerationOutput) -> bytes:
    return sse("tetri.step", {"request_id": out.request_id, "step": out.step,
                              "total_steps": out.total_steps})


def late_event(out: GenerationOutput) -> bytes:
    """The scheduler gave the request up: it will miss its deadline and still runs, best effort."""
    return sse("tetri.late", {"request_id": out.request_id, "step": out.step, "total_steps": out.total_steps})


def partial_image_event(params: ImageGenerationParams, png: bytes, index: int,
                        out: GenerationOutput) -> bytes:
    return sse(f"{params.event_prefix}.partial_image",
               {"b64_json": b64(png), "partial_image_index": index, **_image_event_fields(params),
                "request_id": out.request_id, "step": out.step, "total_steps": out.total_steps})


def completed_event(params: ImageGenerationParams, final: GenerationOutput) -> bytes:
    return sse(f"{params.event_prefix}.completed",
               {"b64_json": b64(final.png), **_image_event_fields(params),
                "usage": usage(params, 1), "metrics": request_metrics(final)})


def error_event(error: APIError) -> bytes:
    """An error after the stream began (the status line is already sent). The `openai` client
    raises APIError on a data object with an "error" key."""
    return sse("error", error.body())


def final_error(final: GenerationOutput, draining: bool) -> APIError:
    """The APIError for a final output that is not `completed`."""
    state = final.state.value
    if state == "cancelled" and draining:
        return APIError(503, f"Request {final.request_id} was cancelled: the server is shutting down.",
                        type="server_error", code="server_shutting_down")
    reason = (final.error or state)[:500]
    return APIError(500, f"Request {final.request_id} {state}: {reason}", type="server_error",
                    code=f"request_{state}")
