"""One `submit_steps` call: a group of ranks (one per device, each on its device's worker thread) running
`num_steps` sequence-parallel steps of one or more same-shape requests.

Phases of a job, on every rank:

    1. rank 0 waits for earlier work on the requests, puts their latents on the group in its layout
       (`LatentPlacer.place`: shard or regroup; `cfg` guidance branches side by side), and fetches the
       group's communicators; each rank fuses the requests' LoRA adapter set into its device's weights when
       adapters are served (adapters.py); then all ranks meet (the job's `RankAgreement`, the one place where
       its ranks meet) and agree on whether every rank's adapters are in place.
    2. the steps (`RankRunner`, runner.py): batch after batch, each batch's steps run by the native loop
       (or its Python twin), one graph launch or one eager forward per step, every step agreed by the
       ranks: a failing step fails its requests only (a batch is retried one request at a time), the
       ranks never diverge (a rank that fails mid-forward catches up on the exchanges; ranks that still
       disagree fail the whole batch and stop exchanging), cancellation (`Executor.cancel`) takes effect
       at a step boundary, the same one on every rank (rank 0 reads the flags when it reports).
    3. wait for the devices; the finished requests are decoded when asked (one at a time): by rank 0, or
       patch-parallel by the first `decode_degree` ranks (executor/decode.py).

The last rank to finish resolves the future and hands the requests back (`DenoiseState.idle`). The job
knows its executor only through a `StepEnv` (options.py): no reference back to the Executor.
"""
from __future__ import annotations

import threading
import time
import traceback
from concurrent.futures import Future
from typing import Callable

import torch

from tetri_engine import ops
from tetri_engine.executor.agreement import RankAgreement
from tetri_engine.executor.decode import decode_on_ranks
from tetri_engine.executor.options import StepEnv
from tetri_engine.executor.runner import GroupJob, RankOutcome, RankRunner
from tetri_engine.executor.state import DenoiseState, RequestStepResult, StepsResult, describe_error


class StepsJob:
    def __init__(self, env: StepEnv, states: list[DenoiseState], device_indices: tuple[int, ...],
                 num_steps: int, on_step: Callable[[str, int], None] | None, decode_after: bool,
                 wait_for: list[threading.Event], release: list[threading.Event], *, cfg: int = 1,
                 decode_degree: int = 1):
        self.env = env
        self.all_states = list(states)  # every request of the call (results)
        self.group = GroupJob(env, device_indices, num_steps, on_step, RankAgreement(len(device_indices)),
                              states=list(states), cfg=cfg)  # phase 1 drops the requests that cannot run
        self.device_indices = device_indices
        self.degree = len(device_indices)
        self.lora = states[0].lora if states else ()  # the job's adapter set (one per job: submit_steps checks)
        self.lora_s = 0.0  # the slowest rank's adapter switch
        self.decode_after = decode_after
        self.decode_degree = decode_degree
        self.decode_comm = None  # the first decode_degree devices' communicator (phase 1, when > 1)
        self.wait_for = wait_for
        self.release = release
        self.future: Future[StepsResult] = Future()
        self._lock = threading.Lock()
        self._ranks_left = self.degree
        # Written by rank 0 in phase 1.
        self.regrouped: dict[str, bool] = {}
        self.regroup_s = 0.0
        self.job_error: str | None = None  # the whole job failed (requests that cannot be batched, ...)
        # Results: rank 0's outcome (identical on every rank), what phase 1 and 3 decided.
        self.outcome: RankOutcome | None = None
        self.errors: dict[str, str] = {}
        self.cancelled: set[str] = set()  # stopped early by a cancel (results say "cancelled")
        self.peak_memory = [0] * self.degree
        self.steps_s = 0.0
        self.images: dict[str, tuple] = {}
        self.decode_s = 0.0
        self.traces: list[dict | None] = [None] * self.degree

    # -- entry point on each rank's worker thread
    def run(self, rank: int) -> None:
        try:
            self._run(rank)
        except BaseException as exc:  # a bug or an aborted group: fail the job, keep the thread
            self.group.agreement.abort()
            with self._lock:
                self.job_error = self.job_error or (
                    f"executor error on rank {rank} ({self.env.devices[self.device_indices[rank]]}): "
                    f"{describe_error(exc)}")
            if not isinstance(exc, ops.GroupAbortedError):
                traceback.print_exc()
        finally:
            with self._lock:
                self._ranks_left -= 1
                last = self._ranks_left == 0
            if last:
                self._finish()

    def _run(self, rank: int) -> None:
        device = self.env.torch_devices[self.device_indices[rank]]
        host = {}
        t0 = time.perf_counter()
        # 1. Wait for earlier work on these requests, then place their latents on this group.
        if rank == 0:
            for event in self.wait_for:
                event.wait()
            host["wait_earlier_s"] = time.perf_counter() - t0
            self._prepare_group()
        lora_error = self._switch_lora(rank) if self.env.loras is not None else None
        t1 = time.perf_counter()
        self.group.agreement.meet(rank)
        host["meet_s"] = time.perf_counter() - t1
        if self.job_error is not None or not self.group.states:  # (no states: all were cancelled)
            return
        if self.env.loras is not None and not self._lora_agreed(rank, lora_error):
            return
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # 2. Denoising steps.
        start = time.perf_counter()
        runner = RankRunner(self.group, rank)
        outcome = runner.run()
        host["steps_s"] = time.perf_counter() - start
        # 3. Wait for the devices; rank 0 records and decodes.
        self._end_steps(rank, device, start, outcome)
        if outcome.trace is not None:
            self.traces[rank] = {**outcome.trace, "rank": rank, "device": str(device), "host_s": host,
                                 "gpu_ms": runner.queue.marks_ms(), "regroup_s": self.regroup_s}

    # -- phase 1, LoRA (every rank)
    def _switch_lora(self, rank: int) -> str | None:
        """Fuse the job's adapter set into this rank's device -> None, or why it could not."""
        index = self.device_indices[rank]
        try:
            seconds = self.env.loras.activate(index, self.lora)
        except Exception as exc:  # the device holds no known set now: the next job writes its set again
            return f"LoRA adapters could not be applied on {self.env.devices[index]}: {describe_error(exc)}"
        with self._lock:
            self.lora_s = max(self.lora_s, seconds)
        return None

    def _lora_agreed(self, rank: int, error: str | None) -> bool:
        """Every rank learns whether every rank's adapters are in place; if not, the job fails on every rank."""
        errors = [e for e in self.group.agreement.all_ranks(rank, error) if e is not None]
        if errors and rank == 0:
            self.job_error = errors[0]
        return not errors

    # -- phase 1 (rank 0)
    def _cancel_requested(self, state: DenoiseState) -> bool:
        """Rank 0's view of a request's cancel flag (or of the executor shutting down at exit)."""
        return state.cancelled or self.env.exiting.is_set()

    def _prepare_group(self) -> None:
        group = self.group
        broken = [s for s in group.states if s.prepared is None or s.error is not None]
        for s in broken:
            self.errors[s.request_id] = s.error or "the request has no prompt encoding"
        states = [s for s in group.states if s not in broken]
        # Cancelled before this call started: no steps, and their latents stay where they are.
        self.cancelled.update(s.request_id for s in states if self._cancel_requested(s))
        states = [s for s in states if s.request_id not in self.cancelled]
        group.states = states
        if not states:
            if broken:  # (all cancelled is no error: the job just has nothing to do)
                self.job_error = "no request of this call can run"
            return
        shapes = {(s.prepared.width, s.prepared.height, s.prepared.text_tokens) for s in states}
        if len(shapes) > 1:
            self.job_error = f"requests of different sizes cannot run as one batch: {sorted(shapes)}"
            return
        if group.cfg > 1:
            self._refuse_cfg(states)
        start = time.perf_counter()
        for s in states:
            group.start_step[s.request_id] = s.step
            self.regrouped[s.request_id] = False
            if s.request_id in self.errors or (s.placement == self.device_indices and s.cfg == group.cfg):
                continue
            try:
                self.regrouped[s.request_id] = self.env.latents.place(s, self.device_indices, group.cfg)
            except Exception as exc:
                self.errors[s.request_id] = f"moving the latent failed: {describe_error(exc)}"
        group.states = [s for s in states if s.request_id not in self.errors]
        if not group.states:
            self.job_error = "no request of this call can run"
            return
        self.regroup_s = time.perf_counter() - start
        group.connect([self.env.devices[i] for i in self.device_indices], self.env.comm_cache)
        if self.decode_after and self.decode_degree > 1:
            self.decode_comm = self.env.comm_cache.get(tuple(self.env.devices[i]
                                                             for i in self.device_indices[:self.decode_degree]))

    def _refuse_cfg(self, states: list[DenoiseState]) -> None:
        """A CFG-parallel call fails the requests that cannot run in that layout."""
        adapter = self.env.runtime.adapter
        for s in states:
            if not adapter.cfg_parallel(s.prepared):
                self.errors[s.request_id] = ("it cannot run CFG-parallel: it has no true classifier-free guidance "
                                             f"(guidance_scale {s.prepared.guidance_scale:g})")
            elif s.cache is not None:
                self.errors[s.request_id] = "it cannot run CFG-parallel with step caching (cache='auto')"

    # -- phase 3
    def _end_steps(self, rank: int, device: torch.device, start: float, outcome: RankOutcome) -> None:
        """The steps are done when the devices are; the group's time is the slowest rank's. Rank 0
        records the outcome and decodes the finished requests when asked."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.peak_memory[rank] = torch.cuda.max_memory_allocated(device)
        self.group.agreement.meet(rank)
        if rank == 0:
            self.steps_s = time.perf_counter() - start
            self.outcome = outcome
            self.errors.update(outcome.failed)  # (phase 1 may have failed some already)
            # A request cancelled after its last step ran to the end: it is not reported cancelled.
            self.cancelled.update(s.request_id for s in self.group.states if s.request_id in outcome.stopped
                                  and outcome.steps[s.request_id] < s.prepared.num_steps)
        if self.decode_after:
            self._decode_finished(rank)

    def _to_decode(self) -> list[DenoiseState]:
        """Rank 0: the finished requests someone still wants the image of."""
        todo = []
        for s in self.group.states:
            if s.request_id in self.errors or self.outcome.steps[s.request_id] < s.prepared.num_steps:
                continue
            if self._cancel_requested(s):  # nobody wants the image: skip the decode
                self.cancelled.add(s.request_id)
                continue
            todo.append(s)
        return todo

    def _decode_finished(self, rank: int) -> None:
        """Decode the finished requests: rank 0 alone, or the group's first decode_degree ranks together
        (every rank takes part in the votes, so the ranks agree on what is decoded and how it went)."""
        parallel = self.decode_degree > 1
        todo = self._to_decode() if rank == 0 else None
        if parallel:
            todo = self.group.agreement.all_ranks(rank, todo)[0]
        elif rank != 0:
            return
        for s in todo:
            start = time.perf_counter()
            try:
                if parallel:
                    result = decode_on_ranks(self.env, s, self.device_indices, self.decode_degree, rank,
                                             self.group.agreement, self.decode_comm)
                else:
                    result = self.env.latents.decode(s, self.device_indices[0])
            except Exception as exc:
                self.errors[s.request_id] = f"decode failed: {describe_error(exc)}"  # (rank 0 only)
                continue
            if rank == 0:
                seconds = time.perf_counter() - start
                self.images[s.request_id] = (*result, seconds)
                self.decode_s += seconds

    # -- the last rank out
    def _finish(self) -> None:
        try:
            final_step = self.outcome.steps if self.outcome is not None else {}
            results = {}
            peak = max(self.peak_memory)
            for s in self.all_states:
                results[s.request_id] = self._request_result(s, final_step, peak)
            trace = {"ranks": self.traces} if any(t is not None for t in self.traces) else None
            self.future.set_result(StepsResult(
                requests=results, device_indices=self.device_indices, num_steps=self.group.num_steps,
                seconds=self.steps_s, regroup_s=self.regroup_s, decode_s=self.decode_s, trace=trace,
                lora_s=self.lora_s))
        except BaseException as exc:  # pragma: no cover - a bug in building the result
            self.future.set_exception(exc)
        finally:
            for event in self.release:
                event.set()

    def _request_result(self, s: DenoiseState, final_step: dict[str, int], peak: int) -> RequestStepResult:
        rid = s.request_id
        cancelled = rid in self.cancelled and rid not in self.errors
        error = self.errors.get(rid) or (None if cancelled else self.job_error)
        start = self.group.start_step.get(rid, s.step)
        done = final_step.get(rid, start) - start
        if self.job_error is None and rid in final_step:
            s.step = final_step[rid]
            s.steps_s += self.steps_s
            if done:
                s.steps_at_degree[self.degree] = s.steps_at_degree.get(self.degree, 0) + done
            s.peak_memory_bytes = max(s.peak_memory_bytes, peak)
        if error is not None and s.error is None:
            s.error = error
        image, png, decode_s = self.images.get(rid, (None, None, 0.0))
        s.decode_s += decode_s
        return RequestStepResult(
            request_id=rid, steps_done=done, step=s.step, num_steps=s.num_steps,
            regrouped=self.regrouped.get(rid, False), seconds=self.steps_s,
            error=s.error or ("cancelled" if cancelled else None), cancelled=cancelled,
            image=image, png=png, decode_s=decode_s)
