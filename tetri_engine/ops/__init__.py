"""Python face of the native extension `tetri_engine._C`: latent shard/gather/regroup/pack,
communicators, and the native step loop of the executor's ranks (ops/step_loop.py). Thin on purpose:
the work and the argument checks are in csrc/.

Devices are strings: ``"cuda:N"`` is a GPU; ``"cpu:N"`` is a *virtual* device, always the host CPU
(torch device ``cpu``), whose index only says which executor thread / communicator rank owns a
shard. Importing this module loads the extension (and torch) but never initialises CUDA.

Sequence parallelism splits a request's latent ``x [B, L, C]`` (L tokens, image rows in order) into
k contiguous shards along dim 1, one per device of its group, in the order the group lists them.
Worked example: a 1024x1024 FLUX request has L = (1024/16) * (1024/16) = 4096 tokens.

* Round r, group ("cuda:2", "cuda:3") (k=2, shard_length 2048)::

      rank 0 = cuda:2 holds tokens [0, 2048)      rank 1 = cuda:3 holds tokens [2048, 4096)

* Round r+1, the scheduler widens it to ("cuda:0", "cuda:1", "cuda:2", "cuda:3") (k=4, 1024 each).
  ``regroup`` builds each new shard from the old shards that overlap it::

      cuda:0 <- tokens [0, 1024)     from cuda:2       cuda:2 <- tokens [2048, 3072) from cuda:3
      cuda:1 <- tokens [1024, 2048)  from cuda:2       cuda:3 <- tokens [3072, 4096) from cuda:3

  Listing the old devices first, ("cuda:2", "cuda:3", "cuda:0", "cuda:1"), would keep tokens
  [0, 1024) on cuda:2 but still copy it (its shard changed shape); only a shard whose token range
  *and* device stay the same (same k, same device at the same position) is not copied at all.

* Uneven lengths: L = 10 on k = 4 gives shard_length 3, shards hold tokens [0,3) [3,6) [6,9)
  [9,10) and the last two positions of shard 3 are zero padding; ``gather`` drops the padding.
  (L = 5 on k = 4: shard_length 2, shard 3 is all padding.)

The matching communicator comes from a `CommCache`: rank i of ``cache.get(group)`` is ``group[i]``,
the device that holds shard i. Each rank's thread calls every collective with its own rank.

Typical use by an executor thread::

    comm = cache.get(("cuda:0", "cuda:1"))       # created on first use, then a cache hit
    rank = comm.rank_of("cuda:1")                # 1
    out = comm.all_to_all(rank, qkv)             # qkv: [k * c, ...] on cuda:1; the GIL is released
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    from tetri_engine import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "tetri_engine._C (the native extension) is not built or does not match this torch: "
        "run `pip install --no-build-isolation -e .` in the repository (see setup.py)"
    ) from exc

__all__ = [
    "CommCache",
    "CommTimeoutError",
    "Communicator",
    "DeviceQueue",
    "GroupAbortedError",
    "SegmentSpec",
    "StepGroup",
    "StopFlag",
    "backend_info",
    "gather",
    "pack",
    "regroup",
    "regroup_bytes_moved",
    "run_segment",
    "shard",
    "shard_length",
    "shard_range",
    "step_verdict",
    "unpack",
]

from tetri_engine.ops.step_loop import (  # noqa: E402  (the native step loop: ops/step_loop.py)
    DeviceQueue, GroupAbortedError, SegmentSpec, StepGroup, StopFlag, run_segment, step_verdict)

Device = str | torch.device

CommCache = _C.CommCache
CommCache.__doc__ = """One communicator per ordered device tuple, created once and reused.

``CommCache(capacity=64, timeout_s=60.0)``. ``timeout_s`` bounds how long a thread-communicator
rank waits for the others (it then raises `CommTimeoutError`); NCCL collectives do not time out.

* ``get(devices) -> Communicator``: the cached communicator for that tuple (order matters: rank i
  is devices[i]), or a new one (thread backend for "cpu:N" groups, NCCL for "cuda:N" groups).
  Concurrent gets of one tuple create it once. Releases the GIL.
* ``warmup(groups)``: get each group now (e.g. every group the scheduler may pick), so that the
  first round does not pay NCCL initialisation.
* ``stats() -> {"created", "hits", "misses", "evicted", "creation_s", "size", "capacity"}``.
* ``group in cache``, ``len(cache)``, ``clear()``.

Past ``capacity`` entries the least recently used communicator that is not inside a collective is
dropped from the cache; it is destroyed once nothing uses it any more (no Python reference, no
running collective), never under a running exchange.
"""
Communicator = _C.Communicator
Communicator.__doc__ = """A communicator over an ordered device tuple (from `CommCache.get`).

``size``, ``devices`` (tuple of names, rank order), ``backend`` ("thread" or "nccl"),
``rank_of(device)`` (ValueError if not a member). Collectives: every rank's thread calls with its
own rank, in the same order on every rank; all release the GIL while they wait.

* ``all_to_all(rank, x)``: x is split into `size` equal chunks along dim 0; chunk j goes to rank j;
  chunk j of the result came from rank j (the Ulysses exchange: put heads on dim 0).
* ``all_gather(rank, x)``: every rank's x concatenated along dim 0, in rank order.
* ``broadcast(rank, x, root=0)``: root's x on every rank (root gets its own x back; others get new
  tensors). Every rank passes a tensor of root's shape and dtype.
* ``barrier(rank)``: returns once every rank has called it (NCCL: also waits for this rank's
  current stream).

Every rank passes the same shape and dtype. The thread backend takes CPU tensors, the NCCL backend
tensors on the rank's own GPU (results are queued on that GPU's current torch stream). A thread
rank that waits longer than the cache's timeout_s raises `CommTimeoutError`.
"""
CommTimeoutError = _C.CommTimeoutError
CommTimeoutError.__doc__ = "A participant of a collective did not arrive within timeout_s (a RuntimeError)."


def _name(device: Device) -> str:
    return str(device)


def shard_length(length: int, k: int) -> int:
    """Tokens per shard, padding included: ceil(length / k)."""
    return _C.shard_length(length, k)


def shard_range(length: int, k: int, index: int) -> tuple[int, int]:
    """Token range [start, stop) of the latent that shard `index` of `k` holds (padding excluded)."""
    if not 0 <= index < k:
        raise ValueError(f"shard index {index} is out of range for k={k}")
    size = shard_length(length, k)
    start = min(index * size, length)
    return start, min(start + size, length)


def shard(x: torch.Tensor, k: int, devices: Sequence[Device] | None = None) -> list[torch.Tensor]:
    """Split ``x [B, L, ...]`` into k new contiguous shards ``[B, shard_length(L, k), ...]``.

    Shard i holds tokens ``shard_range(L, k, i)`` and zeros after them, on ``devices[i]``
    (default: x's device). Always new memory.
    """
    names = None if devices is None else [_name(d) for d in devices]
    return _C.shard(x, k, names)


def gather(shards: Sequence[torch.Tensor], length: int, device: Device | None = None) -> torch.Tensor:
    """The latent ``[B, length, ...]`` from its shards (in order), padding dropped; new memory on
    `device` (default: the first shard's device)."""
    return _C.gather(list(shards), length, None if device is None else _name(device))


def regroup(shards: Sequence[torch.Tensor], length: int, new_devices: Sequence[Device]) -> list[torch.Tensor]:
    """Move a latent's shards onto ``new_devices`` (k1 -> k2 shards, or the same k elsewhere).

    Each new shard is copied straight from the old shards that overlap it (peer copies between
    GPUs); a shard that keeps its token range and its device is returned as is, so treat the input
    list as consumed. Regrouping to the same devices costs nothing.
    """
    return _C.regroup(list(shards), length, [_name(d) for d in new_devices])


def regroup_bytes_moved(shards: Sequence[torch.Tensor], length: int, new_devices: Sequence[Device]) -> int:
    """Bytes `regroup` would copy for these arguments (shards reused as they are cost 0)."""
    return _C.regroup_bytes_moved(list(shards), length, [_name(d) for d in new_devices])


def pack(latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """Same-shape latents on one device -> one batch, concatenated along dim 0 (new memory)."""
    return _C.pack(list(latents))


def unpack(batch: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The batch split back into n equal parts along dim 0 (views into the batch, no copy)."""
    return _C.unpack(batch, n)


def backend_info() -> dict:
    """How the extension was built: {"build": "cuda" | "cpu", "nccl_version": str | None,
    "torch": torch version, "torch_cuda": torch's CUDA version or None}. Does not initialise CUDA."""
    cuda = _C.built_with_cuda()
    return {
        "build": "cuda" if cuda else "cpu",
        "nccl_version": _C.nccl_version() if cuda else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
