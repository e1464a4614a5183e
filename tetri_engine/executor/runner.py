"""One rank's part of phase 2 of a steps job: the job's steps, batch after batch, every step agreed with
the group's other ranks. `RankRunner.run()` returns a `RankOutcome`, identical on every rank (every
decision in it went through the job's `RankAgreement`).

The batch is the job's requests that are still running (not failed, not stopped, steps left). While it
does not change, its steps are one segment (segments.py): a graph launched per step, or an eager step,
run by the native loop or its Python twin. When a step fails:
  - the ranks made the same exchanges ("failed"): a batch of several requests is retried one request at
    a time, and only the requests that fail alone fail; a single request fails;
  - they did not ("out_of_step"): every request of the batch fails and the job makes no more exchanges
    (its communicator cannot be trusted).
A failed attempt counts as one of the call's steps, as its retry does.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from tetri_engine import ops
from tetri_engine.executor.agreement import RankAgreement, describe_failure
from tetri_engine.executor.latents import reading_from
from tetri_engine.executor.options import StepEnv
from tetri_engine.executor.segments import EagerStep, GraphStep, SegmentResult, SegmentSpec, graph_for_batch, run_segment
from tetri_engine.executor.state import DenoiseState, describe_error
from tetri_engine.model.ulysses import SPContext
from tetri_engine.ops.step_loop import FAILED, OUT_OF_STEP



@dataclass
class GroupJob:
    """What every rank of one steps job reads in phase 2. Phase 1 (rank 0, before the ranks meet) sets
    `states` (the requests that run), the communicators (`connect`) and `start_step`; nobody writes them
    afterwards.

    Layout: `cfg` guidance branches side by side, each over sp_degree = degree / cfg ranks; rank r runs
    branch r // sp_degree as rank r % sp_degree of that branch's Ulysses group (`branch_comms`), and
    exchanges its branch's output with its twins, the ranks of the same sequence shard in the other
    branches (`twin_comms`)."""

    env: StepEnv
    device_indices: tuple[int, ...]
    num_steps: int
    on_step: Callable[[str, int], None] | None
    agreement: RankAgreement
    states: list[DenoiseState] = field(default_factory=list)
    cfg: int = 1
    branch_comms: list = field(default_factory=list)  # per branch: its communicator (sp_degree > 1)
    twin_comms: list = field(default_factory=list)  # per sequence rank: its twins' communicator (cfg > 1)
    start_step: dict[str, int] = field(default_factory=dict)  # request -> its steps before this job

    @property
    def degree(self) -> int:
        return len(self.device_indices)

    @property
    def sp_degree(self) -> int:
        return self.degree // self.cfg

    def connect(self, names: list[str], comm_cache: Any) -> None:
        """The communicators of the layout, for the group's device names in rank order."""
        sp = self.sp_degree
        if sp > 1:
            self.branch_comms = [comm_cache.get(tuple(names[c * sp:(c + 1) * sp])) for c in range(self.cfg)]
        if self.cfg > 1:
            self.twin_comms = [comm_cache.get(tuple(names[c * sp + j] for c in range(self.cfg))) for j in range(sp)]

    def context(self, rank: int, lengths: dict[str, int]) -> SPContext:
        """Rank `rank`'s SPContext (see the class docstring)."""
        branch, j = divmod(rank, self.sp_degree)
        return SPContext(self.branch_comms[branch] if self.branch_comms else None, j, self.sp_degree, lengths,
                         cfg_comm=self.twin_comms[j] if self.twin_comms else None, cfg_rank=branch,
                         cfg_degree=self.cfg)


@dataclass
class RankOutcome:
    """What one rank's steps did."""

    steps: dict[str, int]  # request -> steps done in total
    failed: dict[str, str] = field(default_factory=dict)  # request -> error
    stopped: set[str] = field(default_factory=set)  # requests the group agreed to stop (cancel, exit)
    trace: dict[str, Any] | None = None  # StepOptions.trace: this rank's timings


class RankRunner:
    """Phase 2 on one rank of `job` (see the module docstring)."""

    def __init__(self, job: GroupJob, rank: int):
        env = job.env
        self.job, self.rank, self.env = job, rank, env
        self.device = env.torch_devices[job.device_indices[rank]]
        self.transformer = env.runtime.transformer_on(env.devices[job.device_indices[rank]])
        first = job.states[0].prepared
        self.context = job.context(rank, {"image": first.image_tokens, "text": first.text_tokens})
        options = env.options
        self.queue = ops.DeviceQueue(self.device.index if self.device.type == "cuda" else -1,
                                     options.max_steps_queued, options.trace)
        self.outcome = RankOutcome(steps=dict(job.start_step))
        self.trace = {"segments": [], "prepare_s": 0.0} if options.trace else None

    # -- the spine
    def run(self) -> RankOutcome:
        budget = self.job.num_steps
        batch_key, batch = None, None
        self.queue.mark("start")
        while budget > 0:
            active = self._active()
            if not active:
                break
            if tuple(s.request_id for s in active) != batch_key:
                batch_key, batch = tuple(s.request_id for s in active), self._batch(active)
            result = self._segment(active, *batch, budget)
            budget -= result.steps
            if result.end in (FAILED, OUT_OF_STEP):
                budget -= 1  # the failed attempt (and its retry) is one of the call's steps
                batch_key = None  # (a retry runs other batches)
                if self._after_failure(active, batch[1], result):
                    break  # out of step: no more exchanges in this job
        self.queue.mark("end")
        self.outcome.trace = self.trace
        return self.outcome

    def _active(self) -> list[DenoiseState]:
        o = self.outcome
        return [s for s in self.job.states if s.request_id not in o.failed and s.request_id not in o.stopped
                and o.steps[s.request_id] < s.prepared.num_steps]

    # -- a batch: its inputs and its graph (or None: eager)
    def _batch(self, active: list[DenoiseState]) -> tuple[Any, Any]:
        start = time.perf_counter()
        inputs = self._inputs(active)
        graph = None
        graphs = self.env.graphs
        if graphs is not None and self.device.type == "cuda" and all(s.cache is None for s in active):
            group = tuple(self.env.devices[i] for i in self.job.device_indices)
            graph = graph_for_batch(graphs, self.job.agreement, self.rank, active, inputs, self.context,
                                    (self.env.runtime.name, self.device, group), self.transformer, self.env.runtime)
        if self.trace is not None:
            self.trace["prepare_s"] += time.perf_counter() - start
        return inputs, graph

    def _inputs(self, active: list[DenoiseState]) -> Any:
        """A rank's static inputs for a batch; a failure is reported by the step that uses them. Whatever
        they read from another device (an adapter may make a shape's inputs with the first device's
        model, SD3's position embedding) is read on this thread's own streams (latents.py)."""
        others = [d for d in self.env.torch_devices if d != self.device]
        try:
            with reading_from(others, [self.device], self.env.options.private_reads):
                return self.env.runtime.adapter.rank_inputs([s.prepared for s in active], self.device,
                                                            self.context.rank, self.context.degree,
                                                            self.context.branch)
        except Exception as exc:
            return exc

    # -- a segment
    def _segment(self, active: list[DenoiseState], inputs: Any, graph: Any, budget: int) -> SegmentResult:
        first_steps = [self.outcome.steps[s.request_id] for s in active]
        spec = SegmentSpec(max_steps=budget, steps_left=[s.prepared.num_steps - i for s, i in zip(active, first_steps)],
                           stop_flags=[s.stop for s in active], exit_flag=self.env.exiting, step=None,
                           on_step=self._progress(active, first_steps), trace=self.trace is not None)
        if graph is not None:
            try:
                graph.begin([s.shards[self.rank] for s in active], [s.prepared for s in active], first_steps, inputs)
            except Exception as exc:  # launched anyway (the peers' exchanges need it), reported at once
                spec.first_error = describe_error(exc)
            spec.step = GraphStep(graph, spec.first_error)
            spec.graph_exchanges = len(graph.exchanges)
            if self.env.options.loop == "native":
                spec.graph_exec = graph.exec_handle
        else:
            eager = EagerStep(self.env.runtime, self.rank, self.job.degree, active, first_steps, self.context,
                              self.transformer, inputs, self.env.log_errors)
            spec.step, spec.commit = eager, eager.commit
        self.queue.mark("batch")
        result = run_segment(self.env.options.loop, self.job.agreement, self.rank, self.queue, spec)
        self._record(active, graph, spec, result)
        return result

    def _record(self, active: list[DenoiseState], graph: Any, spec: SegmentSpec, result: SegmentResult) -> None:
        failed = result.end in (FAILED, OUT_OF_STEP)
        if graph is not None:
            if spec.graph_exec:  # (launches from Python count themselves)
                graph.replays += result.steps + int(failed)
                graph.native_launches += result.steps + int(failed)
            if result.steps and not failed:
                for s, latent in zip(active, graph.end()):
                    s.shards[self.rank] = latent
            elif result.steps:  # steps launched but the latents after the last agreed one are gone
                for s in active:
                    self.outcome.failed.setdefault(s.request_id, "a step after a CUDA graph segment failed: "
                                                   + describe_failure(result.end, result.errors, self._names()))
        for s in active:
            self.outcome.steps[s.request_id] += result.steps
        self.outcome.stopped.update(s.request_id for s in result.stopped(active))
        if self.trace is not None:
            self.trace["segments"].append({"requests": len(active), "graph": graph is not None, "end": result.end,
                                           "steps": result.steps, "phases_s": result.phases_s})

    def _progress(self, active: list[DenoiseState], first_steps: list[int]):
        """Rank 0's per-step callback of a segment (None when nobody listens): on_step(request, step)."""
        on_step = self.job.on_step
        if self.rank != 0 or on_step is None:
            return None
        ids = [s.request_id for s in active]

        def progress(k: int) -> None:
            for rid, first in zip(ids, first_steps):
                if rid in self.outcome.failed:
                    continue
                try:
                    on_step(rid, first + k + 1)
                except Exception:  # a caller's callback must not stop the steps
                    traceback.print_exc()

        return progress

    # -- failures
    def _after_failure(self, active: list[DenoiseState], graph: Any, result: SegmentResult) -> bool:
        """Fail what must fail after a failed step -> whether the job must stop (out of step)."""
        kind, message = result.end, describe_failure(result.end, result.errors, self._names())
        if kind == FAILED and len(active) > 1 and not (graph is not None and result.steps):
            kind, message = self._retry_alone(active)
            if kind is None:
                return False
        for s in active:
            self.outcome.failed.setdefault(s.request_id, message)
        return kind == OUT_OF_STEP

    def _retry_alone(self, active: list[DenoiseState]) -> tuple[str | None, str | None]:
        """After a failed batched step, each request of the batch one step alone, eagerly: only those
        that fail alone fail. -> (OUT_OF_STEP, message) if the group went out of step, else (None, None)."""
        for s in active:
            first = self.outcome.steps[s.request_id]
            eager = EagerStep(self.env.runtime, self.rank, self.job.degree, [s], [first], self.context,
                              self.transformer, self._inputs([s]), self.env.log_errors)
            spec = SegmentSpec(max_steps=1, steps_left=[s.prepared.num_steps - first], stop_flags=[s.stop],
                               exit_flag=self.env.exiting, step=eager, commit=eager.commit,
                               on_step=self._progress([s], [first]))
            result = run_segment(self.env.options.loop, self.job.agreement, self.rank, self.queue, spec)
            self.outcome.steps[s.request_id] += result.steps
            self.outcome.stopped.update(x.request_id for x in result.stopped([s]))
            if result.end in (FAILED, OUT_OF_STEP):
                message = describe_failure(result.end, result.errors, self._names())
                self.outcome.failed[s.request_id] = message
                if result.end == OUT_OF_STEP:
                    return OUT_OF_STEP, message
        return None, None

    def _names(self) -> list[str]:
        return [self.env.devices[i] for i in self.job.device_indices]
