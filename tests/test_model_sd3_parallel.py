"""SD3 at sd3-medium's attention layout, in float32 on the CPU: every parallel layout gives the one-device
model output (issue 16).

The 2xH200 check found sd3-medium's degree-2 output 0.109 from degree 1 (FLUX: 0.016), and the tiny-sd3
tests (4 heads of 16, 32 text tokens) had not caught anything. This is the test that would have caught a
bug there: sd3-medium's 24 heads of 64, its 333 text tokens (77 CLIP + 256 T5: padded at degree 2 and
4), the context-pre-only last block, an image size whose tokens pad too, RMS q/k norms and one SD3.5
dual-attention layer, in float32 so that rounding cannot hide anything. It compares each guidance
branch *before* the guidance combination `uncond + g * (cond - uncond)`, which multiplies any rounding
difference by up to 2g - 1 (13 at g = 7): that is what the GPU's bf16 figure was (bench/RESULTS.md).
Two layers and small widths elsewhere keep it a few seconds.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tetri_engine import ops
from tetri_engine.model import PRESETS, verify
from tetri_engine.model.presets import TINY_VAE, build_random_pipeline
from tetri_engine.model.runtime import ADAPTERS, ModelRuntime

DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
MEDIUM = PRESETS["sd3-medium"]
# sd3-medium's heads (24 x 64) and text (333 tokens); two layers, the last context-pre-only; narrow
# text and pooled inputs (they only feed the embedders); RMS q/k norms and a dual-attention layer 0.
LAYOUT = {**MEDIUM.transformer, "num_layers": 2, "joint_attention_dim": 64, "pooled_projection_dim": 32,
          "qk_norm": "rms_norm", "dual_attention_layers": (0,)}


@pytest.fixture(scope="module")
def medium():
    preset = dataclasses.replace(MEDIUM, transformer=LAYOUT, vae={**TINY_VAE, "scaling_factor": 1.5305,
                                                                 "shift_factor": 0.0609},
                                 random_text={"prompt_embeds": (MEDIUM.text_tokens, 64), "pooled_prompt_embeds": (32,)})
    pipe = build_random_pipeline(preset, torch.device("cpu"), torch.float32, seed=3)
    adapter = ADAPTERS[preset.pipeline_class](pipe, text_tokens=preset.text_tokens, random_text=preset.random_text)
    adapter.install_attention(pipe.transformer)
    return ModelRuntime(name="sd3-medium-2-layers", pipeline=pipe, adapter=adapter, devices=DEVICES,
                        dtype=torch.float32, default_steps=28, default_guidance=7.0,
                        transformers={"cpu": pipe.transformer}, vaes={"cpu": pipe.vae},
                        encode_device=torch.device("cpu"))


def test_the_layout_is_sd3_mediums(medium):
    config = medium.pipeline.transformer.config
    assert (config.num_attention_heads, config.attention_head_dim) == (24, 64)
    assert medium.pipeline.transformer.transformer_blocks[-1].context_pre_only
    p = medium.prepare(prompt="a lighthouse", width=48, height=80, seed=3)
    assert (p.text_tokens, p.image_tokens, p.rows) == (333, 15, 2)  # 333 % 2, % 4 and 15 % 2, % 4: padded


@pytest.mark.parametrize("devices, cfg", [(2, 1), (4, 1), (2, 2), (4, 2)],
                         ids=["ulysses-2", "ulysses-4", "cfg-2", "cfg-2-x-ulysses-2"])
def test_each_guidance_branch_equals_one_device_in_float32(medium, devices, cfg):
    p = medium.prepare(prompt="a lighthouse at dusk", width=48, height=80, seed=3, guidance_scale=7.0)
    cache = ops.CommCache(timeout_s=60.0)
    one = verify.sp_velocity(medium, p, DEVICES[:1], cache, step_index=1, branches=True)
    many = verify.sp_velocity(medium, p, DEVICES[:devices], cache, step_index=1, cfg=cfg, branches=True)
    assert one.shape == (2, 15, 64)  # [uncond, cond]
    scale = one.abs().max().item()
    assert scale > 0.1  # a real signal, not a degenerate output
    # float32 rounding only (different sums in attention): a misplaced token or text shard is O(scale)
    torch.testing.assert_close(many, one, rtol=0, atol=2e-5 * scale)
