"""The patch-parallel VAE decode (model/patch_vae.py) on virtual CPU devices, in float32: the stitched bands
equal the one-device decode, the swapped layers change nothing outside a patch decode, and a rank that
fails mid-decode does not hang the others."""
from __future__ import annotations

import threading

import pytest
import torch

from tetri_engine import ops
from tetri_engine.model import load_runtime, patch_vae, verify
from tetri_engine.model.presets import PRESETS, build_tiny_pipeline

DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


@pytest.fixture(scope="module")
def flux():
    return load_runtime("tiny", DEVICES)


def test_the_patch_layers_are_diffusers_own_outside_a_patch_decode(flux):
    plain = build_tiny_pipeline(PRESETS["tiny"]).vae  # the same seed: the same weights, diffusers' layers only
    latents = torch.randn(1, 16, 10, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(flux.vae_on(torch.device("cpu")).decode(latents, return_dict=False)[0],
                           plain.decode(latents, return_dict=False)[0])
    assert patch_vae.supported(flux.vae_on(torch.device("cpu"))) and not patch_vae.supported(plain)
    assert "patch_vae" in flux.parallel_methods


@pytest.mark.parametrize("degree", [2, 3, 4])
@pytest.mark.parametrize("width, height", [(48, 80), (64, 64), (32, 48)])
def test_patch_decode_equals_one_device(flux, degree, width, height):
    """Bands of unequal height (80 px: latent rows 10 = 4+3+3 at degree 3), at every degree."""
    p = flux.prepare(prompt="a red kite", width=width, height=height, seed=2)
    latent = torch.randn(p.noise.shape, generator=torch.Generator().manual_seed(width + height))
    whole = verify.patch_decode(flux, p, latent, DEVICES[:1])
    bands = verify.patch_decode(flux, p, latent, DEVICES[:degree], ops.CommCache(timeout_s=30.0))
    assert bands.shape == whole.shape == (1, 3, height, width)
    # float32: the statistics and convolutions summed per band, in another order (measured ~1e-6)
    torch.testing.assert_close(bands, whole, rtol=0, atol=5e-5)


def test_band_rows_cover_the_image_and_the_degree_fits_it():
    assert patch_vae.band_rows(10, 3) == (4, 3, 3) and sum(patch_vae.band_rows(257, 4)) == 257
    assert patch_vae.max_degree(8, 4) == 4 and patch_vae.max_degree(3, 4) == 2 and patch_vae.max_degree(1, 2) == 1


def test_rehearsal_predicts_every_exchange(flux):
    """The meta-device rehearsal (what a failed rank replays) is the real decode's exchange sequence."""
    vae = flux.vae_on(torch.device("cpu"))
    latents = torch.randn(1, 16, 10, 6)
    comm = ops.CommCache(timeout_s=30.0).get(("cpu:0", "cpu:1", "cpu:2"))
    rows = patch_vae.band_rows(10, 3)
    logs = [None] * 3

    def run(rank):
        context = patch_vae.PatchContext(comm, rank, 3, rows)
        start = sum(rows[:rank])
        with torch.no_grad(), patch_vae.patch_parallel(context):
            vae.decode(latents[:, :, start:start + rows[rank]], return_dict=False)
        logs[rank] = context.exchange_log

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in range(3):
        band = (1, 16, rows[rank], 6)
        assert patch_vae.rehearse(vae, band, torch.float32, rows, rank) == logs[rank]
    assert len(logs[0]) > 20  # a halo per 3x3 convolution, two per GroupNorm, one for the attention


def test_a_rank_failing_mid_decode_fails_the_decode_not_the_group(flux, monkeypatch):
    vae = flux.vae_on(torch.device("cpu"))
    latents = torch.randn(1, 16, 8, 8)
    comm = ops.CommCache(timeout_s=20.0).get(("cpu:0", "cpu:1"))
    calls = {"n": 0}
    real = patch_vae.PatchGroupNorm.forward

    def fails_on_rank_1(self, x):
        context = patch_vae.current_patch()
        if context is not None and context.rank == 1 and context.comm is not None:
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("out of memory (simulated)")
        return real(self, x)

    monkeypatch.setattr(patch_vae.PatchGroupNorm, "forward", fails_on_rank_1)
    results = [None, None]

    def run(rank):
        try:
            with torch.no_grad():
                results[rank] = patch_vae.decode_band(vae, latents, comm, rank, 2)
        except Exception as exc:
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert isinstance(results[1], RuntimeError) and "simulated" in str(results[1])
    assert isinstance(results[0], torch.Tensor)  # rank 0's exchanges completed: the caller votes it failed
    monkeypatch.setattr(patch_vae.PatchGroupNorm, "forward", real)
    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]  # the communicator still works
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(isinstance(r, torch.Tensor) for r in results)
