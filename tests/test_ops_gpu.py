"""The ops on real GPUs: CUDA kernels (shard, pack), peer copies between GPUs (regroup) and the NCCL
communicator driven from one thread per GPU. Marked gpu / multi_gpu: skipped without GPUs
(tests/conftest.py). Run on the lent GPU machine with the CUDA build of the extension."""
from __future__ import annotations

import itertools

import pytest
import torch

from tetri_engine import ops

from rank_threads import run_ranks

LENGTHS = (1, 5, 10, 256, 4096)


def ref_shard(x: torch.Tensor, k: int) -> list[torch.Tensor]:
    length = x.shape[1]
    size = -(-length // k)
    pad = torch.zeros(x.shape[0], size * k - length, *x.shape[2:], dtype=x.dtype)
    return list(torch.cat([x, pad], dim=1).split(size, dim=1))


def make_latent(length, batch=1, channels=64, dtype=torch.bfloat16):
    return torch.randn(batch, length, channels).to(dtype)


def run_threads(fn, n: int, join_s: float = 120.0) -> list:
    """fn(rank) on one thread per rank; fails (instead of hanging) if a thread is stuck."""
    return run_ranks(fn, range(n), join_s)


@pytest.mark.gpu
def test_cuda_build():
    info = ops.backend_info()
    assert info["build"] == "cuda", "the extension was built without CUDA: rebuild on this machine (setup.py)"
    assert info["nccl_version"]


@pytest.mark.gpu
@pytest.mark.parametrize("k", (1, 2, 4))
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("channels,dtype", [(64, torch.bfloat16), (3, torch.bfloat16), (5, torch.uint8)])
def test_shard_kernel_on_one_gpu(k, length, channels, dtype):
    # Channel counts chosen so that the kernel copies in 16-, 2- and 1-byte units.
    x_cpu = (torch.rand(2, length, channels) * 100).to(dtype)
    x = x_cpu.to("cuda:0")
    shards = ops.shard(x, k)
    torch.cuda.synchronize()
    for got, want in zip(shards, ref_shard(x_cpu, k)):
        assert got.device == x.device and got.is_contiguous()
        assert torch.equal(got.cpu(), want)
    assert torch.equal(ops.gather(shards, length).cpu(), x_cpu)
    assert torch.equal(ops.gather(shards, length, device="cpu:0"), x_cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("n", (1, 3, 16, 17))
def test_pack_kernel_on_one_gpu(n):
    latents = [make_latent(100, channels=3).to("cuda:0") for _ in range(n)]
    batch = ops.pack(latents)
    assert torch.equal(batch.cpu(), torch.cat([t.cpu() for t in latents]))
    for a, b in zip(ops.unpack(batch, n), latents):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_shard_kernel_runs_on_the_current_stream():
    x = make_latent(4096).to("cuda:0")
    stream = torch.cuda.Stream("cuda:0")
    with torch.cuda.stream(stream):
        y = x * 2  # queued on `stream`; shard must be ordered after it
        shards = ops.shard(y, 4)
    stream.synchronize()
    assert torch.equal(ops.gather(shards, 4096).cpu(), (x * 2).cpu())


@pytest.mark.multi_gpu
@pytest.mark.parametrize("k_old,k_new", list(itertools.product((1, 2, 4), (1, 2, 4))))
def test_regroup_across_two_gpus(k_old, k_new):
    gpus = ["cuda:0", "cuda:1"]
    length = 4096 + 3  # uneven on purpose
    x_cpu = make_latent(length)
    old_devices = [gpus[i % 2] for i in range(k_old)]
    new_devices = [gpus[(i + 1) % 2] for i in range(k_new)]  # every shard changes GPU
    old = ops.shard(x_cpu.to("cuda:0"), k_old, old_devices)
    new = ops.regroup(old, length, new_devices)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    for got, dev, want in zip(new, new_devices, ref_shard(x_cpu, k_new)):
        assert str(got.device) == dev
        assert torch.equal(got.cpu(), want)
    assert torch.equal(ops.gather(new, length, device="cuda:0").cpu(), x_cpu)


@pytest.mark.multi_gpu
def test_regroup_moves_only_what_must_move():
    x = make_latent(4096).to("cuda:0")
    shards = ops.shard(x, 2, ["cuda:0", "cuda:1"])
    same = ops.regroup(shards, 4096, ["cuda:0", "cuda:1"])
    assert all(a is b for a, b in zip(same, shards))
    assert ops.regroup_bytes_moved(shards, 4096, ["cuda:0", "cuda:1"]) == 0
    swapped = ["cuda:1", "cuda:0"]
    assert ops.regroup_bytes_moved(shards, 4096, swapped) == x.numel() * x.element_size()
    back = ops.regroup(ops.regroup(shards, 4096, swapped), 4096, ["cuda:0", "cuda:1"])
    assert torch.equal(ops.gather(back, 4096), x)


@pytest.fixture
def nccl_pair():
    cache = ops.CommCache(capacity=8)
    return cache, cache.get(("cuda:0", "cuda:1"))


@pytest.mark.multi_gpu
def test_nccl_cache_reuse(nccl_pair):
    cache, comm = nccl_pair
    assert comm.backend == "nccl" and comm.size == 2 and comm.devices == ("cuda:0", "cuda:1")
    assert cache.get(["cuda:0", "cuda:1"]) is comm
    other = cache.get(("cuda:1", "cuda:0"))
    assert other is not comm and other.rank_of("cuda:1") == 0
    s = cache.stats()
    assert s["created"] == 2 and s["hits"] == 1 and s["creation_s"] > 0


@pytest.mark.multi_gpu
@pytest.mark.parametrize("nbytes", (2 * 2 * 64, 4_194_304, 67_108_864))  # >= 2 rows: one per rank
def test_nccl_all_to_all_from_two_threads_does_not_deadlock(nccl_pair, nbytes):
    """Two threads in one NCCL exchange: only works if the binding releases the GIL."""
    _, comm = nccl_pair
    rows = nbytes // 2 // 64  # bf16, 64 columns

    def body(rank):
        dev = f"cuda:{rank}"
        outs = []
        for step in range(10):
            x = torch.full((rows, 64), float(100 * rank + step), dtype=torch.bfloat16, device=dev)
            outs.append(comm.all_to_all(rank, x))
        torch.cuda.synchronize(dev)
        return [o.float().cpu() for o in outs]

    results = run_threads(body, 2)
    half = rows // 2
    for rank, outs in enumerate(results):
        for step, out in enumerate(outs):
            assert torch.all(out[:half] == float(0 + step)), (rank, step)  # chunk from rank 0
            assert torch.all(out[half:] == float(100 + step)), (rank, step)  # chunk from rank 1


@pytest.mark.multi_gpu
def test_nccl_all_to_all_ulysses_layout(nccl_pair):
    _, comm = nccl_pair
    heads, tokens, head_dim = 24, 4096 + 512, 128  # FLUX-dev attention, 1024x1024 + text
    full = torch.randn(heads, tokens, head_dim, dtype=torch.bfloat16)
    local = full.chunk(2, dim=1)

    def body(rank):
        out = comm.all_to_all(rank, local[rank].to(f"cuda:{rank}"))
        return out.cpu()

    for rank, out in enumerate(run_threads(body, 2)):
        assert torch.equal(torch.cat(out.chunk(2, dim=0), dim=1), full.chunk(2, dim=0)[rank])


@pytest.mark.multi_gpu
def test_nccl_all_gather_broadcast_barrier(nccl_pair):
    _, comm = nccl_pair

    def body(rank):
        dev = f"cuda:{rank}"
        gathered = comm.all_gather(rank, torch.full((3, 2), float(rank), device=dev))
        mine = torch.full((4,), 7.0 if rank == 1 else -1.0, device=dev)
        got = comm.broadcast(rank, mine, root=1)
        comm.barrier(rank)
        return gathered.cpu(), got.cpu(), got.data_ptr() == mine.data_ptr()

    for rank, (gathered, got, same_memory) in enumerate(run_threads(body, 2)):
        assert torch.equal(gathered, torch.cat([torch.zeros(3, 2), torch.ones(3, 2)]))
        assert torch.equal(got, torch.full((4,), 7.0))
        assert same_memory == (rank == 1)


@pytest.mark.multi_gpu
def test_nccl_on_side_streams(nccl_pair):
    _, comm = nccl_pair

    def body(rank):
        dev = f"cuda:{rank}"
        stream = torch.cuda.Stream(dev)
        with torch.cuda.stream(stream):
            x = torch.arange(8, dtype=torch.float32, device=dev) + 10 * rank
            out = comm.all_to_all(rank, x * 1)
        stream.synchronize()
        return out.cpu()

    a, b = run_threads(body, 2)
    assert torch.equal(a, torch.tensor([0.0, 1, 2, 3, 10, 11, 12, 13]))
    assert torch.equal(b, torch.tensor([4.0, 5, 6, 7, 14, 15, 16, 17]))


@pytest.mark.multi_gpu
def test_nccl_argument_errors(nccl_pair):
    _, comm = nccl_pair
    with pytest.raises(ValueError, match="runs on cuda:0 but x is"):
        comm.all_gather(0, torch.zeros(2, device="cuda:1"))
    with pytest.raises(ValueError, match="runs on cuda:1 but x is"):
        comm.all_gather(1, torch.zeros(2))
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        comm.barrier(2)
    with pytest.raises(ValueError, match="not divisible by the group size 2"):
        comm.all_to_all(0, torch.zeros(3, device="cuda:0"))
    cache = ops.CommCache()
    with pytest.raises(ValueError, match="does not exist"):
        cache.get(("cuda:0", f"cuda:{torch.cuda.device_count()}"))
