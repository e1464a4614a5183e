"""The executor's parallel layouts (issue 16) on 1, 2 and 4 virtual CPU devices: Ulysses, CFG parallel
(cfg x sp) and the patch-parallel decode give the same image for the same seed, whatever the layout, and
whatever changes between rounds; a layout a request cannot run fails that request only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tetri_engine import ops
from tetri_engine.executor import Executor
from tetri_engine.model import load_runtime, patch_vae
from tetri_engine.request import GenerationRequest

DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
STEPS = 4


@pytest.fixture(scope="module")
def sd3():
    executor = Executor(load_runtime("tiny-sd3", DEVICES), DEVICES, ops.CommCache(timeout_s=30.0))
    yield executor
    executor.shutdown()


@pytest.fixture(scope="module")
def flux():
    executor = Executor(load_runtime("tiny", DEVICES), DEVICES, ops.CommCache(timeout_s=30.0))
    yield executor
    executor.shutdown()


_ids = iter(range(10**6))


def generate(ex, rounds, decode_degree=1, guidance=7.0, width=48, height=80, cache="off"):
    """rounds: [(device indices, steps, cfg), ...], the last one decodes -> (latent, image, request id)."""
    rid = f"p{next(_ids)}"
    ex.submit_encode(rid, GenerationRequest(prompt="a lighthouse", width=width, height=height, seed=11,
                                            num_inference_steps=STEPS, guidance_scale=guidance, cache=cache)).result()
    result = None
    for i, (devices, steps, cfg) in enumerate(rounds):
        last = i == len(rounds) - 1
        result = ex.submit_steps([rid], devices, steps, cfg=cfg, decode_after=last,
                                 decode_degree=decode_degree if last else 1).result()
        assert result[rid].error is None, result[rid].error
    assert result[rid].finished and result[rid].image is not None
    return ex.latent(rid), np.asarray(result[rid].image, dtype=np.int16), rid


def assert_same_image(a, b):
    latent_a, image_a, _ = a
    latent_b, image_b, _ = b
    torch.testing.assert_close(latent_a, latent_b)  # float32: rounding only
    assert np.abs(image_a - image_b).max() <= 1  # 8-bit pixels: a value on a rounding edge may flip


SD3_LAYOUTS = [  # (devices, cfg, decode degree)
    ((1,), 1, 1), ((0, 1), 1, 2), ((2, 3), 2, 1), ((0, 1), 2, 2), ((0, 1, 2, 3), 1, 4),
    ((0, 1, 2, 3), 2, 4), ((3, 2, 1, 0), 2, 2),
]


@pytest.mark.parametrize("devices, cfg, decode", SD3_LAYOUTS,
                         ids=[f"{len(d)}dev-cfg{c}-decode{k}" for d, c, k in SD3_LAYOUTS])
def test_sd3_every_layout_gives_the_one_device_image(sd3, devices, cfg, decode):
    reference = generate(sd3, [((0,), STEPS, 1)])
    ours = generate(sd3, [(devices, STEPS, cfg)], decode_degree=decode)
    assert_same_image(ours, reference)
    assert sd3.request_stats(ours[2])["steps_at_degree"] == {len(devices): STEPS}
    for rid in (reference[2], ours[2]):
        sd3.release(rid)


def test_sd3_layout_changes_between_rounds(sd3):
    reference = generate(sd3, [((0,), STEPS, 1)])
    moving = generate(sd3, [((0,), 1, 1), ((0, 1), 1, 2), ((2, 3, 0, 1), 1, 2), ((1, 2), 1, 1)], decode_degree=2)
    assert_same_image(moving, reference)
    stats = sd3.request_stats(moving[2])
    assert stats["steps_at_degree"] == {1: 1, 2: 2, 4: 1} and stats["regroups"] == 3
    assert sd3.placement(moving[2]) == (1, 2)
    # the same devices, another layout: the latent is regrouped (each branch's devices shard all of it)
    again = generate(sd3, [((0, 1, 2, 3), 2, 1), ((0, 1, 2, 3), 2, 2)], decode_degree=4)
    assert_same_image(again, reference)
    assert sd3.request_stats(again[2])["regroups"] == 1
    for rid in (reference[2], moving[2], again[2]):
        sd3.release(rid)


@pytest.mark.parametrize("devices, decode", [((0, 1), 2), ((0, 1, 2, 3), 4), ((1, 2, 3, 0), 2)])
def test_flux_every_degree_and_decode_gives_the_one_device_image(flux, devices, decode):
    reference = generate(flux, [((0,), STEPS, 1)], guidance=3.5)
    ours = generate(flux, [(devices, STEPS, 1)], decode_degree=decode, guidance=3.5)
    assert_same_image(ours, reference)
    for rid in (reference[2], ours[2]):
        flux.release(rid)


def test_flux_offers_no_cfg_parallel(flux):
    assert "cfg" not in flux.model.parallel_methods and not flux.model.cfg_parallel(7.0)
    rid = f"p{next(_ids)}"
    flux.submit_encode(rid, GenerationRequest(prompt="x", width=64, height=64, seed=1, num_inference_steps=2)).result()
    with pytest.raises(ValueError, match="CFG parallel"):
        flux.submit_steps([rid], (0, 1), 1, cfg=2)
    flux.release(rid)


def test_a_request_without_true_cfg_fails_alone_in_a_cfg_layout(sd3):
    assert sd3.model.cfg_parallel(7.0) and not sd3.model.cfg_parallel(1.0) and not sd3.model.cfg_parallel(7.0, True)
    rids = []
    for guidance, cache in ((1.0, "off"), (7.0, "auto"), (7.0, "off")):
        rid = f"p{next(_ids)}"
        sd3.submit_encode(rid, GenerationRequest(prompt="x", width=64, height=64, seed=1, num_inference_steps=2,
                                                 guidance_scale=guidance, cache=cache)).result()
        rids.append(rid)
    result = sd3.submit_steps(rids, (0, 1), 2, cfg=2).result()
    assert "no true classifier-free guidance" in result[rids[0]].error
    assert "step caching" in result[rids[1]].error
    assert result[rids[2]].error is None and result[rids[2]].finished
    with pytest.raises(ValueError, match="even number"):
        sd3.submit_steps([rids[2]], (0, 1, 2), 1, cfg=2)
    for rid in rids:
        sd3.release(rid)


def test_submit_decode_on_several_devices_equals_one_device(sd3):
    _, _, rid = generate(sd3, [((0,), STEPS, 1)])
    one = np.asarray(sd3.submit_decode(rid, 0).result()[0], dtype=np.int16)
    four = np.asarray(sd3.submit_decode(rid, (3, 2, 1, 0)).result()[0], dtype=np.int16)
    assert np.abs(one - four).max() <= 1
    sd3.release(rid)


def test_a_failing_parallel_decode_fails_its_request_and_the_group_goes_on(sd3, monkeypatch):
    real = patch_vae.PatchConv2d.forward

    def fails_on_rank_1(self, x):
        context = patch_vae.current_patch()
        if context is not None and context.rank == 1 and context.comm is not None:
            raise RuntimeError("simulated failure in the decode")
        return real(self, x)

    monkeypatch.setattr(patch_vae.PatchConv2d, "forward", fails_on_rank_1)
    rid = f"p{next(_ids)}"
    sd3.submit_encode(rid, GenerationRequest(prompt="x", width=64, height=64, seed=1, num_inference_steps=2)).result()
    result = sd3.submit_steps([rid], (0, 1), 2, cfg=2, decode_after=True, decode_degree=2).result()
    assert "decode failed" in result[rid].error and "simulated" in result[rid].error
    monkeypatch.setattr(patch_vae.PatchConv2d, "forward", real)
    ok = generate(sd3, [((0, 1), STEPS, 2)], decode_degree=2)  # the same group, its communicators work
    sd3.release(rid)
    sd3.release(ok[2])


def test_the_python_step_loop_runs_the_cfg_layout_alike(sd3):
    from tetri_engine.executor.options import StepOptions

    with Executor(sd3.runtime, DEVICES, ops.CommCache(timeout_s=30.0), step_options=StepOptions(loop="python")) as ex:
        assert_same_image(generate(ex, [((0, 1, 2, 3), STEPS, 2)], decode_degree=2), generate(sd3, [((0,), STEPS, 1)]))
