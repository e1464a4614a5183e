"""FLUX.1 (dev, schnell) on a sequence-parallel group: FluxPipeline's stages, split per `sp_plan`, and
what tetri-engine knows of the family (defaults, preview colours).

The diffusers `FluxTransformer2DModel.forward` runs unchanged on a rank's shard: its inputs are the
rank's image tokens with their own position ids and the rank's slice of the text tokens (position ids
all zero in FLUX); only the attention processor differs (`UlyssesFluxAttnProcessor`, which is
diffusers' `FluxAttnProcessor` with the attention call swapped for `sp_attention`).
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers.models.transformers.transformer_flux import _get_qkv_projections
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from tetri_engine.model.adapter import ModelAdapter, PreparedRequest, Replicate, SeqSplit, pack_latents
from tetri_engine.model.ulysses import AttentionCall, AttentionOptions, sp_attention


# Preview colours of the FLUX latent space: ComfyUI's latent_formats.Flux factors (what its live previews
# use); rows are the 16 latent channels, columns R, G, B.
FLUX_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


class UlyssesFluxAttnProcessor:
    """diffusers' FluxAttnProcessor, attending over the group's whole joint sequence.

    Copied from diffusers 0.42.1 `diffusers.models.transformers.transformer_flux.FluxAttnProcessor.__call__`
    (source sha256 7eb778467bc9), the attention call swapped for `sp_attention`.

    Both block types see the rank's tokens as [text shard, image shard]: the double-stream blocks
    concatenate them here, the single-stream blocks before calling attention.
    """

    STREAMS = ("text", "image")

    def __init__(self, options: AttentionOptions = AttentionOptions()):
        self.options = options  # the kernel and head chunks of `sp_attention`

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported by the sequence-parallel runtime")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:  # the rank's own positions, before the exchange
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = sp_attention(query, key, value, self.STREAMS, self.options)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [text_len, hidden_states.shape[1] - text_len], dim=1
            )
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def flux_forward(transformer, hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states,
                 txt_ids, img_ids, cache_step):
    """FluxTransformer2DModel.forward with its blocks run by the step cache
    (`step_cache.CacheStep.run_blocks`), which may replace all blocks but the first by a cached residual.

    Copied from diffusers 0.42.1 `diffusers.models.transformers.transformer_flux.FluxTransformer2DModel.forward`
    (source sha256 af449652fbc2).

    The same operations in the same order as diffusers', so with nothing skipped the output is
    bit-identical to `transformer(...)` (tests/test_cache_runtime.py checks). The runtime passes no
    LoRA scale, ControlNet or IP-adapter inputs, so their branches are left out.
    """
    hidden_states = transformer.x_embedder(hidden_states)
    timestep = timestep.to(hidden_states.dtype) * 1000
    if guidance is not None:
        guidance = guidance.to(hidden_states.dtype) * 1000
    temb = (transformer.time_text_embed(timestep, pooled_projections) if guidance is None
            else transformer.time_text_embed(timestep, guidance, pooled_projections))
    encoder_hidden_states = transformer.context_embedder(encoder_hidden_states)
    image_rotary_emb = transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

    def call(block, hidden, encoder, block_temb):
        return block(hidden_states=hidden, encoder_hidden_states=encoder, temb=block_temb,
                     image_rotary_emb=image_rotary_emb, joint_attention_kwargs=None)

    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    hidden_states = cache_step.run_blocks(blocks, call, hidden_states, encoder_hidden_states, temb)
    hidden_states = transformer.norm_out(hidden_states, temb)
    return transformer.proj_out(hidden_states)


def latent_image_ids(latent_h: int, latent_w: int, device, dtype) -> torch.Tensor:
    """Position ids of the image tokens of a latent of h x w (packed: h/2 x w/2 tokens).

    Copied from diffusers 0.42.1 `diffusers.pipelines.flux.pipeline_flux.FluxPipeline._prepare_latent_image_ids`
    (source sha256 875a3be9b89e)."""
    ids = torch.zeros(latent_h // 2, latent_w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(latent_h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(latent_w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxAdapter(ModelAdapter):
    """`prepare` and `velocity` are FluxPipeline.__call__'s stages (numbered as there; `decode` is the base
    class's, the same in both families).
    Copied from diffusers 0.42.1 `diffusers.pipelines.flux.pipeline_flux.FluxPipeline.__call__`
    (source sha256 604639f12fe5), for one request, without true CFG.

    No CFG parallel: FLUX.1 dev/schnell are guidance-distilled (one forward per step). FluxPipeline's
    optional true CFG (`true_cfg_scale` > 1 with a negative prompt) is not served by this runtime, so
    the family declares no "cfg" method."""

    family = "flux"
    pipeline_class_name = "FluxPipeline"
    latent_rgb = FLUX_LATENT_RGB
    latent_rgb_bias = FLUX_LATENT_RGB_BIAS
    # The transformer's inputs on a group of `degree` ranks. `hidden_states` is the latent itself, which
    # the executor keeps sharded between steps; the output (velocity) stays on the image shard.
    sp_plan = {
        "hidden_states": SeqSplit(dim=1, stream="image"),
        "img_ids": SeqSplit(dim=0, stream="image"),
        "encoder_hidden_states": SeqSplit(dim=1, stream="text"),
        "txt_ids": SeqSplit(dim=0, stream="text"),
        "pooled_projections": Replicate(),
        "guidance": Replicate(),
    }

    @classmethod
    def local_text_tokens(cls, pipeline) -> int:
        limit = 512 if pipeline.transformer.config.guidance_embeds else 256  # schnell was trained with 256
        return min(limit, int(pipeline.tokenizer_2.model_max_length))

    @classmethod
    def local_defaults(cls, pipeline) -> tuple[int, float]:
        return (50, 3.5) if pipeline.transformer.config.guidance_embeds else (4, 0.0)  # dev, schnell

    def install_attention(self, transformer) -> None:
        transformer.set_attn_processor(UlyssesFluxAttnProcessor(self.attention))

    def exchange_plan_per_block(self):
        config = self.pipeline.transformer.config
        call = AttentionCall(UlyssesFluxAttnProcessor.STREAMS, self.attention.chunks)
        return [[call]] * (config.num_layers + config.num_single_layers)

    def latent_channels(self) -> int:
        return int(self.pipeline.transformer.config.in_channels)

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.pipeline.transformer.config.guidance_embeds)

    def prepare(self, *, prompt, negative_prompt, width, height, seed, num_steps, guidance_scale, device,
                dtype) -> PreparedRequest:
        # FLUX.1 dev/schnell are guidance-distilled: no true classifier-free guidance, the negative
        # prompt is not used (as in FluxPipeline with true_cfg_scale=1).
        # 3. Encode input prompt
        if self.random_text is not None:
            prompt_embeds = self.random_prompt_tensor("prompt_embeds", prompt, dtype)
            pooled = self.random_prompt_tensor("pooled_prompt_embeds", prompt, dtype)
        else:
            prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1,
                max_sequence_length=self.text_tokens,
            )
        cond = {"encoder_hidden_states": prompt_embeds.to(device=device, dtype=dtype),
                "pooled_projections": pooled.to(device=device, dtype=dtype)}
        if self.guidance_embeds:
            cond["guidance"] = torch.full([1], guidance_scale, dtype=torch.float32, device=device)

        # 4. Prepare latent variables: noise from the request's seed on the CPU, whatever the devices.
        num_channels = self.latent_channels() // 4
        latent_h, latent_w = 2 * (height // 16), 2 * (width // 16)
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = randn_tensor((1, num_channels, latent_h, latent_w), generator=generator,
                             device=torch.device("cpu"), dtype=dtype)
        noise = pack_latents(noise)
        image_tokens = noise.shape[1]

        # 5. Prepare timesteps (FluxPipeline's schedule), on a scheduler object of this request's own.
        scheduler = self.new_scheduler()
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            image_tokens,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        if sigmas is None:
            scheduler.set_timesteps(num_steps, device="cpu", mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)
        return PreparedRequest(
            width=width, height=height, seed=seed, num_steps=len(scheduler.timesteps),
            guidance_scale=guidance_scale, image_tokens=image_tokens,
            text_tokens=cond["encoder_hidden_states"].shape[1], rows=1, noise=noise,
            timesteps=scheduler.timesteps.clone(), sigmas=scheduler.sigmas.clone(), cond=cond,
        )

    def batch_inputs(self, prepared, device):
        on = [p.on(device) for p in prepared]
        inputs = {
            "encoder_hidden_states": torch.cat([o["encoder_hidden_states"] for o in on]),
            "pooled_projections": torch.cat([o["pooled_projections"] for o in on]),
        }
        if self.guidance_embeds:
            inputs["guidance"] = torch.cat([o["guidance"] for o in on])
        return inputs

    def shape_inputs(self, first, device, dtype):
        return {
            "img_ids": lambda: latent_image_ids(first.latent_h, first.latent_w, device, dtype),
            "txt_ids": lambda: torch.zeros(first.text_tokens, 3, device=device, dtype=dtype),  # FLUX: all zero
        }

    def velocity(self, transformer, latents, prepared, step_indices, inputs, cache_step=None):
        from tetri_engine import ops

        device = latents[0].device
        hidden_states = ops.pack(latents) if len(latents) > 1 else latents[0]
        # FluxPipeline: timestep = t.expand(B).to(latents.dtype), passed as timestep / 1000
        timestep = torch.stack([p.on(device)["timesteps"][i] for p, i in zip(prepared, step_indices)])
        timestep = timestep.to(hidden_states.dtype)
        if cache_step is None:
            noise_pred = transformer(
                hidden_states=hidden_states,
                timestep=timestep / 1000,
                guidance=inputs.get("guidance"),
                pooled_projections=inputs["pooled_projections"],
                encoder_hidden_states=inputs["encoder_hidden_states"],
                txt_ids=inputs["txt_ids"],
                img_ids=inputs["img_ids"],
                return_dict=False,
            )[0]
        else:
            noise_pred = flux_forward(transformer, hidden_states, timestep / 1000, inputs.get("guidance"),
                                      inputs["pooled_projections"], inputs["encoder_hidden_states"],
                                      inputs["txt_ids"], inputs["img_ids"], cache_step)
        return list(ops.unpack(noise_pred, len(latents))) if len(latents) > 1 else [noise_pred]

