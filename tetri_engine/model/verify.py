"""Checking the sequence-parallel forward: one step's model output of a request at any group of
devices, computed the way the executor computes it (one thread per rank, the group's communicator),
then gathered. Used by the tests and by bench/runtime_check.py; not on the serving path."""
from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

from tetri_engine.model.adapter import PreparedRequest
from tetri_engine.model.runtime import ModelRuntime, torch_device
from tetri_engine.model.ulysses import SPContext, check_heads, sequence_parallel


def sp_velocity(runtime: ModelRuntime, prepared: PreparedRequest, devices: Sequence[str], comm_cache: Any = None,
                step_index: int = 0, latent: torch.Tensor | None = None) -> torch.Tensor:
    """The model output [1, L, C] for `latent` (default: the request's noise) at step `step_index`, on
    the group `devices` (degree len(devices)), gathered onto the CPU in float32."""
    from tetri_engine import ops

    degree = len(devices)
    check_heads(runtime.num_heads, degree)
    latent = prepared.noise if latent is None else latent
    shards = ops.shard(latent, degree, list(devices))
    comm = None
    if degree > 1:
        comm = (comm_cache if comm_cache is not None else ops.CommCache()).get(tuple(devices))
    outputs: list[torch.Tensor | None] = [None] * degree
    errors: list[BaseException] = []
    lengths = {"image": prepared.image_tokens, "text": prepared.text_tokens}

    def run(rank: int) -> None:
        device = torch_device(devices[rank])
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            with torch.no_grad(), sequence_parallel(SPContext(comm, rank, degree, lengths)):
                inputs = runtime.adapter.rank_inputs([prepared], device, rank, degree)
                outputs[rank] = runtime.adapter.velocity(
                    runtime.transformer_on(device), [shards[rank]], [prepared], [step_index], inputs)[0]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except BaseException as exc:  # re-raised on the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(degree)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return ops.gather(outputs, prepared.image_tokens, "cpu:0").float()
