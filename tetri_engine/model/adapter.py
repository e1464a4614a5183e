"""What every model adapter shares: the sequence-parallel plan, latent packing, the Euler step, and
the per-request inputs a denoising step needs.

An adapter (flux.py, sd3.py) turns one diffusers pipeline family into four operations the executor
calls without knowing the model:

    prepare(...)        -> PreparedRequest   prompt embeddings, seeded noise, sigma schedule
    rank_inputs(...)    -> dict              the static inputs of one batched forward on one rank
    velocity(...)       -> list[Tensor]      one step's model output for each request, on the rank's shard
    decode(...)         -> PIL.Image         the whole latent to an image

How a model's inputs are split over a group is declared, not coded, in `sp_plan` (the spirit of
diffusers' `_cp_plan`): each input is split along one token stream ("image" or "text"), or replicated.
The output is never gathered: the velocity stays on the rank's image shard, where the Euler step runs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tetri_engine.model.ulysses import shard_length


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
    out = {}
    for name, tensor in inputs.items():
        rule = plan[name]
        if isinstance(rule, SeqSplit):
            out[name] = split_for_rank(tensor, rule.dim, lengths[rule.stream], rank, degree)
        else:
            out[name] = tensor
    return out


# --- latent packing: 2x2 latent patches -> tokens, features ordered (channel, row, column) ----------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2) * (w/2), C * 4]; the same layout as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """Inverse of `pack_latents`: [B, (h/2) * (w/2), C * 4] -> [B, C, h, w]."""
    b, _, features = tokens.shape
    tokens = tokens.view(b, latent_h // 2, latent_w // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, features // 4, latent_h, latent_w)


# --- the flow-matching Euler step -------------------------------------------------------------------------


def flow_match_euler_step(
    sample: torch.Tensor, model_output: torch.Tensor, sigmas: torch.Tensor, step_index: int
) -> torch.Tensor:
    """`FlowMatchEulerDiscreteScheduler.step` (deterministic sampling) as a pure function of the schedule.

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


class ModelAdapter:
    """One pipeline family. Subclasses set the class attributes and implement the methods below."""

    family: ClassVar[str]
    pipeline_class_name: ClassVar[str]
    sp_plan: ClassVar[SPPlan]

    def __init__(self, pipeline: Any, *, text_tokens: int, random_text: dict[str, tuple[int, ...]] | None):
        self.pipeline = pipeline
        self.text_tokens = text_tokens
        # Presets without text-encoder weights give shapes of random prompt embeddings instead.
        self.random_text = random_text
        self._static_cache: dict[tuple, torch.Tensor] = {}
        self._static_lock = threading.Lock()

    # -- what the runtime exposes
    @property
    def num_heads(self) -> int:
        return int(self.pipeline.transformer.config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(self.pipeline.transformer.config.attention_head_dim)

    def install_attention(self, transformer: torch.nn.Module) -> None:
        raise NotImplementedError

    def exchange_plan(self) -> list[tuple[str, ...]]:
        """The token streams of each attention call of one forward, in call order (for `catch_up`)."""
        return [streams for block in self.exchange_plan_per_block() for streams in block]

    def exchange_plan_per_block(self) -> list[list[tuple[str, ...]]]:
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

    def rank_inputs(self, prepared: list[PreparedRequest], device: torch.device, rank: int,
                    degree: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def velocity(self, transformer: torch.nn.Module, latents: list[torch.Tensor], prepared: list[PreparedRequest],
                 step_indices: list[int], inputs: dict[str, torch.Tensor], cache_step: Any = None) -> list[torch.Tensor]:
        """cache_step: a `step_cache.CacheStep` when some request of the batch caches (the forward then
        runs its blocks through it); None runs the plain diffusers forward."""
        raise NotImplementedError

    def decode(self, vae: torch.nn.Module, latent: torch.Tensor, width: int, height: int):
        raise NotImplementedError

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
