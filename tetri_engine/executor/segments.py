"""A segment: the steps of one unchanged batch on one rank, run by the native loop (csrc/step_loop.cpp,
GIL released) or by its Python twin (`python_segment`, the same protocol, for comparison), and what a
step is to them: a captured CUDA graph (`GraphStep`, executor/cuda_graphs.py) or an eager forward
(`EagerStep`). `graph_for_batch` is the group's vote on a batch's graph.

Each step of a segment (both loops, every rank): wait for room on the device's queue; run the step;
rank 0 reads the batch's stop flags; every rank's (error, exchanges, stop mask) meets the others' in
the job's `RankAgreement`; all take the same verdict (`ops.step_verdict`): commit, or end the segment
"failed" / "out_of_step". A segment also ends when its budget is spent, a request reached its last
step, or a stop was reported: the batch then changes and the rank's runner (runner.py) builds the next.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from tetri_engine import ops
from tetri_engine.executor.agreement import RankAgreement
from tetri_engine.executor.state import DenoiseState, describe_error
from tetri_engine.model.adapter import flow_match_euler_step
from tetri_engine.model.image_input import after_step
from tetri_engine.model.step_cache import CacheStep
from tetri_engine.model.ulysses import SPContext, sequence_parallel, shard_length, valid_tokens
from tetri_engine.ops.step_loop import BUDGET, FINISHED, STOPPED

StepFn = Callable[[], "tuple[str | None, int]"]


@dataclass
class SegmentResult:
    """What a segment did, the same on every rank (SegmentOutcome's fields)."""

    steps: int  # committed
    end: str  # BUDGET | FINISHED | STOPPED | FAILED | OUT_OF_STEP
    stop_mask: int = 0  # bit i: the group agreed to stop request i of the batch (its last step committed)
    errors: list[str] = field(default_factory=list)  # FAILED / OUT_OF_STEP: per rank, "" where fine
    phases_s: list = field(default_factory=list)  # trace: per step (wait for room, step, meet, commit) seconds

    def stopped(self, batch: list[DenoiseState]) -> list[DenoiseState]:
        return [s for i, s in enumerate(batch) if self.stop_mask >> i & 1]


@dataclass
class SegmentSpec:
    """One rank's segment (`ops.SegmentSpec`'s fields, and the callbacks)."""

    max_steps: int
    steps_left: list[int]
    stop_flags: list[Any]
    exit_flag: Any
    step: StepFn
    commit: Callable[[], None] | None = None  # eager steps commit after the verdict
    on_step: Callable[[int], None] | None = None  # rank 0: after step k committed
    graph_exec: int = 0  # the native loop launches this instead of calling `step`
    graph_exchanges: int = 0
    first_error: str = ""
    trace: bool = False


def run_segment(loop: str, agreement: RankAgreement, rank: int, queue: Any, spec: SegmentSpec) -> SegmentResult:
    """Run a segment with the native loop ("native") or its Python twin ("python")."""
    if loop == "python":
        return python_segment(agreement, rank, queue, spec)
    native = ops.SegmentSpec(max_steps=spec.max_steps, steps_left=spec.steps_left, stop_flags=spec.stop_flags,
                             exit_flag=spec.exit_flag, graph_exec=spec.graph_exec,
                             graph_exchanges=spec.graph_exchanges, first_error=spec.first_error, trace=spec.trace)
    out = ops.run_segment(agreement.group, rank, queue, native, step=None if spec.graph_exec else spec.step,
                          commit=spec.commit, on_step=spec.on_step)
    return SegmentResult(out.steps, out.end, out.stop_mask, list(out.errors), [tuple(p) for p in out.phases_s])


def python_segment(agreement: RankAgreement, rank: int, queue: Any, spec: SegmentSpec) -> SegmentResult:
    """The native loop's protocol in Python, step by step (csrc/step_loop.cpp `run_segment`)."""
    result = SegmentResult(0, BUDGET)
    left = list(spec.steps_left)
    try:
        for k in range(spec.max_steps):
            t0 = time.perf_counter()
            queue.wait_for_room()
            t1 = time.perf_counter()
            error, exchanges = spec.step()
            t2 = time.perf_counter()
            mask = _stop_mask(spec) if rank == 0 else 0
            reports = agreement.all_ranks(rank, (error, exchanges, mask))
            t3 = time.perf_counter()
            result.stop_mask |= reports[0][2]
            verdict = ops.step_verdict([(e, n) for e, n, _ in reports])
            if verdict:
                result.end, result.errors = verdict, [e or "" for e, _, _ in reports]
                return result
            if spec.commit is not None:
                spec.commit()
            result.steps += 1
            if rank == 0 and spec.on_step is not None:
                spec.on_step(k)
            if spec.trace:
                result.phases_s.append((t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3))
            left = [n - 1 for n in left]
            if min(left) <= 0 or result.stop_mask:
                result.end = FINISHED if min(left) <= 0 else STOPPED
                return result
    except BaseException:
        agreement.abort()  # the other ranks must not wait for this one at the next meeting
        raise
    return result


def _stop_mask(spec: SegmentSpec) -> int:
    exiting = spec.exit_flag is not None and spec.exit_flag.is_set()
    return sum(1 << i for i, flag in enumerate(spec.stop_flags) if exiting or flag.is_set())


class GraphStep:
    """A step that is a graph launched from Python (the Python loop, or a torch without exec handles).
    A rank whose inputs could not be copied (`first_error`) launches anyway and reports it at once."""

    def __init__(self, graph: Any, first_error: str = ""):
        self.graph = graph
        self.first_error = first_error or None

    def __call__(self) -> tuple[str | None, int]:
        self.graph.replay()
        error, self.first_error = self.first_error, None
        return error, len(self.graph.exchanges)


class EagerStep:
    """One rank's eager step of a batch: the forward (the ranks exchange inside attention) and the Euler
    update of each shard, kept pending until the group agrees (`commit`). A rank whose forward raises
    catches up with the exchanges of the forward it did not reach, so the group stays in step."""

    def __init__(self, runtime: Any, rank: int, degree: int, batch: list[DenoiseState], first_steps: list[int],
                 context: SPContext, transformer: Any, inputs: Any, log_errors: bool = False):
        self.runtime, self.rank, self.degree = runtime, rank, degree
        self.batch, self.first_steps, self.context = batch, first_steps, context
        self.transformer, self.inputs, self.log_errors = transformer, inputs, log_errors
        self.done = 0  # steps committed
        self.pending: tuple[list, Any] | None = None

    def __call__(self) -> tuple[str | None, int]:
        adapter = self.runtime.adapter
        self.context.exchange_log = []
        new_shards, error, cache_step = [], None, None
        shards = [s.shards[self.rank] for s in self.batch]
        try:
            if isinstance(self.inputs, Exception):
                raise self.inputs
            step_indices = [i + self.done for i in self.first_steps]
            cache_kwargs = {}  # only when some request caches: the plain forward stays the plain call
            if any(s.cache is not None for s in self.batch):
                cache_step = CacheStep([s.cache for s in self.batch], [s.prepared.rows for s in self.batch],
                                       step_indices, self.batch[0].prepared.image_tokens, self.context)
                cache_kwargs["cache_step"] = cache_step
            with sequence_parallel(self.context):
                velocities = adapter.velocity(self.transformer, shards, [s.prepared for s in self.batch],
                                              step_indices, self.inputs, **cache_kwargs)
            for s, shard, v, i in zip(self.batch, shards, velocities, step_indices):
                sigmas = s.prepared.on(shard.device)["sigmas"]
                new = flow_match_euler_step(shard, v, sigmas, i)
                new = after_step(s.prepared, new, self.context.rank, self.context.degree, sigmas[i + 1])  # inpainting
                # (the shard's place in its guidance branch's sequence-parallel group)
                valid = valid_tokens(s.prepared.image_tokens, self.context.degree, self.context.rank)
                if valid < shard_length(s.prepared.image_tokens, self.context.degree):
                    new[:, valid:] = 0  # padding stays zero, as ops.shard made it
                new_shards.append(new)
        except Exception as exc:
            error = describe_error(exc)
            if self.log_errors:
                traceback.print_exc()
        # (outside the except block, so that the failed forward's activations are already freed)
        if error is not None and self.degree > 1:
            error = self._catch_up(error, cache_step, shards, adapter)
        self.pending = (new_shards, cache_step) if error is None else None
        return error, len(self.context.exchange_log)

    def _catch_up(self, error: str, cache_step: Any, shards: list, adapter: Any) -> str:
        try:
            if cache_step is not None:  # the cached forward's sequence: first block, decision, the rest
                cache_step.catch_up(adapter.exchange_plan_per_block(), adapter.num_heads, adapter.head_dim,
                                    self.runtime.dtype, shards[0].device)
            else:
                adapter.catch_up(self.context, [s.prepared for s in self.batch], self.runtime.dtype, shards[0].device)
        except Exception as exc:
            error += f" (and catching up with the group failed: {describe_error(exc)})"
        return error

    def commit(self) -> None:
        new_shards, cache_step = self.pending
        for s, new in zip(self.batch, new_shards):
            s.shards[self.rank] = new
        if cache_step is not None:
            cache_step.commit()
        self.pending = None
        self.done += 1


def graph_for_batch(graphs: Any, agreement: RankAgreement, rank: int, batch: list[DenoiseState], inputs: Any,
                    context: SPContext, key_args: tuple, transformer: Any, runtime: Any) -> Any:
    """The CUDA graph of this batch's step on this rank (captured now if need be), or None: eager.

    NCCL needs a captured exchange captured, and a graph launched, on every rank of the group, so the
    ranks vote and all take the same path: replay, capture, or eager. Batches with the step cache
    (cache="auto") and schedules longer than the graphs hold run eagerly. key_args: (model name,
    device, group device names)."""
    from tetri_engine.executor.cuda_graphs import fits

    name, device, group = key_args
    prepared = [s.prepared for s in batch]
    shards = [s.shards[rank] for s in batch]
    key = graphs.key(name, device, group, rank, shards, prepared, context.cfg_degree)
    comms = (context.comm, context.cfg_comm)
    status = "skip" if isinstance(inputs, Exception) or not fits(prepared) else graphs.status(device, key, comms)
    graph = None
    if status == "missing":  # static buffers first (they may not fit): the vote says who can capture
        try:
            graph = _prepare(graphs, device, key, shards, prepared, inputs, context, rank)
        except Exception:
            status = "skip"
    votes = agreement.all_ranks(rank, status)
    if "failed" in votes or "skip" in votes:
        return None
    if all(v == "ready" for v in votes):
        return graphs.get(device, key)
    # Some rank has no graph for this batch: every rank captures (theirs would not match a new one).
    if status == "ready":
        graph = _prepare(graphs, device, key, shards, prepared, inputs, context, rank)
    warm_error, exchanges = graphs.warm_up(graph, runtime.adapter, transformer, context, runtime.dtype)
    votes = agreement.all_ranks(rank, (warm_error, exchanges))
    if len({n for _, n in votes}) > 1:  # a failed warm-up could not catch up: the communicator is unusable
        raise RuntimeError("the group's ranks went out of step warming up a CUDA graph: "
                           + "; ".join(f"rank {r}: {e}" for r, (e, _) in enumerate(votes) if e))
    if any(e is not None for e, _ in votes):
        return None  # a request fails in the eager forward (this step reports it); capture next time
    capture_error = graphs.capture(graph, runtime.adapter, transformer, context)
    votes = agreement.all_ranks(rank, capture_error)
    if any(e is not None for e in votes):
        graphs.mark_failed(device, key, "; ".join(f"rank {r}: {e}" for r, e in enumerate(votes) if e))
        return None
    graphs.store(graph)
    return graph


def _prepare(graphs, device, key, shards, prepared, inputs, context: SPContext, rank: int):
    valid = valid_tokens(prepared[0].image_tokens, context.degree, context.rank)  # (its branch's rank)
    return graphs.prepare(device, key, shards, prepared, inputs, valid, (context.rank, context.degree))
