"""Where a request's tensors live, and how they move without waiting for other groups' work.

`LatentPlacer` puts a request's latent on a group (the seeded noise sharded, or the shards regrouped),
gathers it for a decode or a preview, and keeps the prompt embeddings off the encode device.

Why this is careful about streams (issue 21, bench/RESULTS.md): torch runs a copy that reads a GPU on
that GPU's *current stream of the calling thread*, the legacy default stream unless the thread chose
another, which is the stream the device's own executor thread queues its steps on. A rank on GPU 1
that copied a tensor from GPU 0 (the prompt embeddings, made on the encode device; a latent moving
from a group on GPU 0) therefore waited for every step another group had queued on GPU 0: ~1.2 s
beside a 2048^2 group. So:
  - prompt embeddings go to host memory once encoded (`conditioning_to_host`); a rank copies them from
    the host on its own device's stream (`PreparedRequest.on`);
  - a copy that reads a device outside the destination group runs on a stream of the calling thread's
    own (`reading_from`), and the thread waits for it before the sources may be freed. That is sound
    because what is read is complete: every steps call synchronises its devices before it hands its
    requests back, and a request's jobs run one after the other.
"""
from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from tetri_engine import ops
from tetri_engine.executor.state import DenoiseState
from tetri_engine.model.runtime import torch_device

_local = threading.local()  # per thread: device index -> the thread's own stream for reads


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    # Level 1: PNG compression of a 2048x2048 image at the default level costs more than its decode.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def conditioning_to_host(prepared: Any) -> None:
    """Move a request's prompt embeddings (made on the encode device) to host memory, once, on the
    calling thread's current stream (the encoder's own), which the copy waits for."""
    prepared.cond = {name: t.to("cpu") for name, t in prepared.cond.items()}
    prepared.drop_device_copies()


def _own_stream(index: int) -> torch.cuda.Stream:
    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    if index not in streams:
        streams[index] = torch.cuda.Stream(torch.device("cuda", index))  # a pool stream: non-blocking
    return streams[index]


@contextlib.contextmanager
def reading_from(sources: Iterable[torch.device], targets: Iterable[torch.device] = (),
                 enabled: bool = True) -> Iterator[None]:
    """Copies made inside that read a GPU in `sources` but not in `targets` run on a stream of this
    thread's own, so they wait for nothing another thread queued on that GPU; on exit this thread waits
    for them. The data read must be complete (see the module docstring). Destinations are allocated on
    the targets' usual streams (targets keep theirs). CPU devices, or enabled=False: nothing changes."""
    indices = sorted({d.index for d in sources if d.type == "cuda"} - {d.index for d in targets if d.type == "cuda"})
    if not enabled or not indices:
        yield
        return
    streams = [_own_stream(i) for i in indices]
    try:
        with contextlib.ExitStack() as stack:
            for stream in streams:
                stack.enter_context(torch.cuda.stream(stream))
            yield
    finally:
        for stream in streams:  # before the caller may drop the sources
            stream.synchronize()


class LatentPlacer:
    """Moves requests' latents between groups of `devices` (names) of `runtime`, and gathers them."""

    def __init__(self, runtime: Any, devices: Sequence[str], private_reads: bool = True):
        self.runtime = runtime
        self.devices = list(devices)
        self.private_reads = private_reads

    def place(self, state: DenoiseState, device_indices: tuple[int, ...]) -> bool:
        """Put the request's latent (and its step cache) on these devices, rank order -> whether it moved
        from another group (a regroup; its first placement is not one). Raises if the move fails."""
        names = [self.devices[i] for i in device_indices]
        regrouped = state.shards is not None
        if state.shards is None:  # first steps: shard the seeded noise (host memory)
            state.shards = ops.shard(state.prepared.noise, len(names), names)
            if state.cache is not None:
                state.cache.place(names, state.prepared.image_tokens)
        else:
            with reading_from([s.device for s in state.shards], [torch_device(n) for n in names], self.private_reads):
                state.shards = ops.regroup(state.shards, state.prepared.image_tokens, names)
                if state.cache is not None:  # the cached residuals are sharded like the latent: they move with it
                    state.cache.place(names, state.prepared.image_tokens)
            state.regroups += 1
            state.prepared.drop_device_copies()  # the prompt embeddings follow on first use
        state.placement = tuple(device_indices)
        return regrouped

    def whole_latent(self, state: DenoiseState, device: str) -> torch.Tensor:
        """A request's whole latent [1, L, C] on `device` (a new tensor)."""
        target = torch_device(device)
        if state.shards is None:  # no steps run: the noise itself
            return state.prepared.noise.to(target, copy=True)
        with reading_from([s.device for s in state.shards], [target], self.private_reads):
            return ops.gather(state.shards, state.prepared.image_tokens, device)

    def decode(self, state: DenoiseState, device_index: int) -> tuple[Any, bytes]:
        """Gather a request's latent onto a device and decode it there -> (PIL image, PNG bytes)."""
        latent = self.whole_latent(state, self.devices[device_index])
        image = self.runtime.decode(latent, state.width, state.height)
        return image, encode_png(image)

    def preview(self, state: DenoiseState) -> Any:
        """`runtime.preview` of the request's latent, gathered into host memory."""
        return self.runtime.preview(self.whole_latent(state, "cpu:0"), state.width, state.height)
