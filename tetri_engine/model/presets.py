"""Model presets: the configs of the real architectures, written out in code, and the tiny test models.

- `tiny` (the embedded default) and `tiny-sd3`: complete diffusers pipelines (FluxPipeline,
  StableDiffusion3Pipeline) of tiny components with random weights from a fixed seed, tokenizers
  included (built in code, see text.py), so they run anywhere without a network and save/load as
  ordinary diffusers directories. Their images are noise.
- `flux-dev`, `flux-schnell`, `sd3-medium`: the real transformer and VAE configs with random weights,
  built directly on the first device in the model dtype, for true timings. No text-encoder weights
  exist here: prompts become random embeddings of the real shapes (FLUX: 512 (schnell 256) T5 tokens
  x 4096 and a pooled 768; SD3: 77 CLIP + 256 T5 tokens x 4096 and a pooled 2048), the same prompt
  always giving the same embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
FLUX_SCHNELL_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "guidance_embeds": False}
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
)

_VAE_16CH = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, force_upcast=True,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)
FLUX_VAE = {**_VAE_16CH, "scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3_VAE = {**_VAE_16CH, "scaling_factor": 1.5305, "shift_factor": 0.0609}

FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# Tiny: FLUX architecture, 2 double + 2 single blocks, 4 heads of 16; a 4-level 16-channel-latent VAE
# (8x, as the real one) with few channels, so that 512x512 decodes in a fraction of a second on a CPU.
TINY_VAE = {**FLUX_VAE, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "sample_size": 64}
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=2,
    attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
    guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
# Tiny SD3.5-style: one dual-attention layer and RMS q/k norms, to cover every SD3 attention path.
TINY_SD3_TRANSFORMER = dict(
    sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=4,
    joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64, out_channels=16,
    pos_embed_max_size=128, dual_attention_layers=(0,), qk_norm="rms_norm",
)


@dataclass(frozen=True)
class Preset:
    name: str
    pipeline_class: str  # "FluxPipeline" | "StableDiffusion3Pipeline"
    transformer: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    text_tokens: int  # text tokens per prompt (SD3: 77 CLIP + the T5 tokens)
    default_steps: int
    default_guidance: float
    tiny: bool  # tiny pipeline with text encoders, built on the CPU; else full size, random embeddings
    random_text: dict[str, tuple[int, ...]] | None = field(default=None)
    description: str = ""


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny", "FluxPipeline", TINY_FLUX_TRANSFORMER, TINY_VAE, FLUX_DEV_SCHEDULER, text_tokens=32,
        default_steps=8, default_guidance=3.5, tiny=True,
        description="tiny FLUX-architecture pipeline, random weights (images are noise)",
    ),
    "tiny-sd3": Preset(
        "tiny-sd3", "StableDiffusion3Pipeline", TINY_SD3_TRANSFORMER, {**TINY_VAE, **{
            "scaling_factor": SD3_VAE["scaling_factor"], "shift_factor": SD3_VAE["shift_factor"]}},
        SD3_SCHEDULER, text_tokens=77 + 32, default_steps=8, default_guidance=7.0, tiny=True,
        description="tiny SD3.5-architecture pipeline, random weights (images are noise)",
    ),
    "flux-dev": Preset(
        "flux-dev", "FluxPipeline", FLUX_DEV_TRANSFORMER, FLUX_VAE, FLUX_DEV_SCHEDULER, text_tokens=512,
        default_steps=50, default_guidance=3.5, tiny=False,
        random_text={"prompt_embeds": (512, 4096), "pooled_prompt_embeds": (768,)},
        description="FLUX.1-dev architecture (11.9 B), random weights and prompt embeddings",
    ),
    "flux-schnell": Preset(
        "flux-schnell", "FluxPipeline", FLUX_SCHNELL_TRANSFORMER, FLUX_VAE, FLUX_SCHNELL_SCHEDULER,
        text_tokens=256, default_steps=4, default_guidance=0.0, tiny=False,
        random_text={"prompt_embeds": (256, 4096), "pooled_prompt_embeds": (768,)},
        description="FLUX.1-schnell architecture, random weights and prompt embeddings",
    ),
    "sd3-medium": Preset(
        "sd3-medium", "StableDiffusion3Pipeline", SD3_MEDIUM_TRANSFORMER, SD3_VAE, SD3_SCHEDULER,
        text_tokens=77 + 256, default_steps=28, default_guidance=7.0, tiny=False,
        random_text={"prompt_embeds": (77 + 256, 4096), "pooled_prompt_embeds": (2048,)},
        description="Stable Diffusion 3 medium architecture (2 B), random weights and prompt embeddings",
    ),
}


class default_dtype:
    """Create tensors in `dtype` (torch's process-wide default) inside the block; restores it after."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __enter__(self):
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.previous)


def _pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def build_tiny_pipeline(preset: Preset, seed: int = 0):
    """The tiny pipeline on the CPU in float32, identical for a given seed (the global RNG is untouched)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from tetri_engine.model import text

    clip_tokenizer = text.build_clip_tokenizer()
    t5_tokens = preset.text_tokens - (77 if preset.pipeline_class == "StableDiffusion3Pipeline" else 0)
    t5_tokenizer = text.build_t5_tokenizer(model_max_length=t5_tokens)
    scheduler = FlowMatchEulerDiscreteScheduler(**preset.scheduler)
    with torch.random.fork_rng(devices=[]), default_dtype(torch.float32):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**preset.vae)
        if preset.pipeline_class == "FluxPipeline":
            transformer = FluxTransformer2DModel(**preset.transformer)
            clip = CLIPTextModel(text.tiny_clip_config(
                clip_tokenizer, hidden_size=preset.transformer["pooled_projection_dim"]))
            t5 = T5EncoderModel(text.tiny_t5_config(t5_tokenizer, d_model=preset.transformer["joint_attention_dim"]))
            components = dict(text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)
        else:
            transformer = SD3Transformer2DModel(**preset.transformer)
            # pooled = [clip_1 projection, clip_2 projection]; prompt = [clip_1 | clip_2 hidden] padded to T5's
            half = preset.transformer["pooled_projection_dim"] // 2
            clip_1 = CLIPTextModelWithProjection(text.tiny_clip_config(clip_tokenizer, half, half))
            clip_2 = CLIPTextModelWithProjection(text.tiny_clip_config(clip_tokenizer, half, half))
            t5 = T5EncoderModel(text.tiny_t5_config(t5_tokenizer, d_model=preset.transformer["joint_attention_dim"]))
            components = dict(text_encoder=clip_1, tokenizer=clip_tokenizer, text_encoder_2=clip_2,
                              tokenizer_2=text.build_clip_tokenizer(), text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    for module in (vae, transformer, *(c for c in components.values() if isinstance(c, torch.nn.Module))):
        module.eval().requires_grad_(False)
    return _pipeline_class(preset.pipeline_class)(scheduler=scheduler, vae=vae, transformer=transformer, **components)


def build_random_pipeline(preset: Preset, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A full-size preset: transformer and VAE built directly on `device` in `dtype`, default diffusers
    initialisation (uniform Linear/Conv init) from a fixed seed, no text encoders (random embeddings)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

    transformer_cls = FluxTransformer2DModel if preset.pipeline_class == "FluxPipeline" else SD3Transformer2DModel
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.device(device), default_dtype(dtype):
        torch.manual_seed(seed)
        transformer = transformer_cls(**preset.transformer)
        vae = AutoencoderKL(**preset.vae)
    # Buffers that diffusers creates in float32 explicitly (SD3's position grid) follow the model dtype,
    # as from_pretrained(torch_dtype=...) would leave them.
    for module in (transformer, vae):
        for sub in module.modules():
            for name, buf in sub._buffers.items():
                if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                    sub._buffers[name] = buf.to(dtype)
        module.eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(**preset.scheduler)
    none_text = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if preset.pipeline_class == "StableDiffusion3Pipeline":
        none_text.update(text_encoder_3=None, tokenizer_3=None)
    return _pipeline_class(preset.pipeline_class)(scheduler=scheduler, vae=vae, transformer=transformer, **none_text)
