"""Checking the parallel forward and decode: one step's model output of a request at any group of devices
and parallel layout, computed the way the executor computes it (one thread per rank, the group's
communicators), then gathered; and a patch-parallel decode, stitched. Used by the tests and by
bench/runtime_check.py; not on the serving path."""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch

from tetri_engine.model.adapter import PreparedRequest
from tetri_engine.model.runtime import ModelRuntime, torch_device
from tetri_engine.model.ulysses import SPContext, check_heads, sequence_parallel


def layout_contexts(devices: Sequence[str], cfg: int, lengths: dict[str, int], comm_cache: Any) -> list[SPContext]:
    """The SPContext of each rank of a group of `devices` in the layout cfg x (len(devices) / cfg):
    branch c on devices[c * sp:(c + 1) * sp], its rank j's twin in branch c' is devices[c' * sp + j]."""
    from tetri_engine import ops

    sp = len(devices) // cfg
    cache = comm_cache if comm_cache is not None else ops.CommCache()
    contexts = []
    for rank in range(len(devices)):
        branch, j = divmod(rank, sp)
        comm = cache.get(tuple(devices[branch * sp:(branch + 1) * sp])) if sp > 1 else None
        twins = cache.get(tuple(devices[c * sp + j] for c in range(cfg))) if cfg > 1 else None
        contexts.append(SPContext(comm, j, sp, lengths, cfg_comm=twins, cfg_rank=branch, cfg_degree=cfg))
    return contexts


def on_ranks(devices: Sequence[str], work: Callable[[int, torch.device], Any]) -> list[Any]:
    """work(rank, device) on one thread per rank, at once -> the results in rank order (the first
    error is raised on the caller's thread)."""
    results: list[Any] = [None] * len(devices)
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        device = torch_device(devices[rank])
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            with torch.no_grad():
                results[rank] = work(rank, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except BaseException as exc:  # re-raised on the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(len(devices))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def sp_velocity(runtime: ModelRuntime, prepared: PreparedRequest, devices: Sequence[str], comm_cache: Any = None,
                step_index: int = 0, latent: torch.Tensor | None = None, *, cfg: int = 1,
                branches: bool = False) -> torch.Tensor:
    """The model output [1, L, C] for `latent` (default: the request's noise) at step `step_index`, on
    the group `devices` in the layout cfg x sp (sp = len(devices) / cfg; cfg 2 needs true CFG), gathered
    onto the CPU in float32. branches: the rows before the guidance ([rows, L, C]: [uncond, cond] with
    true CFG), so that degrees can be compared without the guidance scale amplifying their rounding."""
    from tetri_engine import ops

    sp = len(devices) // cfg
    check_heads(runtime.num_heads, sp)
    if cfg > 1 and not runtime.adapter.cfg_parallel(prepared):
        raise ValueError("a CFG-parallel layout needs a request with true classifier-free guidance")
    latent = prepared.noise if latent is None else latent
    shards = ops.shard(latent, sp, list(devices[:sp]))
    contexts = layout_contexts(devices, cfg, {"image": prepared.image_tokens, "text": prepared.text_tokens},
                               comm_cache)

    def work(rank: int, device: torch.device) -> torch.Tensor:
        context = contexts[rank]
        with sequence_parallel(context):
            inputs = runtime.adapter.rank_inputs([prepared], device, context.rank, sp, context.branch)
            shard = shards[context.rank].to(device)
            transformer = runtime.transformer_on(device)
            if branches:
                return runtime.adapter.model_output(transformer, [shard], [prepared], [step_index], inputs)
            return runtime.adapter.velocity(transformer, [shard], [prepared], [step_index], inputs)[0]

    outputs = on_ranks(devices, work)[:sp]  # (the other branches' ranks hold the same)
    return ops.gather(outputs, prepared.image_tokens, "cpu:0").float()


def patch_decode(runtime: ModelRuntime, prepared: PreparedRequest, latent: torch.Tensor, devices: Sequence[str],
                 comm_cache: Any = None) -> torch.Tensor:
    """The VAE output [1, 3, H, W] of the packed latent [1, L, C], decoded patch-parallel on `devices`
    (one band of rows each) and stitched on the CPU in float32."""
    from tetri_engine import ops
    from tetri_engine.model.patch_vae import decode_band

    comm = (comm_cache if comm_cache is not None else ops.CommCache()).get(tuple(devices)) if len(devices) > 1 else None

    def work(rank: int, device: torch.device) -> torch.Tensor:
        vae = runtime.vae_on(device)
        latents = runtime.adapter.vae_latents(vae, latent.to(device), prepared.width, prepared.height)
        return decode_band(vae, latents, comm, rank, len(devices)).float().cpu()

    return torch.cat(on_ranks(devices, work), dim=2)
