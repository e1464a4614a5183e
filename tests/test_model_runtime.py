"""The model layer on the CPU: our runtime against diffusers itself, the sequence-parallel forward at
degrees 2 and 4 against degree 1, presets and loading."""
from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from tetri_engine import ops
from tetri_engine.model import (
    PRESETS,
    check_heads,
    flow_match_euler_step,
    load_runtime,
    pack_latents,
    unpack_latents,
)
from tetri_engine.model import verify
from tetri_engine.model.presets import build_random_pipeline, build_tiny_pipeline
from tetri_engine.model.runtime import replicate

DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


@pytest.fixture(scope="module")
def flux():
    return load_runtime("tiny", DEVICES)


@pytest.fixture(scope="module")
def sd3():
    return load_runtime("tiny-sd3", DEVICES)


@pytest.fixture(scope="module")
def comm_cache():
    return ops.CommCache(timeout_s=30.0)


def sp_velocity(runtime, prepared, degree, comm_cache, step_index=0):
    """One forward of `prepared` at `degree` on virtual devices (one thread per rank), gathered."""
    return verify.sp_velocity(runtime, prepared, DEVICES[:degree], comm_cache, step_index)


# --- pure pieces ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_step_is_the_diffusers_scheduler_step(dtype):
    scheduler = FlowMatchEulerDiscreteScheduler(**PRESETS["tiny"].scheduler)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=0.8)
    g = torch.Generator().manual_seed(0)
    ours = theirs = torch.randn(1, 20, 64, generator=g).to(dtype)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(1, 20, 64, generator=g).to(dtype)
        theirs = scheduler.step(v, t, theirs, return_dict=False)[0]
        ours = flow_match_euler_step(ours, v, scheduler.sigmas, i)
        assert torch.equal(ours, theirs)


def test_packing_matches_flux_pipeline():
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 80, 8), x)


def test_heads_not_divisible_by_degree_is_a_clear_error():
    with pytest.raises(ValueError, match="4 attention heads.*3 devices"):
        check_heads(4, 3)
    check_heads(4, 2)


# --- FLUX -------------------------------------------------------------------------------------------------


def test_flux_degree_1_equals_diffusers_transformer(flux):
    reference = build_tiny_pipeline(PRESETS["tiny"]).transformer  # same seed, diffusers' own processors
    p = flux.prepare(prompt="a red bicycle", width=64, height=96, seed=7)
    o = p.on(torch.device("cpu"))
    with torch.no_grad():
        expected = reference(
            hidden_states=p.noise, timestep=o["timesteps"][2].expand(1) / 1000, guidance=o["guidance"],
            pooled_projections=o["pooled_projections"], encoder_hidden_states=o["encoder_hidden_states"],
            txt_ids=torch.zeros(p.text_tokens, 3), img_ids=FluxPipeline._prepare_latent_image_ids(1, 6, 4, "cpu", torch.float32),
            return_dict=False)[0]
    ours = sp_velocity(flux, p, 1, None, step_index=2)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("width,height", [(64, 64), (48, 80)])  # 16 tokens; 15 (uneven: padded shards)
@pytest.mark.parametrize("degree", [2, 4])
def test_flux_degree_k_equals_degree_1(flux, comm_cache, width, height, degree):
    p = flux.prepare(prompt="a lighthouse", width=width, height=height, seed=3)
    torch.testing.assert_close(sp_velocity(flux, p, degree, comm_cache), sp_velocity(flux, p, 1, None))


def test_flux_denoising_equals_flux_pipeline(flux):
    """Prompt encoding, seeded noise, schedule and steps of the runtime == FluxPipeline's own loop."""
    from tetri_engine.executor import Executor
    from tetri_engine.request import GenerationRequest

    pipe = build_tiny_pipeline(PRESETS["tiny"])
    expected = pipe("a tree", height=64, width=80, num_inference_steps=3, guidance_scale=3.5,
                    generator=torch.Generator("cpu").manual_seed(11), output_type="latent",
                    max_sequence_length=32).images
    with Executor(flux) as ex:
        ex.submit_encode("r", GenerationRequest(prompt="a tree", width=80, height=64, num_inference_steps=3,
                                                seed=11)).result()
        ex.submit_steps(["r"], [0, 1], 3).result()
        torch.testing.assert_close(ex.latent("r"), expected)


# --- SD3 --------------------------------------------------------------------------------------------------


def test_sd3_degree_1_equals_diffusers_transformer(sd3):
    reference = build_tiny_pipeline(PRESETS["tiny-sd3"]).transformer
    p = sd3.prepare(prompt="a red bicycle", width=64, height=96, seed=7)
    assert p.rows == 2  # true classifier-free guidance
    o = p.on(torch.device("cpu"))
    with torch.no_grad():
        latent = unpack_latents(p.noise, 12, 8)
        out = reference(hidden_states=torch.cat([latent] * 2), timestep=o["timesteps"][1].expand(2),
                        pooled_projections=o["pooled_projections"], encoder_hidden_states=o["encoder_hidden_states"],
                        return_dict=False)[0]
        uncond, cond = out.chunk(2)
        expected = pack_latents(uncond + p.guidance_scale * (cond - uncond))
    # the patch embedding runs as a matmul instead of a convolution: float32 rounding only
    torch.testing.assert_close(sp_velocity(sd3, p, 1, None, step_index=1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("degree", [2, 4])
def test_sd3_degree_k_equals_degree_1(sd3, comm_cache, degree):
    # 15 image tokens and 109 text tokens: both streams padded at degrees 2 and 4
    p = sd3.prepare(prompt="a lighthouse", width=48, height=80, seed=3)
    assert p.text_tokens % degree != 0
    torch.testing.assert_close(sp_velocity(sd3, p, degree, comm_cache), sp_velocity(sd3, p, 1, None))


def test_sd3_denoising_equals_sd3_pipeline(sd3):
    from tetri_engine.executor import Executor
    from tetri_engine.request import GenerationRequest

    pipe = build_tiny_pipeline(PRESETS["tiny-sd3"])
    expected = pipe("a tree", height=64, width=48, num_inference_steps=3, guidance_scale=5.0,
                    generator=torch.Generator("cpu").manual_seed(11), output_type="latent",
                    max_sequence_length=32).images
    with Executor(sd3) as ex:
        ex.submit_encode("r", GenerationRequest(prompt="a tree", width=48, height=64, num_inference_steps=3,
                                                guidance_scale=5.0, seed=11)).result()
        ex.submit_steps(["r"], [0, 1], 3).result()
        torch.testing.assert_close(unpack_latents(ex.latent("r"), 8, 6), expected, rtol=1e-5, atol=1e-5)


# --- presets and loading ----------------------------------------------------------------------------------


def test_runtime_attributes(flux, sd3):
    assert (flux.family, flux.num_heads, flux.patch_px, flux.default_steps) == ("flux", 4, 16, 8)
    assert (sd3.family, sd3.num_heads) == ("sd3", 4)
    assert flux.dtype == torch.float32


def test_invalid_sizes_are_rejected(flux):
    with pytest.raises(ValueError, match="multiples of 16"):
        flux.prepare(prompt="x", width=100, height=64, seed=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        flux.prepare(prompt="x", width=64, height=64, seed=0, num_steps=0)


def test_local_directory_round_trip(flux, tmp_path):
    flux.pipeline.save_pretrained(tmp_path)
    loaded = load_runtime(str(tmp_path), ["cpu:0", "cpu:1"])
    assert loaded.family == "flux" and loaded.adapter.text_tokens == 32
    a = flux.prepare(prompt="a boat", width=64, height=64, seed=5)
    b = loaded.prepare(prompt="a boat", width=64, height=64, seed=5)
    torch.testing.assert_close(b.cond["encoder_hidden_states"], a.cond["encoder_hidden_states"])
    torch.testing.assert_close(sp_velocity(loaded, b, 1, None), sp_velocity(flux, a, 1, None))


def test_bad_directories_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        load_runtime(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="holds a StableDiffusionPipeline.*FluxPipeline"):
        load_runtime(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="cannot load the FluxPipeline"):
        load_runtime(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        load_runtime("no-such-model")


def test_full_size_preset_configs():
    dev, schnell, sd3m = PRESETS["flux-dev"], PRESETS["flux-schnell"], PRESETS["sd3-medium"]
    assert (dev.transformer["num_layers"], dev.transformer["num_single_layers"]) == (19, 38)
    assert dev.transformer["num_attention_heads"] * dev.transformer["attention_head_dim"] == 3072
    assert dev.transformer["guidance_embeds"] and not schnell.transformer["guidance_embeds"]
    assert (sd3m.transformer["num_layers"], sd3m.transformer["num_attention_heads"]) == (24, 24)
    with pytest.raises(ValueError, match="meant for GPUs"):
        load_runtime("flux-dev", ["cpu:0"])


def test_random_pipeline_and_replica(tmp_path):
    """The full-size build path (random weights in the model dtype, random prompt embeddings) and the
    replication of a model, on a cut-down FLUX-dev / SD3 config."""
    import dataclasses

    from tetri_engine.model.flux import FluxAdapter

    preset = dataclasses.replace(PRESETS["flux-dev"], transformer={
        **PRESETS["flux-dev"].transformer, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2})
    pipe = build_random_pipeline(preset, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    adapter = FluxAdapter(pipe, text_tokens=preset.text_tokens, random_text=preset.random_text)
    p = adapter.prepare(prompt="x", negative_prompt=None, width=64, height=64, seed=1, num_steps=2,
                        guidance_scale=3.5, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert p.cond["encoder_hidden_states"].shape == (1, 512, 4096)
    assert p.cond["pooled_projections"].shape == (1, 768)
    again = adapter.prepare(prompt="x", negative_prompt=None, width=64, height=64, seed=1, num_steps=2,
                            guidance_scale=3.5, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert torch.equal(p.cond["encoder_hidden_states"], again.cond["encoder_hidden_states"])

    sd3_preset = dataclasses.replace(PRESETS["sd3-medium"], transformer={
        **PRESETS["sd3-medium"].transformer, "num_layers": 1, "num_attention_heads": 2})
    sd3_pipe = build_random_pipeline(sd3_preset, torch.device("cpu"), torch.bfloat16)
    copy = replicate(sd3_pipe.transformer, torch.device("cpu"))
    for (name, a), (_, b) in zip(sd3_pipe.transformer.named_parameters(), copy.named_parameters()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(sd3_pipe.transformer.named_buffers(), copy.named_buffers()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), name
