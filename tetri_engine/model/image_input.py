"""Image edits in latent space (img2img, inpainting), for every family: the input image becomes the
request's first latent, its schedule is cut to the steps that `strength` leaves, and an inpainting
request keeps its unmasked tokens on the input's noised latents after every step.

As diffusers' FluxImg2ImgPipeline / FluxInpaintPipeline (and StableDiffusion3Img2ImgPipeline /
StableDiffusion3InpaintPipeline) do it, 0.42.1:
  1. the image, resized to the request's size (`image_processor.preprocess`: Lanczos, to [-1, 1]), is
     encoded by the VAE: latents = (mean - shift_factor) * scaling_factor, packed into tokens;
  2. the full schedule of N steps is made as for text-to-image, and its first t_start = N - edit_steps(N,
     strength) steps are dropped (`get_timesteps`); the first latent is the flow-matching forward process
     at the first kept sigma, sigma * noise + (1 - sigma) * image_latents (`scale_noise`), with the
     request's seeded noise;
  3. inpainting: the mask (True = edit; diffusers' white) is resized to the image, binarised, downsampled to
     the latent grid (nearest) and packed like the latents; after the Euler update of step i,
     latent = (1 - mask) * (sigma_i+1 * noise + (1 - sigma_i+1) * image_latents) + mask * latent, so
     after the last step (sigma 0) the unmasked tokens are the input's latents exactly.
One difference: the VAE's posterior mean is used, not a sample drawn with the request's generator
(diffusers' `retrieve_latents` default), so the input's latents do not depend on the seed and the seeded
noise is the same as text-to-image's.

The blend (`inpaint_blend`) is a few tensor operations on the rank's shard with the sigma read on the
device, so it runs inside a step's CUDA graph (executor/cuda_graphs.py) as in the eager step.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from tetri_engine.model.adapter import PreparedRequest, pack_latents, split_for_rank
from tetri_engine.request import DEFAULT_EDIT_STRENGTH, edit_steps


@dataclass
class EditLatents:
    """An edit's tensors, packed like the latent [1, L, C], on the CPU in the model dtype. `mask` is None for
    img2img (nothing is blended); else 1 where the model edits, 0 where the input is kept."""

    image_latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor | None
    strength: float
    _shards: dict[tuple, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def inpaints(self) -> bool:
        return self.mask is not None

    def shard(self, device: torch.device, rank: int, degree: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image latents, noise, mask) of rank `rank`'s shard of a group of `degree` on `device` (the
        `ops.shard` layout, padding zero), made once per (device, rank, degree)."""
        key = (str(device), rank, degree)
        with self._lock:  # the ranks of CPU virtual devices ask at once
            if key not in self._shards:
                length = self.image_latents.shape[1]
                self._shards[key] = tuple(split_for_rank(t, 1, length, rank, degree).to(device)
                                          for t in (self.image_latents, self.noise, self.mask))
                if len(self._shards) > 64:  # groups come and go: keep the latest only
                    self._shards = {key: self._shards[key]}
            return self._shards[key]


def inpaint_blend(latent: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                  sigma_next: torch.Tensor) -> torch.Tensor:
    """The latent after a step, its kept tokens on the input's latents noised to the next sigma.

    Copied from diffusers 0.42.1 `diffusers.pipelines.flux.pipeline_flux_inpaint.FluxInpaintPipeline.__call__`
    (source sha256 993cdbad60ba) (step 6, after `scheduler.step`; `scale_noise` at the scheduler's next sigma, in the latent's dtype; at
    the last step sigma is 0 and the formula gives the latents themselves, as the pipeline's `if` does)."""
    sigma = sigma_next.to(latent.dtype)
    proper = sigma * noise + (1.0 - sigma) * image_latents
    return (1 - mask) * proper + mask * latent


def after_step(prepared: Any, latent: torch.Tensor, rank: int, degree: int, sigma_next: torch.Tensor) -> torch.Tensor:
    """A request's latent shard after the Euler update: blended when it inpaints, else as it is."""
    edit = getattr(prepared, "edit", None)
    if edit is None or not edit.inpaints:
        return latent
    return inpaint_blend(latent, *edit.shard(latent.device, rank, degree), sigma_next)


@torch.no_grad()
def prepare_edit(runtime: Any, prepared: PreparedRequest, image: np.ndarray, mask: np.ndarray | None,
                 strength: float) -> PreparedRequest:
    """`prepared` (a text-to-image request of N steps) as an edit of `image` (uint8 [H, W, 3]) with `mask`
    (bool [H, W], True = edit; None: img2img) and `strength` (None: the default): the module docstring's
    steps 1-3. ValueError for inputs
    engine/edit_input.py would refuse.

    Copied from diffusers 0.42.1 `diffusers.pipelines.flux.pipeline_flux_img2img.FluxImg2ImgPipeline.prepare_latents`
    (source sha256 abeae7654977), the posterior's mean for its sample, and the schedule cut of
    `edit_steps`, which is diffusers 0.42.1
    `diffusers.pipelines.flux.pipeline_flux_img2img.FluxImg2ImgPipeline.get_timesteps` (source sha256 4c7604344469)."""
    image, mask = _checked(image, mask)
    strength = DEFAULT_EDIT_STRENGTH if strength is None else strength
    keep_steps = edit_steps(prepared.num_steps, float(strength))
    if not 0 < strength <= 1 or keep_steps < 1:
        raise ValueError(f"strength={strength!r} of {prepared.num_steps} steps leaves no step to run")
    width, height, dtype = prepared.width, prepared.height, prepared.noise.dtype
    # 1. the input's latents
    image_latents = encode_image(runtime, image, width, height).to(dtype)
    # 2. the schedule's last `keep_steps` steps, and the first latent at its first sigma
    t_start = prepared.num_steps - keep_steps
    timesteps, sigmas = prepared.timesteps[t_start:].clone(), prepared.sigmas[t_start:].clone()
    sigma = sigmas[0].to(dtype)
    first = sigma * prepared.noise + (1.0 - sigma) * image_latents
    # 3. the mask on the latent grid, packed
    packed_mask = None if mask is None else latent_mask(runtime, mask, width, height, image_latents.shape[-1], dtype)
    edit = EditLatents(image_latents, prepared.noise, packed_mask, float(strength))
    return replace(prepared, num_steps=keep_steps, noise=first, timesteps=timesteps, sigmas=sigmas, edit=edit,
                   _on_device={}, _lock=threading.Lock())


def encode_image(runtime: Any, image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> the VAE's latents of it at width x height, packed [1, L, C * 4], float32 on the CPU."""
    from PIL import Image

    pipeline = runtime.pipeline
    pixels = pipeline.image_processor.preprocess(Image.fromarray(image, mode="RGB"), height=height, width=width)
    device = runtime.encode_device
    vae = runtime.vae_on(device)
    posterior = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = (posterior.mode() - shift) * vae.config.scaling_factor
    return pack_latents(latents.float()).cpu()


def latent_mask(runtime: Any, mask: np.ndarray, width: int, height: int, features: int,
                dtype: torch.dtype) -> torch.Tensor:
    """bool [H, W] (True = edit) -> [1, L, features], 1 where the model edits: diffusers' mask_processor
    (resize, binarise at 0.5), then `prepare_mask_latents` (nearest to the latent grid, repeated over the
    channels, packed).

    Copied from diffusers 0.42.1 `diffusers.pipelines.flux.pipeline_flux_inpaint.FluxInpaintPipeline.prepare_mask_latents`
    (source sha256 daddf5c2fe70), the mask part only."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    processor = VaeImageProcessor(vae_scale_factor=runtime.patch_px, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    pixels = processor.preprocess(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"), height=height, width=width)
    grid = torch.nn.functional.interpolate(pixels.float(), size=(height // 8, width // 8))
    return pack_latents(grid.repeat(1, features // 4, 1, 1)).to(dtype)


def _checked(image: Any, mask: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("an edit's image must be a uint8 array [H, W, 3] (engine/edit_input.py makes one)")
    if mask is not None and (not isinstance(mask, np.ndarray) or mask.dtype != np.bool_
                             or mask.shape != image.shape[:2]):
        raise ValueError("an edit's mask must be a bool array [H, W] of the image's size")
    return image, mask
