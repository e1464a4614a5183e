"""Latent shard / gather / regroup / pack on virtual CPU devices, against a plain PyTorch reference."""
from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

from tetri_engine import ops

DEGREES = (1, 2, 4)
DEVICES = ("cpu:0", "cpu:1", "cpu:2", "cpu:3")
# Even, uneven, shorter than k, and a FLUX 256x256 latent (16*16 tokens).
LENGTHS = (1, 3, 5, 10, 16, 256)


def ref_shard(x: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Reference: pad the token dim with zeros to k * ceil(L/k), then split it evenly."""
    length = x.shape[1]
    size = -(-length // k)
    pad = torch.zeros(x.shape[0], size * k - length, *x.shape[2:], dtype=x.dtype)
    return list(torch.cat([x, pad], dim=1).split(size, dim=1))


def ref_gather(shards: list[torch.Tensor], length: int) -> torch.Tensor:
    return torch.cat(shards, dim=1)[:, :length]


def make_latent(length: int, batch: int = 2, channels: int = 3, dtype=torch.float32) -> torch.Tensor:
    # Distinct values everywhere, so a token copied to the wrong place cannot go unnoticed.
    return (torch.arange(batch * length * channels, dtype=torch.float32) + 1).reshape(batch, length, channels).to(dtype)


def assert_shards_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert g.is_contiguous()
        assert torch.equal(g, w)


@pytest.mark.parametrize("k", DEGREES)
@pytest.mark.parametrize("length", LENGTHS)
def test_shard_matches_reference_and_gathers_back(k, length):
    x = make_latent(length)
    shards = ops.shard(x, k, DEVICES[:k])
    assert_shards_equal(shards, ref_shard(x, k))
    assert ops.shard_length(length, k) == shards[0].shape[1]
    back = ops.gather(shards, length)
    assert torch.equal(back, x)
    assert back.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.int64))
def test_shard_gather_other_dtypes_and_ranks(dtype):
    x = make_latent(10, batch=1, channels=64, dtype=dtype)
    shards = ops.shard(x, 4)
    assert_shards_equal(shards, ref_shard(x, 4))
    assert torch.equal(ops.gather(shards, 10), x)
    # More than 3 dims: tokens stay on dim 1.
    y = torch.randn(2, 7, 3, 5).to(dtype)
    assert torch.equal(ops.gather(ops.shard(y, 2), 7), y)


def test_shard_of_non_contiguous_input():
    x = make_latent(10, batch=2, channels=4).transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous()
    assert_shards_equal(ops.shard(x, 4), ref_shard(x.contiguous(), 4))


def test_shard_range_covers_the_latent_once():
    for length, k in itertools.product(LENGTHS, DEGREES):
        ranges = [ops.shard_range(length, k, i) for i in range(k)]
        covered = [t for start, stop in ranges for t in range(start, stop)]
        assert covered == list(range(length))
    assert ops.shard_range(10, 4, 3) == (9, 10)
    assert ops.shard_range(5, 4, 3) == (5, 5)


@pytest.mark.parametrize("k_old,k_new", list(itertools.product(DEGREES, DEGREES)))
@pytest.mark.parametrize("length", (5, 10, 256))
def test_regroup_every_pair_of_degrees(k_old, k_new, length):
    x = make_latent(length)
    old = ops.shard(x, k_old, DEVICES[:k_old])
    new = ops.regroup(old, length, DEVICES[4 - k_new:])
    assert_shards_equal(new, ref_shard(x, k_new))
    assert torch.equal(ops.gather(new, length), x)
    moved = ops.regroup_bytes_moved(old, length, DEVICES[4 - k_new:])
    if k_old == k_new:
        # Virtual CPU devices share one memory: same ranges, nothing to move.
        assert all(n is o for n, o in zip(new, old))
        assert moved == 0
    else:
        assert moved == x.numel() * x.element_size()


def test_regroup_same_group_is_free_and_a_chain_of_regroups_is_exact():
    x = make_latent(10)
    shards = ops.shard(x, 2, DEVICES[:2])
    same = ops.regroup(shards, 10, DEVICES[:2])
    assert all(a is b for a, b in zip(same, shards))
    for group in [DEVICES, DEVICES[:1], DEVICES[2:], DEVICES[1:2], DEVICES]:
        shards = ops.regroup(shards, 10, group)
        assert_shards_equal(shards, ref_shard(x, len(group)))


def test_regroup_zeroes_padding_of_moved_shards():
    x = make_latent(5)
    shards = ops.shard(x, 2)  # [0,3) and [3,5) + 1 padding
    shards[1][:, 2:] = 99.0  # a model may leave junk in padding positions
    four = ops.regroup(shards, 5, DEVICES)
    assert_shards_equal(four, ref_shard(x, 4))


def test_pack_unpack_round_trip():
    latents = [make_latent(10, batch=1) * (i + 1) for i in range(3)]
    batch = ops.pack(latents)
    assert torch.equal(batch, torch.cat(latents, dim=0))
    back = ops.unpack(batch, 3)
    assert len(back) == 3
    for a, b in zip(back, latents):
        assert torch.equal(a, b)
    # Batched requests may each have B > 1.
    assert ops.unpack(ops.pack([make_latent(4), make_latent(4)]), 2)[1].shape == (2, 4, 3)


def test_bad_arguments_raise_clear_errors():
    x = make_latent(10)
    with pytest.raises(ValueError, match="k must be >= 1"):
        ops.shard(x, 0)
    with pytest.raises(ValueError, match=r"\[B, L, \.\.\.\]"):
        ops.shard(torch.zeros(10), 2)
    with pytest.raises(ValueError, match="give one device per shard"):
        ops.shard(x, 4, DEVICES[:2])
    with pytest.raises(ValueError, match="unknown device 'tpu:0'"):
        ops.shard(x, 1, ["tpu:0"])
    with pytest.raises(ValueError, match="needs an index"):
        ops.shard(x, 1, ["cuda"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cannot use CUDA"):
            ops.shard(x, 1, ["cuda:0"])
    shards = ops.shard(x, 4)
    with pytest.raises(ValueError, match="ceil\\(length / k\\) = 2"):
        ops.gather(shards, 5)
    with pytest.raises(ValueError, match="ceil"):
        ops.gather(shards[:3], 10)  # a shard missing
    with pytest.raises(ValueError, match=r"shards\[2\] is .* same shape and dtype"):
        ops.gather([shards[0], shards[1], shards[2].double(), shards[3]], 10)
    with pytest.raises(ValueError, match="shards is empty"):
        ops.regroup([], 10, DEVICES)
    with pytest.raises(ValueError, match="new_devices is empty"):
        ops.regroup(shards, 10, [])
    with pytest.raises(ValueError, match="same shape and dtype"):
        ops.pack([make_latent(4), make_latent(5)])
    with pytest.raises(ValueError, match="at least one latent"):
        ops.pack([])
    with pytest.raises(ValueError, match="do not split into 4 equal parts"):
        ops.unpack(torch.zeros(6, 2, 2), 4)
    with pytest.raises(ValueError, match="out of range"):
        ops.shard_range(10, 2, 2)


def test_import_does_not_initialise_cuda():
    code = (
        "import torch, tetri_engine, tetri_engine.ops as ops\n"
        "ops.backend_info(); ops.shard(torch.zeros(1, 4, 2), 2)\n"
        "ops.CommCache().get(('cpu:0', 'cpu:1'))\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialised'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_backend_info_says_how_it_was_built():
    info = ops.backend_info()
    assert info["build"] in ("cpu", "cuda")
    assert (info["nccl_version"] is None) == (info["build"] == "cpu")
    assert info["torch"] == torch.__version__
