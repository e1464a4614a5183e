"""Stable Diffusion 3 / 3.5 on a sequence-parallel group: StableDiffusion3Pipeline's stages, split per
`sp_plan`, with true classifier-free guidance (each request runs as two rows, [uncond, cond]), which a
CFG-parallel group splits between its halves (`cfg_plan`: each half runs one branch).

`SD3Transformer2DModel.forward` patchifies a whole [B, C, H, W] latent and unpatchifies its output, so
it cannot run on a token shard. `sd3_token_forward` is the same forward on tokens: the patch embedding
(a stride-p convolution) as a linear map over packed 2x2 patches, the rank's slice of the cropped
sin-cos position embedding, then diffusers' own blocks, norm and projection; the output is repacked in
the latent's token layout instead of being unpatchified. The latent is kept packed like FLUX's.
The position-embedding grid bounds the image size (`max_side_px`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from tetri_engine.model.adapter import ModelAdapter, PreparedRequest, Replicate, SeqSplit, gather_branches, pack_latents
from tetri_engine.model.flux import FLUX_LATENT_RGB, FLUX_LATENT_RGB_BIAS
from tetri_engine.model.ulysses import AttentionCall, AttentionOptions, current_context, sp_attention


class UlyssesJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0, attending over the group's whole sequence.

    Copied from diffusers 0.42.1 `diffusers.models.attention_processor.JointAttnProcessor2_0.__call__`
    (source sha256 ed23f45c129b), the attention call swapped for `sp_attention`.

    With text ([image shard, text shard], the SD3 order) in the joint blocks; image only in the
    SD3.5 second attention (`attn2`).
    """

    def __init__(self, options: AttentionOptions = AttentionOptions()):
        self.options = options  # the kernel and head chunks of `sp_attention`

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported by the sequence-parallel runtime")
        batch_size, image_len = hidden_states.shape[0], hidden_states.shape[1]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # [B, L, H, D] (diffusers transposes to [B, H, L, D]; the norms act on the last dim either way)
        query = query.view(batch_size, -1, attn.heads, head_dim)
        key = key.view(batch_size, -1, attn.heads, head_dim)
        value = value.view(batch_size, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        streams = ("image",)
        if encoder_hidden_states is not None:
            streams = ("image", "text")
            enc_query = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            enc_key = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            enc_value = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                enc_query = attn.norm_added_q(enc_query)
            if attn.norm_added_k is not None:
                enc_key = attn.norm_added_k(enc_key)
            query = torch.cat([query, enc_query], dim=1)
            key = torch.cat([key, enc_key], dim=1)
            value = torch.cat([value, enc_value], dim=1)

        hidden_states = sp_attention(query, key, value, streams, self.options)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_len], hidden_states[:, image_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def sd3_token_forward(transformer, tokens, pos_embed, encoder_hidden_states, pooled_projections, timestep,
                      cache_step=None):
    """SD3Transformer2DModel.forward on packed latent tokens [B, L, C*p*p] -> velocity tokens, same layout.
    cache_step: run the blocks through the step cache (`step_cache.CacheStep.run_blocks`).

    Copied from diffusers 0.42.1 `diffusers.models.transformers.transformer_sd3.SD3Transformer2DModel.forward`
    (source sha256 deb6b8b6a493); its patch embedding:
    Copied from diffusers 0.42.1 `diffusers.models.embeddings.PatchEmbed.forward` (source sha256 38204fee40e2)."""
    patch = transformer.config.patch_size
    out_channels = transformer.out_channels
    proj = transformer.pos_embed.proj  # Conv2d(C, D, kernel=p, stride=p): a linear map of each patch
    hidden_states = F.linear(tokens, proj.weight.flatten(1), proj.bias)
    hidden_states = (hidden_states + pos_embed).to(hidden_states.dtype)
    temb = transformer.time_text_embed(timestep, pooled_projections)
    encoder_hidden_states = transformer.context_embedder(encoder_hidden_states)
    if cache_step is None:
        for block in transformer.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb
            )
    else:
        hidden_states = cache_step.run_blocks(
            list(transformer.transformer_blocks),
            lambda block, hidden, encoder, block_temb: block(
                hidden_states=hidden, encoder_hidden_states=encoder, temb=block_temb),
            hidden_states, encoder_hidden_states, temb)
    hidden_states = transformer.norm_out(hidden_states, temb)
    hidden_states = transformer.proj_out(hidden_states)  # features ordered (row, column, channel)
    b, length, _ = hidden_states.shape
    hidden_states = hidden_states.view(b, length, patch, patch, out_channels).permute(0, 1, 4, 2, 3)
    return hidden_states.reshape(b, length, out_channels * patch * patch)  # (channel, row, column)


def guide(noise_pred: torch.Tensor, prepared: list[PreparedRequest]) -> list[torch.Tensor]:
    """Each request's velocity from its output rows (`p.rows` each, in batch order): with two rows
    [uncond, cond], the pipeline's classifier-free guidance."""
    out, row = [], 0
    for p in prepared:
        pred = noise_pred[row:row + p.rows]
        row += p.rows
        if p.rows == 2:
            noise_pred_uncond, noise_pred_text = pred.chunk(2)
            pred = noise_pred_uncond + p.guidance_scale * (noise_pred_text - noise_pred_uncond)
        out.append(pred)
    return out


class SD3Adapter(ModelAdapter):
    """`prepare` and `velocity` are StableDiffusion3Pipeline.__call__'s stages (numbered as there; `decode`
    is the base class's, the same in both families).
    Copied from diffusers 0.42.1
    `diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3.StableDiffusion3Pipeline.__call__`
    (source sha256 76f87c58276e), for one request."""

    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    # No preview map of its own here: FLUX's, also a 16-channel latent, is a fair approximation.
    latent_rgb = FLUX_LATENT_RGB
    latent_rgb_bias = FLUX_LATENT_RGB_BIAS
    sp_plan = {
        "hidden_states": SeqSplit(dim=1, stream="image"),
        "pos_embed": SeqSplit(dim=1, stream="image"),
        "encoder_hidden_states": SeqSplit(dim=1, stream="text"),
        "pooled_projections": Replicate(),
    }
    parallel_methods = frozenset({"ulysses", "cfg", "patch_vae"})
    cfg_plan = frozenset({"encoder_hidden_states", "pooled_projections"})  # [negative, positive] rows
    cfg_guidance_above = 1.0  # StableDiffusion3Pipeline.do_classifier_free_guidance: guidance_scale > 1

    def __init__(self, pipeline, **kwargs):
        super().__init__(pipeline, **kwargs)
        if pipeline.transformer.config.patch_size != 2:
            raise ValueError("the runtime packs 2x2 latent patches; this SD3 transformer has patch_size "
                             f"{pipeline.transformer.config.patch_size}")

    @classmethod
    def local_text_tokens(cls, pipeline) -> int:
        return int(pipeline.tokenizer_max_length) + min(256, int(pipeline.tokenizer_3.model_max_length))  # CLIP + T5

    @classmethod
    def local_defaults(cls, pipeline) -> tuple[int, float]:
        return 28, 7.0

    def max_side_px(self) -> int:
        """The position-embedding grid: pos_embed_max_size patches a side."""
        return int(self.pipeline.transformer.config.pos_embed_max_size) * self.patch_px

    def install_attention(self, transformer) -> None:
        transformer.set_attn_processor(UlyssesJointAttnProcessor(self.attention))

    def exchange_plan_per_block(self):
        # joint attention, then SD3.5's attn2
        joint, image = (AttentionCall(("image", "text"), self.attention.chunks),
                        AttentionCall(("image",), self.attention.chunks))
        return [[joint, image] if block.use_dual_attention else [joint]
                for block in self.pipeline.transformer.transformer_blocks]

    def latent_channels(self) -> int:
        return int(self.pipeline.transformer.config.in_channels) * 4

    def prepare(self, *, prompt, negative_prompt, width, height, seed, num_steps, guidance_scale, device,
                dtype) -> PreparedRequest:
        do_cfg = self.true_cfg(guidance_scale)  # StableDiffusion3Pipeline.do_classifier_free_guidance
        negative_prompt = negative_prompt or ""
        # 3. Encode input prompt; with guidance, rows are [negative, positive] as in the pipeline.
        if self.random_text is not None:
            prompt_embeds = self.random_prompt_tensor("prompt_embeds", prompt, dtype)
            pooled = self.random_prompt_tensor("pooled_prompt_embeds", prompt, dtype)
            negative_embeds = self.random_prompt_tensor("prompt_embeds", negative_prompt, dtype)
            negative_pooled = self.random_prompt_tensor("pooled_prompt_embeds", negative_prompt, dtype)
        else:
            prompt_embeds, negative_embeds, pooled, negative_pooled = self.pipeline.encode_prompt(
                prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
                max_sequence_length=self.text_tokens - self.pipeline.tokenizer_max_length,
            )
        if do_cfg:
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
            pooled = torch.cat([negative_pooled, pooled])
        cond = {"encoder_hidden_states": prompt_embeds.to(device=device, dtype=dtype),
                "pooled_projections": pooled.to(device=device, dtype=dtype)}

        # 4. Prepare latent variables (noise from the request's seed on the CPU), packed into tokens.
        num_channels = int(self.pipeline.transformer.config.in_channels)
        latent_h, latent_w = height // 8, width // 8
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = randn_tensor((1, num_channels, latent_h, latent_w), generator=generator,
                             device=torch.device("cpu"), dtype=dtype)
        noise = pack_latents(noise)

        # 5. Prepare timesteps, on a scheduler object of this request's own.
        scheduler = self.new_scheduler()
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            kwargs["mu"] = calculate_shift(
                noise.shape[1],
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
        return PreparedRequest(
            width=width, height=height, seed=seed, num_steps=len(scheduler.timesteps),
            guidance_scale=guidance_scale, image_tokens=noise.shape[1],
            text_tokens=cond["encoder_hidden_states"].shape[1], rows=2 if do_cfg else 1, noise=noise,
            timesteps=scheduler.timesteps.clone(), sigmas=scheduler.sigmas.clone(), cond=cond,
        )

    def batch_inputs(self, prepared, device):
        on = [p.on(device) for p in prepared]
        return {
            "encoder_hidden_states": torch.cat([o["encoder_hidden_states"] for o in on]),
            "pooled_projections": torch.cat([o["pooled_projections"] for o in on]),
        }

    def shape_inputs(self, first, device, dtype):
        transformer = self.pipeline.transformer
        # The cropped sin-cos grid of the whole image (in latent pixels, as PatchEmbed.forward asks), cast
        # like the model's buffer; `rank_inputs` takes this rank's slice of it.
        return {"pos_embed": lambda: transformer.pos_embed.cropped_pos_embed(first.latent_h, first.latent_w).to(
            device=device, dtype=dtype)}

    def velocity(self, transformer, latents, prepared, step_indices, inputs, cache_step=None):
        return guide(self.model_output(transformer, latents, prepared, step_indices, inputs, cache_step), prepared)

    def model_output(self, transformer, latents, prepared, step_indices, inputs, cache_step=None):
        device = latents[0].device
        # CFG parallel: this rank runs one guidance branch of each request (its rows of `inputs`).
        context = current_context()
        branch = context.branch if context is not None else None
        rows = [1 if branch is not None else p.rows for p in prepared]
        # latent_model_input = torch.cat([latents] * 2) for each request with guidance. Requests bring
        # one or two rows each, so the batch is a plain concatenation rather than ops.pack.
        if len(latents) == 1 and rows[0] == 1:
            hidden_states = latents[0]
        else:
            hidden_states = torch.cat([lat.expand(n, -1, -1) for lat, n in zip(latents, rows)])
        timestep = torch.cat([p.on(device)["timesteps"][i].expand(n) for p, i, n in zip(prepared, step_indices, rows)])
        noise_pred = sd3_token_forward(
            transformer, hidden_states, inputs["pos_embed"], inputs["encoder_hidden_states"],
            inputs["pooled_projections"], timestep, cache_step,
        )
        if branch is not None:  # the other branch from the twins: every row of each request, as at one rank
            noise_pred = gather_branches(noise_pred, context)
        return noise_pred

