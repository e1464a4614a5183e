"""One `submit_steps` call: a group of ranks (one per device, each on its device's worker thread) running
`num_steps` sequence-parallel steps of one or more same-shape requests.

Phases of a job, on every rank:

    1. rank 0 waits for earlier work on the requests, moves their latents onto the group
       (`ops.regroup`), and fetches the group's communicator; then all ranks meet (barrier).
    2. each step: one batched forward of the active requests on the rank's shards (the ranks exchange
       inside attention), the Euler update of each shard, then a barrier where the ranks compare
       outcomes, so that every rank commits or drops the same step for the same requests:
         - all ranks fine: commit;
         - the step failed somewhere, every rank completed the same exchanges: a batch is retried
           one request at a time, and the requests that fail alone fail;
         - the ranks completed different exchanges: every request of the job fails.
       A rank whose forward raises first issues the exchanges of the forward it did not reach, with
       zero buffers (`ulysses.catch_up`): the others' exchanges then complete instead of waiting (on
       NCCL, for ever, with their GPU queues filling behind them), and the ranks stay in step.
       Cancellation (`Executor.cancel`) rides on the same barrier: rank 0 reads the requests' cancel
       flags when it reports and every rank drops the same requests after the same step, so the ranks
       never disagree on the batch (diverging collectives would hang NCCL). No extra sync per step.
    3. wait for the devices; rank 0 decodes the finished requests when asked (one at a time).

The last rank to finish resolves the future and hands the requests back (`DenoiseState.idle`).
"""
from __future__ import annotations

import collections
import io
import threading
import time
import traceback
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable

import torch

from tetri_engine.executor.state import DenoiseState, RequestStepResult, StepsResult
from tetri_engine.model.adapter import flow_match_euler_step
from tetri_engine.model.step_cache import CacheStep
from tetri_engine.model.ulysses import SPContext, catch_up, sequence_parallel, shard_length, valid_tokens

if TYPE_CHECKING:  # pragma: no cover
    from tetri_engine.executor.executor import Executor


# Steps a rank may have queued on its GPU ahead of the one running there. Unbounded, a thread fills the
# device's launch queue and then lives at its limit, where every launch waits a little for a slot and
# the thread wakes for the GIL after each one: the suspected reason why bench/corun_interference.py
# measured a 512^2 group on one H200 2.9x slower next to a 2048^2 group on the other (the other
# threads of the process wait for the GIL). Two keeps the GPU fed (the next step is queued while one
# runs) while the thread sleeps in an event wait, GIL released.
MAX_STEPS_QUEUED = 2


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"CUDA out of memory: {exc}"
    return f"{type(exc).__name__}: {exc}"


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    # Level 1: PNG compression of a 2048x2048 image at the default level costs more than its decode.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _wait_for_queue_room(queued: collections.deque, device: torch.device) -> None:
    """Mark the end of the steps launched so far; then wait (GIL released) until at most
    MAX_STEPS_QUEUED - 1 of them are still to run on the device. No deadlock in a group: the per-step
    barrier means every rank has launched the steps (and their exchanges) being waited for."""
    event = torch.cuda.Event(blocking=True)  # the wait sleeps rather than spins: cores stay free for Python
    event.record(torch.cuda.current_stream(device))
    queued.append(event)
    while len(queued) > MAX_STEPS_QUEUED - 1:
        queued.popleft().synchronize()


class StepsJob:
    def __init__(self, executor: Executor, states: list[DenoiseState], device_indices: tuple[int, ...],
                 num_steps: int, on_step: Callable[[str, int], None] | None, decode_after: bool,
                 wait_for: list[threading.Event], release: list[threading.Event]):
        self.ex = executor
        self.all_states = list(states)  # every request of the call (results)
        self.states = list(states)  # those that run (phase 1 drops the ones that cannot)
        self.device_indices = device_indices
        self.degree = len(device_indices)
        self.num_steps = num_steps
        self.on_step = on_step
        self.decode_after = decode_after
        self.wait_for = wait_for
        self.release = release
        self.future: Future[StepsResult] = Future()
        self.barrier = threading.Barrier(self.degree)
        self._lock = threading.Lock()
        self._ranks_left = self.degree
        # Written by rank 0 in phase 1, read by every rank after the first barrier.
        self.comm = None
        self.regrouped: dict[str, bool] = {}
        self.regroup_s = 0.0
        self.job_error: str | None = None  # the whole job failed (requests that cannot be batched, ...)
        self.start_step: dict[str, int] = {}
        # Phase 2 outcome reports, [step parity][rank] -> (error or None, exchange log, cancelled ids);
        # double buffered so that one barrier per step suffices. Only rank 0 reports cancelled ids.
        self.reports: list[list[tuple]] = [[(None, [], frozenset())] * self.degree for _ in range(2)]
        self.report_parity = [0] * self.degree
        # Per rank: the requests the group agreed to stop (rank 0's reports); the same set on every
        # rank after each barrier.
        self.stopping: list[set[str]] = [set() for _ in range(self.degree)]
        # Votes of the ranks on the CUDA graph of a batch (`_graph`), double buffered the same way.
        self.votes: list[list] = [[None] * self.degree for _ in range(2)]
        self.vote_parity = [0] * self.degree
        # Results, written by the ranks as they agree (identical on every rank) and read at the end.
        self.final_step: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        self.cancelled: set[str] = set()  # stopped early by a cancel (results say "cancelled")
        self.peak_memory = [0] * self.degree
        self.steps_s = 0.0
        self.images: dict[str, tuple] = {}
        self.decode_s = 0.0

    # -- entry point on each rank's worker thread
    def run(self, rank: int) -> None:
        try:
            self._run(rank)
        except BaseException as exc:  # a bug or a broken barrier: fail the job, keep the thread
            self.barrier.abort()
            with self._lock:
                self.job_error = self.job_error or (
                    f"executor error on rank {rank} ({self.ex.devices[self.device_indices[rank]]}): "
                    f"{describe_error(exc)}")
            if not isinstance(exc, threading.BrokenBarrierError):
                traceback.print_exc()
        finally:
            with self._lock:
                self._ranks_left -= 1
                last = self._ranks_left == 0
            if last:
                self._finish()

    def _run(self, rank: int) -> None:
        device = self.ex.torch_device(self.device_indices[rank])
        # 1. Wait for earlier work on these requests, then place their latents on this group.
        if rank == 0:
            for event in self.wait_for:
                event.wait()
            self._prepare_group()
        self._sync()
        if self.job_error is not None or not self.states:  # (no states: all were cancelled)
            return
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # 2. Denoising steps.
        step = dict(self.start_step)  # this rank's view; identical on every rank by construction
        failed: dict[str, str] = {}
        transformer = self.ex.runtime.transformer_on(device)
        adapter = self.ex.runtime.adapter
        first = self.states[0].prepared
        lengths = {"image": first.image_tokens, "text": first.text_tokens}
        context = SPContext(self.comm, rank, self.degree, lengths)
        inputs_key, inputs, graph = None, None, None
        start = time.perf_counter()
        stopping = self.stopping[rank]  # grows in `_agree`, identically on every rank
        queued: collections.deque = collections.deque()  # CUDA events, one after each launched step
        for _ in range(self.num_steps):
            if device.type == "cuda":
                _wait_for_queue_room(queued, device)
            active = [s for s in self.states if s.request_id not in failed and s.request_id not in stopping
                      and step[s.request_id] < s.prepared.num_steps]
            if not active:
                break
            ids = tuple(s.request_id for s in active)
            if ids != inputs_key:  # the batch changed (a request finished or failed): new static inputs
                inputs_key = ids
                inputs = self._inputs(adapter, active, device, rank)
                graph = self._graph(rank, active, step, context, transformer, adapter, inputs, device)
            outcome = self._step(rank, active, step, context, transformer, adapter, inputs, graph)
            if outcome is not None and outcome[0] == "failed" and len(active) > 1:
                inputs_key = None  # (the retry ran other batches)
                outcome = self._retry_alone(rank, active, step, context, transformer, adapter, device, failed)
            if outcome is not None:
                for s in active:
                    failed.setdefault(s.request_id, outcome[1])
                if outcome[0] == "out_of_step":
                    break  # the communicator cannot be trusted: no more exchanges in this job
                continue
            if rank == 0 and self.on_step is not None:
                for s in active:
                    if s.request_id not in failed:
                        self._call_on_step(s.request_id, step[s.request_id])

        self._end_steps(rank, device, start, step, failed)

    # -- phase 1 (rank 0)
    def _cancel_requested(self, state: DenoiseState) -> bool:
        """Rank 0's view of a request's cancel flag (or of the executor shutting down at exit)."""
        return state.cancelled or self.ex.exiting.is_set()

    def _prepare_group(self) -> None:
        from tetri_engine import ops

        broken = [s for s in self.states if s.prepared is None or s.error is not None]
        for s in broken:
            self.errors[s.request_id] = s.error or "the request has no prompt encoding"
        self.states = [s for s in self.states if s not in broken]
        # Cancelled before this call started: no steps, and their latents stay where they are.
        self.cancelled.update(s.request_id for s in self.states if self._cancel_requested(s))
        self.states = [s for s in self.states if s.request_id not in self.cancelled]
        if not self.states:
            if broken:  # (all cancelled is no error: the job just has nothing to do)
                self.job_error = "no request of this call can run"
            return
        shapes = {(s.prepared.width, s.prepared.height, s.prepared.text_tokens) for s in self.states}
        if len(shapes) > 1:
            self.job_error = f"requests of different sizes cannot run as one batch: {sorted(shapes)}"
            return
        names = [self.ex.devices[i] for i in self.device_indices]
        start = time.perf_counter()
        for s in self.states:
            self.start_step[s.request_id] = s.step
            self.regrouped[s.request_id] = False
            if s.placement == self.device_indices:
                continue
            try:
                if s.shards is None:  # first steps: shard the seeded noise (not a regroup)
                    s.shards = ops.shard(s.prepared.noise, self.degree, names)
                else:
                    s.shards = ops.regroup(s.shards, s.prepared.image_tokens, names)
                    s.regroups += 1
                    self.regrouped[s.request_id] = True
                    s.prepared.drop_device_copies()  # the prompt embeddings follow on first use
                if s.cache is not None:  # the cached residuals are sharded like the latent: they move with it
                    s.cache.place(names, s.prepared.image_tokens)
                s.placement = self.device_indices
            except Exception as exc:
                self.errors[s.request_id] = f"moving the latent failed: {describe_error(exc)}"
        self.states = [s for s in self.states if s.request_id not in self.errors]
        if not self.states:
            self.job_error = "no request of this call can run"
            return
        self.regroup_s = time.perf_counter() - start
        if self.degree > 1:
            self.comm = self.ex.comm_cache.get(tuple(names))

    # -- phase 2
    def _inputs(self, adapter, active, device, rank):
        """A rank's static inputs for a batch; a failure is reported by the step that uses them."""
        try:
            return adapter.rank_inputs([s.prepared for s in active], device, rank, self.degree)
        except Exception as exc:
            return exc

    def _step(self, rank, active, step, context, transformer, adapter, inputs, graph=None) -> tuple[str, str] | None:
        """One step of `active` on this rank, agreed with the other ranks. None: committed on every rank;
        else (kind, message), kind "failed" (every rank stayed in step) or "out_of_step". graph: the
        batch's CUDA graph (`_graph`), replayed instead of the eager forward."""
        context.exchange_log = []
        new_shards, error, cache_step = [], None, None
        shards = [s.shards[rank] for s in active]
        try:
            if isinstance(inputs, Exception):
                raise inputs
            step_indices = [step[s.request_id] for s in active]
            cache_kwargs = {}  # only when some request caches: the plain forward stays the plain call
            if any(s.cache is not None for s in active):
                cache_step = CacheStep([s.cache for s in active], [s.prepared.rows for s in active], step_indices,
                                       active[0].prepared.image_tokens, context)
                cache_kwargs["cache_step"] = cache_step
            if graph is not None:  # (never with the step cache: _graph leaves those batches eager)
                velocities = graph.run(shards, [s.prepared for s in active], step_indices, inputs, context)
            else:
                with sequence_parallel(context):
                    velocities = adapter.velocity(transformer, shards, [s.prepared for s in active], step_indices,
                                                  inputs, **cache_kwargs)
            for s, shard, v, i in zip(active, shards, velocities, step_indices):
                new = flow_match_euler_step(shard, v, s.prepared.on(shard.device)["sigmas"], i)
                valid = valid_tokens(s.prepared.image_tokens, self.degree, rank)
                if valid < shard_length(s.prepared.image_tokens, self.degree):
                    new[:, valid:] = 0  # padding stays zero, as ops.shard made it
                new_shards.append(new)
        except Exception as exc:
            error = describe_error(exc)
            if self.ex.log_errors:
                traceback.print_exc()
        # (outside the except block, so that the failed forward's activations are already freed)
        if error is not None and self.degree > 1:
            try:
                if cache_step is not None:  # the cached forward's sequence: first block, decision, the rest
                    cache_step.catch_up(adapter.exchange_plan_per_block(), adapter.num_heads, adapter.head_dim,
                                        self.ex.runtime.dtype, shards[0].device)
                else:
                    catch_up(context, adapter.exchange_plan(), sum(s.prepared.rows for s in active),
                             adapter.num_heads, adapter.head_dim, self.ex.runtime.dtype, shards[0].device)
            except Exception as exc:
                error += f" (and catching up with the group failed: {describe_error(exc)})"
        outcome = self._agree(rank, error, context)
        if outcome is None:
            for s, new in zip(active, new_shards):
                s.shards[rank] = new
                step[s.request_id] += 1
            if cache_step is not None:
                cache_step.commit()
        return outcome

    def _retry_alone(self, rank, active, step, context, transformer, adapter, device,
                     failed: dict[str, str]) -> tuple[str, str] | None:
        """After a failed batched step, each request of the batch one at a time: only the requests that
        fail alone fail (added to `failed`). Returns an "out_of_step" outcome, else None."""
        for s in active:
            single = self._step(rank, [s], step, context, transformer, adapter, self._inputs(adapter, [s], device, rank))
            if single is not None:
                failed[s.request_id] = single[1]
                if single[0] == "out_of_step":
                    return single
        return None

    def _graph(self, rank, active, step, context, transformer, adapter, inputs, device):
        """The CUDA graph of this batch's forward on this rank (captured now if need be), or None: eager.

        NCCL needs a captured exchange captured, and a graph launched, on every rank of the group, so
        the ranks vote (`_all_ranks`) and all take the same path: replay, capture, or eager. Batches with
        the step cache (cache="auto") run eagerly, and so does every step on CPU devices."""
        graphs = self.ex.graphs
        if graphs is None or device.type != "cuda" or any(getattr(s, "cache", None) is not None for s in active):
            return None  # (the same on every rank: the states are shared)
        prepared = [s.prepared for s in active]
        shards = [s.shards[rank] for s in active]
        key = graphs.key(self.ex.runtime.name, device, tuple(self.ex.devices[i] for i in self.device_indices), rank,
                         shards, prepared)
        status = "skip" if isinstance(inputs, Exception) else graphs.status(device, key, self.comm)
        if status == "missing":  # static buffers first (they may not fit): the vote says who can capture
            try:
                graph = graphs.prepare(device, key, shards, prepared, inputs)
            except Exception:
                status = "skip"
        votes = self._all_ranks(rank, status)
        if "failed" in votes or "skip" in votes:
            return None
        if all(v == "ready" for v in votes):
            return graphs.get(device, key)
        # Some rank has no graph for this batch: every rank captures (theirs would not match a new one).
        if status == "ready":
            graph = graphs.prepare(device, key, shards, prepared, inputs)
        dtype = self.ex.runtime.dtype
        warm_error, exchanges = graphs.warm_up(graph, adapter, transformer, context, dtype)
        votes = self._all_ranks(rank, (warm_error, exchanges))
        if len({n for _, n in votes}) > 1:  # a failed warm-up could not catch up: the communicator is unusable
            raise RuntimeError("the group's ranks went out of step warming up a CUDA graph: "
                               + "; ".join(f"rank {r}: {e}" for r, (e, _) in enumerate(votes) if e))
        if any(e is not None for e, _ in votes):
            return None  # a request fails in the eager forward (this step reports it); capture next time
        capture_error = graphs.capture(graph, adapter, transformer, context)
        votes = self._all_ranks(rank, capture_error)
        if any(e is not None for e in votes):
            graphs.mark_failed(device, key, "; ".join(f"rank {r}: {e}" for r, e in enumerate(votes) if e))
            return None
        graphs.store(graph)
        return graph

    def _all_ranks(self, rank: int, value):
        """Every rank's `value`, in rank order, on every rank (double buffered like `_agree`)."""
        if self.degree == 1:
            return [value]
        parity = self.vote_parity[rank]
        self.vote_parity[rank] ^= 1
        self.votes[parity][rank] = value
        self._sync()
        return list(self.votes[parity])

    def _agree(self, rank: int, error: str | None, context: SPContext) -> tuple[str, str] | None:
        """Every rank reports its outcome; all return the same verdict. (The slots of one parity are read
        before any rank can pass the next barrier and overwrite them.)

        Rank 0 also reports which requests are cancelled now; every rank adds them to its
        `stopping` set, so all ranks drop them after this step (it still commits: it is done)."""
        parity = self.report_parity[rank]
        self.report_parity[rank] ^= 1
        cancelled = frozenset(s.request_id for s in self.states if self._cancel_requested(s)) if rank == 0 else ()
        self.reports[parity][rank] = (error, list(context.exchange_log), cancelled)
        self._sync()
        reports = list(self.reports[parity])
        self.stopping[rank].update(reports[0][2])
        if all(e is None for e, _, _ in reports):
            return None
        if self.degree == 1:
            return "failed", reports[0][0]
        message = "; ".join(f"rank {r} ({self.ex.devices[self.device_indices[r]]}): {e}"
                            for r, (e, _, _) in enumerate(reports) if e is not None)
        if len({len(log) for _, log, _ in reports}) == 1:
            return "failed", message
        return "out_of_step", ("the group's ranks went out of step in a failed step, so its communicator "
                               "cannot be trusted: " + message)

    def _call_on_step(self, request_id: str, step: int) -> None:
        try:
            self.on_step(request_id, step)
        except Exception:  # a caller's callback must not stop the steps
            traceback.print_exc()

    def _sync(self) -> None:
        if self.degree > 1:
            self.barrier.wait()

    # -- phase 3
    def _end_steps(self, rank: int, device: torch.device, start: float, step: dict[str, int],
                   failed: dict[str, str]) -> None:
        """The steps are done when the devices are; the group's time is the slowest rank's. Rank 0
        records the outcome and decodes the finished requests when asked."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.peak_memory[rank] = torch.cuda.max_memory_allocated(device)
        self._sync()
        if rank == 0:
            self.steps_s = time.perf_counter() - start
            self.final_step = step
            self.errors.update(failed)  # (phase 1 may have failed some already)
            # A request cancelled after its last step ran to the end: it is not reported cancelled.
            self.cancelled.update(s.request_id for s in self.states if s.request_id in self.stopping[rank]
                                  and step[s.request_id] < s.prepared.num_steps)
            if self.decode_after:
                self._decode_finished()

    def _decode_finished(self) -> None:
        for s in self.states:
            if s.request_id in self.errors or self.final_step[s.request_id] < s.prepared.num_steps:
                continue
            if self._cancel_requested(s):  # nobody wants the image: skip the decode
                self.cancelled.add(s.request_id)
                continue
            try:
                start = time.perf_counter()
                image, png = self.ex.decode_state(s, self.device_indices[0])
                seconds = time.perf_counter() - start
                self.images[s.request_id] = (image, png, seconds)
                self.decode_s += seconds
            except Exception as exc:
                self.errors[s.request_id] = f"decode failed: {describe_error(exc)}"

    # -- the last rank out
    def _finish(self) -> None:
        try:
            results = {}
            peak = max(self.peak_memory)
            for s in self.all_states:
                rid = s.request_id
                cancelled = rid in self.cancelled and rid not in self.errors
                error = self.errors.get(rid) or (None if cancelled else self.job_error)
                start = self.start_step.get(rid, s.step)
                done = self.final_step.get(rid, start) - start
                if self.job_error is None and rid in self.final_step:
                    s.step = self.final_step[rid]
                    s.steps_s += self.steps_s
                    if done:
                        s.steps_at_degree[self.degree] = s.steps_at_degree.get(self.degree, 0) + done
                    s.peak_memory_bytes = max(s.peak_memory_bytes, peak)
                if error is not None and s.error is None:
                    s.error = error
                image, png, decode_s = self.images.get(rid, (None, None, 0.0))
                s.decode_s += decode_s
                results[rid] = RequestStepResult(
                    request_id=rid, steps_done=done, step=s.step, num_steps=s.num_steps,
                    regrouped=self.regrouped.get(rid, False), seconds=self.steps_s,
                    error=s.error or ("cancelled" if cancelled else None), cancelled=cancelled,
                    image=image, png=png, decode_s=decode_s)
            self.future.set_result(StepsResult(
                requests=results, device_indices=self.device_indices, num_steps=self.num_steps,
                seconds=self.steps_s, regroup_s=self.regroup_s, decode_s=self.decode_s))
        except BaseException as exc:  # pragma: no cover - a bug in building the result
            self.future.set_exception(exc)
        finally:
            for event in self.release:
                event.set()
