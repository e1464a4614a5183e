"""The step-redundancy analysis on the tiny models: what it records, that it is reproducible, the plan
it derives, and the `analyze-redundancy` command's files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tetri_engine.model import load_runtime, redundancy
from tetri_engine.model.step_cache import CachePlan, StepCache, plan_path

PROMPTS = ["a red bicycle", "a lighthouse at night"]


@pytest.fixture(scope="module")
def runtime():
    return load_runtime("tiny", ["cpu:0"])


@pytest.fixture(scope="module")
def profile(runtime):
    return redundancy.analyze(runtime, PROMPTS, width=64, height=48, num_steps=5, seed=7)


def test_arrays_cover_every_layer_step_and_stream(runtime, profile):
    assert profile.layers == ["block0", "block1", "block2", "block3"]  # tiny FLUX: 2 double + 2 single blocks
    for key in ("k_image", "k_text", "v_image", "v_text", "out_image", "out_text"):
        arr = profile.distances[key]
        assert arr.shape == (2, 5, 4)
        assert np.isnan(arr[:, 0]).all()  # no previous step
        assert np.isfinite(arr[:, 1:]).all() and (arr[:, 1:] > 0).all()
    assert profile.first_block.shape == profile.reuse_error.shape == (2, 5)
    assert np.isfinite(profile.first_block[:, 1:]).all() and np.isfinite(profile.reuse_error[:, 1:]).all()
    # the text stream of block 0 depends on the step only through the timestep: K/V of text and image
    # tokens are recorded apart and differ
    assert not np.allclose(profile.distances["k_text"], profile.distances["k_image"], equal_nan=True)
    # the final latents are the uncached runs' (what the plan is validated against)
    assert len(profile.final_latents) == 2 and profile.final_latents[0].shape == (1, 12, 64)


def test_distances_are_what_they_say(runtime, profile):
    """Recompute one number by hand: relative L2 of the attention output of the last layer, step 2 vs 1."""
    prepared = runtime.prepare(prompt=PROMPTS[1], width=64, height=48, seed=7, num_steps=5)
    outs = []

    def keep(query, key, value, out, streams):
        outs.append(out[:, prepared.text_tokens:].clone())  # FLUX: [text, image]

    redundancy.denoise(runtime, prepared, observer=keep)
    per_step = [outs[i * 4 + 3] for i in range(5)]
    expected = torch.linalg.vector_norm(per_step[2] - per_step[1]) / torch.linalg.vector_norm(per_step[1])
    assert profile.distances["out_image"][1, 2, 3] == pytest.approx(float(expected), rel=1e-5)


def test_same_seed_same_arrays_and_other_seed_other_arrays(runtime, profile):
    again = redundancy.analyze(runtime, PROMPTS, width=64, height=48, num_steps=5, seed=7)
    other = redundancy.analyze(runtime, PROMPTS, width=64, height=48, num_steps=5, seed=8)
    for key, arr in profile.arrays().items():
        assert np.array_equal(arr, again.arrays()[key], equal_nan=arr.dtype.kind == "f"), key
    assert not np.allclose(profile.distances["k_image"], other.distances["k_image"], equal_nan=True)


def test_cross_prompt_cv_and_summary(profile):
    cv = profile.cv()
    arr = profile.distances["v_image"]
    expected = arr[:, 3, 2].std(ddof=1) / arr[:, 3, 2].mean()
    assert cv["v_image"][3, 2] == pytest.approx(expected)
    summary = profile.summary()
    assert summary["metric"] == "relative L2 to the previous step"
    assert summary["stable"] == (summary["cv_median_overall"] < redundancy.STABLE_CV)
    assert len(summary["first_block_change_mean_by_step"]) == 5


def test_derived_plan_is_validated_against_the_uncached_runs(runtime, profile):
    # A lax bound gives a threshold that skips; a high PSNR floor then tightens it (or turns caching off)
    plan = redundancy.derive_plan(runtime, profile, max_output_error=100.0, min_psnr_db=70.0)
    tries = plan.details["tries"]
    assert tries[0]["threshold"] > 1 and sum(tries[0]["skipped_steps"]) > 0
    assert len(tries) > 1 and tries[0]["min_psnr_db"] < 70.0
    assert tries[1]["threshold"] == tries[0]["threshold"] / 2
    assert plan.threshold == 0 or tries[-1]["min_psnr_db"] >= 70.0
    # with no floor worth the name the first threshold stands and the skips are counted
    loose = redundancy.derive_plan(runtime, profile, max_output_error=100.0, min_psnr_db=-100.0)
    assert len(loose.details["tries"]) == 1 and loose.threshold == tries[0]["threshold"]
    assert loose.expected_skip_fraction == min(tries[0]["skipped_steps"]) / 5
    assert loose.expected_step_factor == pytest.approx(1 - loose.expected_skip_fraction * 3 / 4)
    # the plan's skips are the cache's: denoise with it
    cache = StepCache(CachePlan(threshold=loose.threshold, warmup_steps=loose.warmup_steps))
    prepared = runtime.prepare(prompt=PROMPTS[0], width=64, height=48, seed=7, num_steps=5)
    redundancy.denoise(runtime, prepared, cache=cache)
    assert cache.skipped_steps == tries[0]["skipped_steps"][0]


def test_sd3_records_its_image_only_attention():
    sd3 = load_runtime("tiny-sd3", ["cpu:0"])
    profile = redundancy.analyze(sd3, PROMPTS[:1], width=32, height=32, num_steps=3)
    assert profile.layers == ["block0.0", "block0.1", "block1"]  # block 0 is SD3.5-style dual attention
    assert np.isnan(profile.distances["k_text"][:, :, 1]).all()  # attn2 sees image tokens only
    assert np.isfinite(profile.distances["k_text"][:, 1:, [0, 2]]).all()
    assert profile.summary()["stable"] is None  # one prompt: no CV


def test_command_writes_the_files_and_installs_the_plan(tmp_path, capsys):
    from tetri_engine import cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    out = tmp_path / "out"
    code = cli.main(["analyze-redundancy", "--model", "tiny", "--prompts", str(prompts), "--steps", "4",
                     "--size", "32x32", "--device", "cpu:0", "--output", str(out),
                     "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    for name in ("redundancy.npz", "summary.json", "cache_plan.json", "heatmap.png", "layers.png"):
        assert (out / name).stat().st_size > 0, name
    with np.load(out / "redundancy.npz") as arrays:
        assert arrays["out_image"].shape == (2, 4, 4)
        assert list(arrays["prompts"]) == ["a cat", "a dog"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"]["model"] == "tiny"
    installed = plan_path("tiny", str(tmp_path / "cache"))
    assert os.path.isfile(installed)
    assert CachePlan.load(installed) == CachePlan.load(str(out / "cache_plan.json"))
    printed = capsys.readouterr().out
    assert "cross-prompt CV" in printed and "cache plan: threshold" in printed
