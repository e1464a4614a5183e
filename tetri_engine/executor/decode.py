"""Patch-parallel VAE decode in the executor (issue 16): the first `degree` ranks of a group decode one
request together, each a band of the image's rows (model/patch_vae.py), and rank 0 stitches the bands
into the image. Used by a steps job after its last step (`decode_degree` > 1) and by
`Executor.submit_decode` on several devices (`DecodeJob`).

Every rank of the job's `RankAgreement` takes part in the vote that ends a decode, so that ranks outside
the decode group (a group of 4 decoding on 2) stay in step with the others; a rank whose decode fails
has already replayed the exchanges it did not reach (`patch_vae.decode_band`), and the vote fails the
request on every rank alike.
"""
from __future__ import annotations

import threading
import time
import traceback
from concurrent.futures import Future
from typing import Any

import torch

from tetri_engine.executor.agreement import RankAgreement
from tetri_engine.executor.latents import encode_png
from tetri_engine.executor.options import StepEnv
from tetri_engine.executor.state import DenoiseState, describe_error
from tetri_engine.model.patch_vae import decode_band
from tetri_engine.model.runtime import torch_device


def decode_on_ranks(env: StepEnv, state: DenoiseState, device_indices: tuple[int, ...], degree: int, rank: int,
                    agreement: RankAgreement, comm: Any) -> tuple[Any, bytes] | None:
    """Rank `rank`'s part of the patch-parallel decode of `state` on device_indices[:degree] (every rank
    of `agreement` calls it at once). Rank 0 returns (PIL image, PNG bytes), or raises when some rank
    failed; the others return None."""
    error, band = None, None
    if rank < degree:
        name = env.devices[device_indices[rank]]
        try:
            latent = env.latents.whole_latent(state, name)  # (a few MB: the whole latent, on every rank)
            vae = env.runtime.vae_on(torch_device(name))
            latents = env.runtime.adapter.vae_latents(vae, latent, state.width, state.height)
            band = decode_band(vae, latents, comm, rank, degree).cpu()
        except Exception as exc:
            error = f"rank {rank} ({name}): {describe_error(exc)}"
            if env.log_errors:
                traceback.print_exc()
    votes = agreement.all_ranks(rank, (error, band))
    if rank != 0:
        return None
    errors = [e for e, _ in votes if e is not None]
    if errors:
        raise RuntimeError("; ".join(errors))
    image = env.runtime.adapter.to_image(torch.cat([b for _, b in votes[:degree]], dim=2))
    return image, encode_png(image)


class DecodeJob:
    """`Executor.submit_decode(request_id, device_indices)` with several devices: a patch-parallel decode
    of the request's current latent, after its earlier jobs and before its later ones."""

    def __init__(self, env: StepEnv, state: DenoiseState, device_indices: tuple[int, ...],
                 wait_for: threading.Event, release: threading.Event):
        self.env, self.state, self.device_indices = env, state, device_indices
        self.agreement = RankAgreement(len(device_indices))
        self.wait_for, self.release = wait_for, release
        self.future: Future = Future()
        self._comm: Any = None
        self._ready_error: str | None = None
        self._lock = threading.Lock()
        self._ranks_left = len(device_indices)

    def run(self, rank: int) -> None:
        try:
            if rank == 0:
                self.wait_for.wait()
                try:
                    if self.state.prepared is None:
                        raise RuntimeError(self.state.error or "the request has no prompt encoding")
                    self._comm = self.env.comm_cache.get(tuple(self.env.devices[i] for i in self.device_indices))
                except Exception as exc:
                    self._ready_error = describe_error(exc)
            self.agreement.meet(rank)
            if self._ready_error is not None:
                if rank == 0:
                    self.future.set_exception(RuntimeError(self._ready_error))
                return
            start = time.perf_counter()
            result = decode_on_ranks(self.env, self.state, self.device_indices, len(self.device_indices), rank,
                                     self.agreement, self._comm)
            if rank == 0:
                self.state.decode_s += time.perf_counter() - start
                self.future.set_result(result)
        except BaseException as exc:
            self.agreement.abort()
            if rank == 0 and not self.future.done():
                self.future.set_exception(exc)
        finally:
            with self._lock:
                self._ranks_left -= 1
                last = self._ranks_left == 0
            if last:
                if not self.future.done():  # (rank 0 raised before reporting)
                    self.future.set_exception(RuntimeError("the decode's ranks failed"))
                self.release.set()
