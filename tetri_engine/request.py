"""What a user sends (GenerationRequest) and what comes back (GenerationOutput, RequestMetrics), the
enums of a request's life, and the one rule for image sizes (SizeRule).

Plain Python: every layer imports this module (the scheduler too, with torch unimportable).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

# Image pixels per DiT token side in every family served (FLUX, SD3): the VAE's 8x, then 2x2 latent
# patches. The server needs it before a model is loaded; an adapter may narrow the rule further.
PATCH_PX = 16
# Below this an image is a handful of tokens: a degree-4 shard would be mostly padding.
MIN_SIZE_PX = 64
# OpenAI's limit for image prompts. The text encoders read far less (CLIP 77 tokens, T5 512), but
# tokenizing costs time linear in the text: an unbounded prompt held admission for seconds.
MAX_PROMPT_CHARS = 32_000
MAX_GUIDANCE_SCALE = 100.0  # classifier-free guidance far beyond any model's useful range (3..10)
# LoRA (issue 19): scales users send are about 0..1.5 (negative ones invert a style); beyond 10 the
# weights are noise. More adapters than this in one request is a mistake, not a style.
MAX_LORA_SCALE = 10.0
MAX_LORAS_PER_REQUEST = 8
# Image edits (img2img, inpainting): how far the input is noised when a request does not say (diffusers'
# FluxImg2ImgPipeline / FluxInpaintPipeline default).
DEFAULT_EDIT_STRENGTH = 0.6


class StrEnum(str, enum.Enum):
    """An enum whose members are their string values (`out.kind == "step"`, JSON, f-strings),
    on every Python this package supports (enum.StrEnum is 3.11+)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: Any, name: str):
        """`value` as a member, or ValueError naming `name` and the choices."""
        try:
            return cls(value)
        except ValueError:
            *others, last = [repr(m.value) for m in cls]
            choices = f"{', '.join(others)} or {last}" if others else last
            raise ValueError(f"{name} must be {choices}, got {value!r}") from None


class RequestState(StrEnum):
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


class OutputKind(StrEnum):
    """The kinds of `GenerationOutput`, in the order a request produces them."""

    QUEUED = "queued"  # always first; queue_position
    ROUND = "round"  # degree and devices of a group the request joins
    STEP = "step"  # step k of total_steps done
    PREVIEW = "preview"  # image is a low-cost preview (no VAE)
    LATE = "late"  # the scheduler gave it up: it will miss its deadline and still runs, best effort
    FINAL = "final"  # the last one: terminal state, image/png or error


class CacheMode(StrEnum):
    """Step caching of a request (model/step_cache.py)."""

    OFF = "off"  # every step runs every block
    AUTO = "auto"  # the model's cache plan decides which steps reuse the other blocks' residual


@dataclass(frozen=True)
class SizeRule:
    """Which image sizes can be made: width and height multiples of `multiple_px`, from `min_px` up to
    `max_width` x `max_height` pixels (None: no bound). The one place the rule is written: each layer
    holds the numbers it owns (EngineConfig the served range, the model its patch and largest grid)
    and `narrow()` combines them."""

    multiple_px: int = PATCH_PX
    min_px: int = PATCH_PX
    max_width: int | None = None
    max_height: int | None = None

    def narrow(self, other: SizeRule) -> SizeRule:
        """Sizes both rules allow (the multiples must divide one another, as 16 and 16 do)."""
        multiple = max(self.multiple_px, other.multiple_px)
        if multiple % min(self.multiple_px, other.multiple_px):
            raise ValueError(f"size multiples {self.multiple_px} and {other.multiple_px} do not nest")
        return SizeRule(multiple_px=multiple, min_px=max(self.min_px, other.min_px),
                        max_width=_smaller(self.max_width, other.max_width),
                        max_height=_smaller(self.max_height, other.max_height))

    def check(self, width: Any, height: Any) -> None:
        """ValueError naming the first side that breaks the rule and what to send instead."""
        for name, value, limit in (("width", width, self.max_width), ("height", height, self.max_height)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer number of pixels, got {value!r}")
            if value % self.multiple_px:
                lower = value - value % self.multiple_px
                raise ValueError(f"{name}={value} is not a multiple of {self.multiple_px}: width and height "
                                 f"must be multiples of {self.multiple_px} pixels (try "
                                 f"{max(lower, self.multiple_px)} or {lower + self.multiple_px})")
            if value < self.min_px:
                raise ValueError(f"{name}={value} is below the minimum of {self.min_px} px")
            if limit is not None and value > limit:
                raise ValueError(f"{name}={value} is beyond the maximum of {limit} px here")


def _smaller(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


@dataclass(frozen=True)
class LoraRef:
    """One LoRA adapter a request applies: an adapter of the engine's `lora_dir`, at `scale`
    (diffusers' `set_adapters(..., adapter_weights)`: the adapter's delta x scale)."""

    name: str
    scale: float = 1.0


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
    request_id: str | None = None
    cache: CacheMode | str = CacheMode.OFF  # step caching (admission makes it a CacheMode)
    preview_every: int = 0  # >0: a low-cost preview image every K steps (streaming)
    # LoRA adapters (LoraRef, or {"name", "scale"} dicts); admission makes it a tuple of LoraRef sorted
    # by name, without the scale-0 ones (which change nothing).
    lora: tuple[LoraRef, ...] | list | None = None
    # Image edits (engine/edit_input.py checks them): the input image (PIL image or uint8 array [H, W, 3|4]),
    # resized to width x height; mask (PIL image with alpha or uint8 [H, W, 4], alpha 0 = edit, as OpenAI
    # defines it; or a bool [H, W] array, True = edit): only the masked region changes; strength: how far the
    # input is noised, 0 < strength <= 1 (None: DEFAULT_EDIT_STRENGTH). Without an image: text-to-image.
    image: Any = None
    mask: Any = None
    strength: float | None = None

    @property
    def denoise_steps(self) -> int | None:
        """The steps that run: num_inference_steps, or for an edit its share after `strength` (`edit_steps`).
        What the scheduler plans and the metrics count."""
        steps = self.num_inference_steps
        if self.image is None or steps is None:
            return steps
        return edit_steps(steps, DEFAULT_EDIT_STRENGTH if self.strength is None else self.strength)


def edit_steps(num_steps: int, strength: float) -> int:
    """Steps an edit runs: the last ones of a `num_steps` schedule, from the one whose noise level `strength`
    reaches. diffusers' `get_timesteps` (FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline, the inpaint
    pipelines): t_start = int(N - N * strength), so 28 steps at 0.6 run 17, not int(0.6 * 28) = 16."""
    return num_steps - int(max(num_steps - min(num_steps * strength, num_steps), 0))


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
    late: bool = False  # the scheduler gave it up before it ended (a "late" output said so)
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
            "late": self.late,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


@dataclass
class GenerationOutput:
    """One item of `AsyncEngine.generate()` (kinds: `OutputKind`).

    "queued" (always first; queue_position), "round" (degree, devices and parallel `layout` of a group:
    {"cfg": guidance branches side by side, "sp": sequence-parallel devices per branch, "decode":
    devices of the decode after its steps, 0 when it does not finish there}), "step"
    (step k of total done), "preview" (image is a low-cost preview), "late" (at most once: the
    scheduler gave it up, it will miss its deadline and still runs best effort), "final" (last item:
    state is terminal; image/png set when completed, error set otherwise). `late` is True on every
    output after the "late" one.
    """

    request_id: str
    kind: OutputKind
    state: RequestState = RequestState.WAITING
    step: int = 0
    total_steps: int = 0
    degree: int = 0
    devices: tuple[str, ...] = ()
    queue_position: int | None = None
    late: bool = False
    image: Any = None  # PIL.Image.Image
    png: bytes | None = None
    seed: int | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None
    layout: dict[str, int] | None = None  # "round" outputs: the group's parallel layout

    @property
    def finished(self) -> bool:
        return self.kind == OutputKind.FINAL
