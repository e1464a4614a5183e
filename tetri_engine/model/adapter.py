"""What every model adapter shares: the sequence-parallel plan and its application, latent packing,
the Euler step, previews, and the per-request inputs a denoising step needs.

An adapter (flux.py, sd3.py) is everything tetri-engine knows of one diffusers pipeline family. It
turns the family into the operations the executor calls without knowing the model:

    prepare(...)        -> PreparedRequest   prompt embeddings, seeded noise, sigma schedule
    rank_inputs(...)    -> dict              the static inputs of one batched forward on one rank
    velocity(...)       -> list[Tensor]      one step's model output for each request, on the rank's shard
    decode(...)         -> PIL.Image         the whole latent to an image (`vae_latents`, the VAE, `to_image`)
    preview(...)        -> PIL.Image         the latent through a fixed linear latent->RGB map (no VAE)

and declares its facts: `patch_px` and `max_side_px()` (its SizeRule), `latent_rgb` (preview colours),
`local_text_tokens` / `local_defaults` (a local diffusers directory's settings), and the parallel
methods it offers (`parallel_methods`, next to `sp_plan`).

Parallel methods (issue 16), declared, not coded per model:
  - "ulysses": sequence parallelism, each input split as `sp_plan` says;
  - "cfg": a request's two classifier-free-guidance branches side by side on two halves of a group:
    the inputs named in `cfg_plan` hold a row per branch ([uncond, cond] per request) and a rank takes
    its branch's rows (`rank_inputs(..., branch=c)`); the forward runs that branch only, and the twins
    swap their outputs before the guidance (`gather_branches`). Offered for requests with guidance
    above `cfg_guidance_above` (None: the family has no true CFG);
  - "patch_vae": the VAE decode split into row bands over a group (model/patch_vae.py).

How a model's inputs are split over a group is declared, not coded, in `sp_plan` (the spirit of
diffusers' `_cp_plan`): each input is split along one token stream ("image" or "text"), or
replicated. `rank_inputs` applies the plan to whatever the adapter's `batch_inputs` and
`shape_inputs` give; an input the plan does not declare is an error. The output is never gathered:
the velocity stays on the rank's image shard, where the Euler step runs.

Hand copies of diffusers code say so: "Copied from diffusers <version> `<dotted path>` (source sha256
<digest>)". tests/test_model_copies.py recomputes each digest from the installed diffusers and fails
when the source changed, so a diffusers upgrade is re-read, not trusted.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from tetri_engine.model.ulysses import AttentionCall, AttentionOptions, SPContext, catch_up, shard_length
from tetri_engine.request import PATCH_PX, SizeRule


@dataclass(frozen=True)
class SeqSplit:
    """Split along token stream `stream` at tensor dimension `dim` (contiguous shards, last padded)."""

    dim: int
    stream: str


@dataclass(frozen=True)
class Replicate:
    """Every rank gets the whole tensor."""


SPPlan = dict[str, "SeqSplit | Replicate"]


def split_for_rank(x: torch.Tensor, dim: int, length: int, rank: int, degree: int) -> torch.Tensor:
    """Rank `rank`'s shard of `x` along `dim` (length `length`): the `ops.shard` layout, zero padded."""
    if degree == 1:
        return x
    local = shard_length(length, degree)
    start = min(rank * local, length)
    part = x.narrow(dim, start, min(local, length - start))
    if part.shape[dim] == local:
        return part
    pad_shape = list(x.shape)
    pad_shape[dim] = local - part.shape[dim]
    return torch.cat([part, x.new_zeros(pad_shape)], dim=dim)


def apply_sp_plan(
    plan: SPPlan, inputs: dict[str, torch.Tensor], lengths: dict[str, int], rank: int, degree: int
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s part of each input, as `plan` declares (KeyError for an undeclared input)."""
    out = {}
    for name, tensor in inputs.items():
        if name not in plan:
            raise KeyError(f"input {name!r} is not declared in the adapter's sp_plan ({sorted(plan)})")
        rule = plan[name]
        if isinstance(rule, SeqSplit):
            out[name] = split_for_rank(tensor, rule.dim, lengths[rule.stream], rank, degree)
        else:
            out[name] = tensor
    return out


# --- latent packing: 2x2 latent patches -> tokens, features ordered (channel, row, column) ----------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2) * (w/2), C * 4].

    Copied from diffusers 0.42.1 `diffusers.pipelines.flux.pipeline_flux.FluxPipeline._pack_latents`
    (source sha256 dc85e7c16790), the shape read from the tensor."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """Inverse of `pack_latents`: [B, (h/2) * (w/2), C * 4] -> [B, C, h, w].

    Copied from diffusers 0.42.1 `diffusers.pipelines.flux.pipeline_flux.FluxPipeline._unpack_latents`
    (source sha256 63df52eecd89), given the latent's size instead of the image's."""
    b, _, features = tokens.shape
    tokens = tokens.view(b, latent_h // 2, latent_w // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, features // 4, latent_h, latent_w)


# --- the flow-matching Euler step -------------------------------------------------------------------------


def flow_match_euler_step(
    sample: torch.Tensor, model_output: torch.Tensor, sigmas: torch.Tensor, step_index: int
) -> torch.Tensor:
    """`FlowMatchEulerDiscreteScheduler.step` (deterministic sampling) as a pure function of the schedule.
    Copied from diffusers 0.42.1
    `diffusers.schedulers.scheduling_flow_match_euler_discrete.FlowMatchEulerDiscreteScheduler.step`
    (source sha256 3b73039e7d9e), the deterministic branch only.

    The diffusers scheduler keeps a step index inside; computing the update from the request's own
    sigmas lets any rank step its own shard, at any step, with no scheduler object. The arithmetic is
    diffusers' exactly: upcast the sample, `sample + dt * model_output` with a 0-dim dt, cast back.
    """
    dt = sigmas[step_index + 1] - sigmas[step_index]
    prev_sample = sample.to(torch.float32) + dt * model_output
    return prev_sample.to(model_output.dtype)


# --- per-request inputs -----------------------------------------------------------------------------------


@dataclass
class PreparedRequest:
    """Everything a request's denoising steps need, made once by `ModelAdapter.prepare`.

    cond holds the model's conditioning tensors (prompt embeddings ...), `rows` rows each (2 with true
    classifier-free guidance: [uncond, cond]), on the encode device. `on(device)` returns them (and the
    schedule) copied to a device once, for every step that runs there.
    """

    width: int
    height: int
    seed: int
    num_steps: int
    guidance_scale: float
    image_tokens: int
    text_tokens: int
    rows: int
    noise: torch.Tensor  # [1, image_tokens, C] packed, CPU, model dtype
    timesteps: torch.Tensor  # [num_steps], CPU
    sigmas: torch.Tensor  # [num_steps + 1], CPU, float32
    cond: dict[str, torch.Tensor]
    edit: Any = None  # an image edit's tensors (model/image_input.EditLatents), else None
    _on_device: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def latent_h(self) -> int:
        return self.height // 8

    @property
    def latent_w(self) -> int:
        return self.width // 8

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        key = str(device)
        with self._lock:  # several ranks of one device (CPU virtual devices) may ask at once
            if key not in self._on_device:
                tensors = {name: t.to(device) for name, t in self.cond.items()}
                # The schedule lives on the device, as in diffusers (set_timesteps(device=...)), so that
                # indexing it each step does not synchronise the host with the device.
                tensors["timesteps"] = self.timesteps.to(device)
                tensors["sigmas"] = self.sigmas.to(device)
                self._on_device[key] = tensors
            return self._on_device[key]

    def drop_device_copies(self) -> None:
        with self._lock:
            self._on_device.clear()


def select_branch(tensor: torch.Tensor, branch: int, requests: int) -> torch.Tensor:
    """The rows of guidance branch `branch` of a batch input with two rows per request (dim 0)."""
    return tensor.view(requests, tensor.shape[0] // requests, *tensor.shape[1:])[:, branch]


def gather_branches(noise_pred: torch.Tensor, context: SPContext) -> torch.Tensor:
    """A CFG-parallel rank's output rows [n, L, C] (its branch, one row per request) -> every branch's
    rows, per request in branch order [n * cfg, L, C]: what one rank computing every row would hold.
    One exchange with the twins (`SPContext.cfg_gather`)."""
    gathered = context.cfg_gather(noise_pred.contiguous())  # branch-major: [cfg * n, L, C]
    n, rest = noise_pred.shape[0], noise_pred.shape[1:]
    return gathered.view(context.cfg_degree, n, *rest).transpose(0, 1).reshape(context.cfg_degree * n, *rest)


class ModelAdapter:
    """One pipeline family. Subclasses set the class attributes and implement the methods below."""

    family: ClassVar[str]
    pipeline_class_name: ClassVar[str]
    sp_plan: ClassVar[SPPlan]
    # What the family offers (module docstring): "ulysses", "cfg", "patch_vae".
    parallel_methods: ClassVar[frozenset[str]] = frozenset({"ulysses", "patch_vae"})
    cfg_plan: ClassVar[frozenset[str]] = frozenset()  # inputs with a row per guidance branch (dim 0)
    cfg_guidance_above: ClassVar[float | None] = None  # true CFG when guidance_scale > this (None: never)
    patch_px: ClassVar[int] = PATCH_PX  # image pixels per token side: the VAE's 8x, then 2x2 latent patches
    # Preview colours: rows are latent channels, columns R, G, B (None: three bands of channels, one per
    # colour), and the RGB bias.
    latent_rgb: ClassVar[tuple[tuple[float, float, float], ...] | None] = None
    latent_rgb_bias: ClassVar[tuple[float, float, float]] = (0.0, 0.0, 0.0)

    def __init__(self, pipeline: Any, *, text_tokens: int, random_text: dict[str, tuple[int, ...]] | None,
                 attention: AttentionOptions = AttentionOptions()):
        self.pipeline = pipeline
        self.attention = attention  # how `install_attention`'s processors attend (kernel, head chunks)
        self.text_tokens = text_tokens
        # Presets without text-encoder weights give shapes of random prompt embeddings instead.
        self.random_text = random_text
        self._static_cache: dict[tuple, torch.Tensor] = {}
        self._static_lock = threading.Lock()

    # -- a local diffusers directory's settings (presets carry their own)
    @classmethod
    def local_text_tokens(cls, pipeline: Any) -> int:
        """Text tokens of the prompt embeddings."""
        raise NotImplementedError

    @classmethod
    def local_defaults(cls, pipeline: Any) -> tuple[int, float]:
        """(default steps, default guidance scale)."""
        raise NotImplementedError

    # -- what the runtime exposes
    @property
    def num_heads(self) -> int:
        return int(self.pipeline.transformer.config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(self.pipeline.transformer.config.attention_head_dim)

    def max_side_px(self) -> int | None:
        """The largest width or height the model can make (None: no limit of its own)."""
        return None

    @property
    def size_rule(self) -> SizeRule:
        side = self.max_side_px()
        return SizeRule(multiple_px=self.patch_px, min_px=self.patch_px, max_width=side, max_height=side)

    def install_attention(self, transformer: torch.nn.Module) -> None:
        """Give `transformer` the sequence-parallel attention processors (running with `self.attention`)."""
        raise NotImplementedError

    def exchange_plan(self) -> list[AttentionCall]:
        """Each attention call of one forward, in call order (for `catch_up`)."""
        return [call for block in self.exchange_plan_per_block() for call in block]

    def exchange_plan_per_block(self) -> list[list[AttentionCall]]:
        """`exchange_plan` grouped by transformer block, in block order (the step cache runs the first
        block apart from the others)."""
        raise NotImplementedError

    def latent_channels(self) -> int:
        """Features per packed token."""
        raise NotImplementedError

    def prepare(self, *, prompt: str, negative_prompt: str | None, width: int, height: int, seed: int,
                num_steps: int, guidance_scale: float, device: torch.device,
                dtype: torch.dtype) -> PreparedRequest:
        raise NotImplementedError

    def batch_inputs(self, prepared: list[PreparedRequest], device: torch.device) -> dict[str, torch.Tensor]:
        """The whole (unsplit) conditioning of one batched forward on `device`: prompt embeddings ..."""
        raise NotImplementedError

    def shape_inputs(self, first: PreparedRequest, device: torch.device,
                     dtype: torch.dtype) -> dict[str, Callable[[], torch.Tensor]]:
        """Makers of the whole inputs that depend only on the shape (position ids, position embeddings)."""
        return {}

    def true_cfg(self, guidance_scale: float) -> bool:
        """Whether a request with this guidance runs true classifier-free guidance (two branches)."""
        return self.cfg_guidance_above is not None and guidance_scale > self.cfg_guidance_above

    def cfg_parallel(self, prepared: PreparedRequest) -> bool:
        """Whether this request can run CFG-parallel (its two branches on two halves of a group)."""
        return "cfg" in self.parallel_methods and prepared.rows == 2

    def rank_inputs(self, prepared: list[PreparedRequest], device: torch.device, rank: int,
                    degree: int, branch: int | None = None) -> dict[str, torch.Tensor]:
        """The static inputs of one batched forward on rank `rank` of a group of `degree`: `batch_inputs`
        and `shape_inputs` (the latter made once per shape, device, rank and degree), each split as
        `sp_plan` declares; branch: in a CFG-parallel group, only that guidance branch's rows of the
        `cfg_plan` inputs. The latent itself (`hidden_states`) comes sharded from the executor."""
        first = prepared[0]
        lengths = {"image": first.image_tokens, "text": first.text_tokens}
        whole = self.batch_inputs(prepared, device)
        if branch is not None:
            whole = {name: select_branch(t, branch, len(prepared)) if name in self.cfg_plan else t
                     for name, t in whole.items()}
        inputs = apply_sp_plan(self.sp_plan, whole, lengths, rank, degree)
        dtype = first.noise.dtype
        for name, make in self.shape_inputs(first, device, dtype).items():
            key = (name, first.width, first.height, first.text_tokens, dtype, str(device), rank, degree)
            inputs[name] = self.cached(
                key, lambda name=name, make=make: apply_sp_plan(self.sp_plan, {name: make()}, lengths, rank,
                                                                degree)[name])
        return inputs

    def velocity(self, transformer: torch.nn.Module, latents: list[torch.Tensor], prepared: list[PreparedRequest],
                 step_indices: list[int], inputs: dict[str, torch.Tensor], cache_step: Any = None) -> list[torch.Tensor]:
        """cache_step: a `step_cache.CacheStep` when some request of the batch caches (the forward then
        runs its blocks through it); None runs the plain diffusers forward."""
        raise NotImplementedError

    def catch_up(self, context: SPContext, prepared: list, dtype: torch.dtype, device: torch.device) -> None:
        """After this rank's forward raised: the exchanges of the forward it did not reach (`ulysses.catch_up`),
        the guidance exchange of a CFG-parallel group last."""
        rows = len(prepared) if context.branch is not None else sum(p.rows for p in prepared)
        guided = (len(prepared), context.local_length("image"), self.latent_channels())
        catch_up(context, self.exchange_plan(), rows, self.num_heads, self.head_dim, dtype, device, guided)

    def vae_latents(self, vae: torch.nn.Module, latent: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """The packed latent [1, L, C*4] as the VAE's input [1, C, height/8, width/8] (unscaled, shifted,
        in the VAE's dtype). The pipelines' step 7 (FluxPipeline and StableDiffusion3Pipeline alike)."""
        latents = unpack_latents(latent, height // 8, width // 8)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        return latents.to(vae.dtype)

    def to_image(self, image: torch.Tensor):
        """The VAE's output [1, 3, H, W] -> a PIL image (the pipelines' postprocess)."""
        return self.pipeline.image_processor.postprocess(image, output_type="pil")[0]

    def model_output(self, transformer: torch.nn.Module, latents: list[torch.Tensor], prepared: list[PreparedRequest],
                     step_indices: list[int], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's output rows of a batch before any guidance (every branch of each request, in
        order), on this rank's shard: what degrees and layouts must agree on (model/verify.py)."""
        return torch.cat(self.velocity(transformer, latents, prepared, step_indices, inputs))

    def decode(self, vae: torch.nn.Module, latent: torch.Tensor, width: int, height: int):
        """The whole packed latent -> PIL image, on the latent's device."""
        return self.to_image(vae.decode(self.vae_latents(vae, latent, width, height), return_dict=False)[0])

    def preview(self, latent: torch.Tensor, width: int, height: int):
        """Packed latent tokens [1, L, C*4] of a width x height image -> a PIL image of (width/8, height/8).

        No VAE: the latent x_t, unpacked to [C, H/8, W/8], through the fixed linear map `latent_rgb`
        (one [L, C] x [C, 3] product: well under a millisecond next to a step). Early previews are
        mostly noise; that is what x_t is."""
        from PIL import Image

        latents = unpack_latents(latent.detach().float().cpu(), 2 * (height // 16), 2 * (width // 16))[0]
        channels = latents.shape[0]
        if self.latent_rgb is not None and len(self.latent_rgb) == channels:
            factors = torch.tensor(self.latent_rgb)
            bias = torch.tensor(self.latent_rgb_bias)
        else:  # no map for this latent space: the mean of three bands of channels, one per colour
            factors = torch.zeros(channels, 3)
            for colour, band in enumerate(torch.arange(channels).chunk(3)):
                factors[band, colour] = 1.0 / max(1, len(band))
            bias = torch.zeros(3)
        rgb = torch.einsum("chw,cr->hwr", latents, factors) + bias  # about [-1, 1]
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        return Image.fromarray(pixels, mode="RGB")

    # -- shared helpers
    def cached(self, key: tuple, make) -> torch.Tensor:
        """Tensors that depend only on shapes (position ids, position embeddings), made once per key."""
        with self._static_lock:
            if key not in self._static_cache:
                if len(self._static_cache) > 256:  # shapes x degrees x ranks x devices: bounded in practice
                    self._static_cache.clear()
                self._static_cache[key] = make()
            return self._static_cache[key]

    def random_prompt_tensor(self, name: str, text: str, dtype: torch.dtype) -> torch.Tensor:
        """A random stand-in for a text encoder output: the same text gives the same tensor."""
        import zlib

        shape = self.random_text[name]
        generator = torch.Generator("cpu").manual_seed(zlib.crc32(f"{name}:{text}".encode()))
        return torch.randn((1, *shape), generator=generator, dtype=torch.float32).to(dtype)

    def new_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
