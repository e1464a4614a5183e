"""The full-size FLUX.1-dev architecture (random weights, bf16) on two GPUs: degree 2 gives degree 1's
output within bf16 tolerance, through the NCCL communicators. Needs two CUDA GPUs (about 24 GB each)."""
from __future__ import annotations

import pytest
import torch

from tetri_engine import ops
from tetri_engine.executor import Executor
from tetri_engine.model import load_runtime, verify
from tetri_engine.request import GenerationRequest

pytestmark = pytest.mark.multi_gpu

DEVICES = ["cuda:0", "cuda:1"]


@pytest.fixture(scope="module")
def flux_dev():
    return load_runtime("flux-dev", DEVICES)  # all 19 + 38 blocks


@pytest.fixture(scope="module")
def cache():
    return ops.CommCache()


def bf16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # A few units in the last place of bf16 at the largest values (diffusers' own Ulysses-2 on the
    # same model: max |difference| 0.0156 for values up to ~3).
    scale = max(1.0, expected.abs().max().item())
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-2 * scale)
    assert (actual - expected).abs().mean().item() < 2e-3 * scale


@pytest.mark.parametrize("size", [512, 1024, (49 * 16, 63 * 16)])  # the last: 3087 tokens, padded shards
def test_flux_dev_degree_2_matches_degree_1(flux_dev, cache, size):
    width, height = (size, size) if isinstance(size, int) else size
    prepared = flux_dev.prepare(prompt="a lighthouse at dusk", width=width, height=height, seed=0)
    one = verify.sp_velocity(flux_dev, prepared, DEVICES[:1], cache)
    two = verify.sp_velocity(flux_dev, prepared, DEVICES, cache)
    bf16_close(two, one)


def test_flux_dev_degree_schedule_on_gpus(flux_dev, cache):
    with Executor(flux_dev, DEVICES, cache) as ex:
        for rid in ("fixed", "moving"):
            ex.submit_encode(rid, GenerationRequest(prompt="a boat", width=512, height=512, seed=3,
                                                    num_inference_steps=4)).result()
        ex.submit_steps(["fixed"], (0,), 4).result()
        for group in [(0,), (0, 1), (1,), (1, 0)]:
            result = ex.submit_steps(["moving"], group, 1, decode_after=True).result()
            assert result.errors == {}
        assert result["moving"].image.size == (512, 512)
        bf16_close(ex.latent("moving").float(), ex.latent("fixed").float())
        stats = ex.request_stats("moving")
        assert stats["steps_at_degree"] == {1: 2, 2: 2} and stats["regroups"] == 3
        assert stats["peak_memory_bytes"] > 20 * 2**30  # the 24 GB of weights are on each device


def test_failure_on_one_gpu_only_does_not_hang_the_group(flux_dev, cache, monkeypatch):
    """Rank 1 fails a request before its first exchange while rank 0 queues the whole forward's NCCL
    exchanges: rank 1 replays them, the group stays usable, only that request fails."""
    from tetri_engine.model import ulysses

    with Executor(flux_dev, DEVICES, cache) as ex:
        for rid, seed in (("good", 1), ("bad", 666)):
            ex.submit_encode(rid, GenerationRequest(prompt="a cat", width=512, height=512, seed=seed,
                                                    num_inference_steps=4)).result()
        velocity = flux_dev.adapter.velocity

        def fails_on_rank_1(transformer, latents, prepared, step_indices, inputs):
            if ulysses.current_context().rank == 1 and any(p.seed == 666 for p in prepared):
                raise torch.cuda.OutOfMemoryError("injected on cuda:1")
            return velocity(transformer, latents, prepared, step_indices, inputs)

        monkeypatch.setattr(flux_dev.adapter, "velocity", fails_on_rank_1)
        result = ex.submit_steps(["good", "bad"], (0, 1), 2).result()
        assert result["good"].error is None and result["good"].steps_done == 2
        assert "CUDA out of memory" in result["bad"].error
        monkeypatch.setattr(flux_dev.adapter, "velocity", velocity)
        assert ex.submit_steps(["good"], (0, 1), 2, decode_after=True).result().errors == {}
