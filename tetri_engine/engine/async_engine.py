"""AsyncEngine: the round clock, admission, request tracking and outputs of tetri-engine.

One asyncio event loop (any loop; the CLI uses uvloop when installed) owns every piece of engine
state. The executor's worker threads (one per device) run the steps and never touch the loop: the
loop hands each plan's groups to them and awaits their `concurrent.futures.Future`s through
`asyncio.wrap_future`; step progress comes back through `loop.call_soon_threadsafe`.

The round clock (`_round_loop`):

    1. plan   : policy.schedule(now) with the real monotonic time -> RoundPlan (groups of devices)
    2. launch : executor.submit_steps(...) per group (the executor moves latents that change group)
    3. wait   : for the first of {a group finishing, a new request / abort / shutdown}
    4. report : policy.update_from_output(plan, RoundResult(...)) for each finished group, then
                finish the requests that completed, failed or were cancelled; back to 1.

TetriServe's policy is round-synchronous (its schedule() plans nothing while a round is in flight),
so with it this is exactly the paper's round clock; the FCFS/EDF baselines are event driven (idle
devices are planned as soon as they free up), and the same loop serves both. When there is nothing
to do the loop sleeps on an asyncio.Event (no polling).

A request's life: admitted (validated, deadline fixed, "queued" output) -> prompt encoded on the
executor -> known to the policy -> rounds ("round" and "step" outputs) -> decoded right after its
last step (the plan's decode_after) -> exactly one "final" output with its terminal state.

Metrics reported per request (RequestMetrics):
  queue_s   arrival -> first round that gave it devices, minus its encode time (waiting only);
  encode_s  the executor's prompt-encode time; denoise_s: sum of its groups' step time;
  decode_s  VAE decode + PNG; total_s: arrival -> final output;
  deadline_met  finish time <= arrival + deadline (None for cancelled requests);
  peak_memory_bytes  GPU: the highest torch.cuda.max_memory_allocated on its devices during its
            groups (device-wide, measured by the executor); CPU: the process's peak resident set
            (getrusage), which covers everything the process did, not this request alone.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import resource
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from tetri_engine.config import EngineConfig
from tetri_engine.engine.admission import ModelLimits, validate_request
from tetri_engine.engine.stats import EngineCounters, GroupRecord, RoundRecord
from tetri_engine.engine.tracker import TrackedRequest
from tetri_engine.errors import EngineNotRunning, RequestRejected
from tetri_engine.request import GenerationOutput, GenerationRequest, RequestState

log = logging.getLogger("tetri_engine.engine")

ROUND_LOG_SIZE = 10_000  # rounds kept for round_records() (the demo's schedule and Gantt)
ADMISSION_MODES = ("reject", "best_effort")


def resolve_devices(config: EngineConfig) -> list[str]:
    """The engine's devices: as configured, else every visible GPU, else `num_cpu_devices` CPU ones."""
    if config.devices:
        devices = [str(d).strip() for d in config.devices]
        kinds = set()
        for name in devices:
            kind, _, index = name.partition(":")
            if kind not in ("cuda", "cpu") or not index.isdigit():
                raise ValueError(f"device {name!r} is not of the form 'cuda:N' or 'cpu:N'")
            kinds.add(kind)
        if len(kinds) > 1:
            raise ValueError(f"devices mix GPUs and CPU devices: {devices}")
        if len(set(devices)) != len(devices):
            raise ValueError(f"devices are listed twice: {devices}")
        return devices
    import torch

    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_gpus:
        return [f"cuda:{i}" for i in range(num_gpus)]
    if config.num_cpu_devices < 1:
        raise ValueError("num_cpu_devices must be >= 1")
    return [f"cpu:{i}" for i in range(config.num_cpu_devices)]


def check_config(config: EngineConfig) -> None:
    if config.admission not in ADMISSION_MODES:
        raise ValueError(f"admission={config.admission!r}: choose from {', '.join(ADMISSION_MODES)}")
    if config.max_queue < 1:
        raise ValueError("max_queue must be >= 1")
    if config.round_steps < 1:
        raise ValueError("round_steps must be >= 1")
    if config.round_s is not None and not config.round_s > 0:
        raise ValueError("round_s must be > 0 seconds")
    if not config.slo_scale > 0:
        raise ValueError("slo_scale must be > 0")


@dataclass
class _InflightGroup:
    plan: Any  # sched.RoundPlan
    index: int  # which group of the plan
    dispatch_s: float  # monotonic


@dataclass
class _OpenRound:
    plan: Any
    start_s: float  # monotonic, when schedule() was called
    plan_s: float
    groups: dict[int, GroupRecord]


class AsyncEngine:
    """The embedded engine. See the module docstring; the contract is docs/ARCHITECTURE.md, `engine`.

        engine = AsyncEngine(EngineConfig(model="tiny", devices=["cpu:0", "cpu:1", "cpu:2", "cpu:3"]))
        async with engine:
            async for out in engine.generate(GenerationRequest(prompt="a red fox", width=512, height=512)):
                ...
    """

    def __init__(self, config: EngineConfig | None = None, *, policy_factory: Callable[..., Any] | None = None):
        """policy_factory: optional `(num_devices, cost) -> sched.Policy`, a policy of your own
        instead of `config.policy` (research, tests); it sees the same protocol as the built-in ones."""
        self.config = config if config is not None else EngineConfig()
        self._policy_factory = policy_factory
        check_config(self.config)
        self._devices = resolve_devices(self.config)
        self._phase = "created"  # created -> starting -> ready -> draining -> stopped
        self._runtime = None
        self._executor = None
        self._comm_cache = None
        self._cost = None
        self._policy = None
        self._limits: ModelLimits | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None  # set on anything the round loop must look at
        self._all_finished: asyncio.Event | None = None  # set while no request is live
        self._round_task: asyncio.Task | None = None
        self._shutdown_task: asyncio.Task | None = None
        self._stop_loop = False
        self._live: dict[str, TrackedRequest] = {}  # request_id -> accepted, not yet terminal
        self._inflight: dict[asyncio.Future, _InflightGroup] = {}
        self._open_rounds: dict[int, _OpenRound] = {}
        self._round_log: collections.deque[RoundRecord] = collections.deque(maxlen=ROUND_LOG_SIZE)
        self._counters: EngineCounters | None = None
        self._t0_s = 0.0  # monotonic time of start(); round records count from here
        self._is_cuda = self._devices[0].startswith("cuda")

    # ---- properties the server reads -----------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._phase == "ready"

    @property
    def is_draining(self) -> bool:
        return self._phase == "draining"

    @property
    def devices(self) -> list[str]:
        return list(self._devices)

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def policy_name(self) -> str:
        return self._policy.name if self._policy is not None else self.config.policy

    @property
    def started_s(self) -> float:
        """Monotonic time the engine became ready: round records count their times from here."""
        return self._t0_s

    @property
    def runtime(self):
        """The model runtime (None before start())."""
        return self._runtime

    @property
    def default_steps(self) -> int | None:
        """The model's default number of steps (None before start())."""
        return self._runtime.default_steps if self._runtime is not None else None

    def busy_devices(self) -> list[str]:
        """Devices running a group's steps right now."""
        busy = {d for info in self._inflight.values() for d in info.plan.groups[info.index].device_ids}
        return [self._devices[i] for i in sorted(busy)]

    @property
    def cost_model(self):
        """The sched.CostModel the engine schedules with (None before start())."""
        return self._cost

    @property
    def executor(self):
        """The executor (None before start()); for placement checks and benchmarks."""
        return self._executor

    # ---- life cycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> "AsyncEngine":
        await self.start()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        # A body that raised does not wait for the queue to drain: it cancels what is left.
        await self.shutdown(drain=exc_type is None)

    async def start(self) -> None:
        """Load the model on the devices, start the executor threads, load or measure the cost
        model, and start the round clock. Slow work runs in a thread: the loop stays responsive."""
        if self._phase != "created":
            raise RuntimeError(f"an AsyncEngine starts once (it is {self._phase})")
        self._phase = "starting"
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._all_finished = asyncio.Event()
        self._all_finished.set()
        try:
            await asyncio.to_thread(self._load)
            from tetri_engine.sched import make_policy

            if self._policy_factory is not None:
                self._policy = self._policy_factory(len(self._devices), self._cost)
            else:
                self._policy = make_policy(self.config.policy, len(self._devices), self._cost,
                                           round_steps=self.config.round_steps, round_s=self.config.round_s)
            # Communicators for every group the policy may use, created now rather than in a round.
            groups = [tuple(self._devices[i] for i in g) for g in self._policy.candidate_groups()]
            if groups:
                await asyncio.to_thread(self._comm_cache.warmup, groups)
        except BaseException:
            self._phase = "stopped"
            if self._executor is not None:
                await asyncio.to_thread(self._executor.shutdown)
            raise
        self._t0_s = time.monotonic()
        self._counters = EngineCounters(num_devices=len(self._devices), started_s=self._t0_s)
        self._round_task = self._loop.create_task(self._round_loop(), name="tetri-engine round clock")
        self._phase = "ready"
        log.info("engine ready: model %s on %s, policy %s, round %.3f s", self.config.model,
                 ",".join(self._devices), self._policy.name, self._policy.round_s)

    def _load(self) -> None:
        from tetri_engine import ops
        from tetri_engine.engine.profiling import load_or_measure_profile
        from tetri_engine.executor import Executor
        from tetri_engine.model import load_runtime
        from tetri_engine.sched import CostModel

        self._runtime = load_runtime(self.config.model, devices=self._devices, dtype=self.config.dtype)
        self._limits = ModelLimits(patch_px=self._runtime.patch_px, default_steps=self._runtime.default_steps,
                                   default_guidance=self._runtime.default_guidance)
        self._comm_cache = ops.CommCache(capacity=self.config.comm_cache_size)
        self._executor = Executor(self._runtime, self._devices, self._comm_cache,
                                  cuda_graphs=self.config.cuda_graphs)  # graphs: GPU only
        if self.config.profile:
            self._cost = CostModel.from_json(self.config.profile)
        else:
            profile = load_or_measure_profile(self._runtime, self._executor, self._devices,
                                              self.config.model, cache_dir=self.config.cache_dir,
                                              max_width=self.config.max_width, max_height=self.config.max_height)
            self._cost = CostModel.from_dict(profile)

    async def switch_policy(self, policy: str | None = None, *,
                            policy_factory: Callable[..., Any] | None = None) -> None:
        """Schedule with another policy from now on, keeping the loaded model, communicators and CUDA
        graphs (to compare policies on a warm engine: bench/e2e_slo.py). Only while idle: raises
        RuntimeError when a request is live. Resets the counters and round records, as at start().
        policy: a `sched.make_policy` name; policy_factory: as in the constructor."""
        if self._phase != "ready":
            raise RuntimeError(f"switch_policy needs a ready engine (it is {self._phase})")
        if self._live or self._inflight:
            raise RuntimeError(f"switch_policy needs an idle engine ({len(self._live)} requests are live)")
        if (policy is None) == (policy_factory is None):
            raise ValueError("give exactly one of policy (a name) or policy_factory")
        from tetri_engine.sched import make_policy

        if policy_factory is not None:
            new = policy_factory(len(self._devices), self._cost)
        else:
            new = make_policy(policy, len(self._devices), self._cost,
                              round_steps=self.config.round_steps, round_s=self.config.round_s)
        groups = [tuple(self._devices[i] for i in g) for g in new.candidate_groups()]
        if groups:
            await asyncio.to_thread(self._comm_cache.warmup, groups)
        self._policy = new
        self._open_rounds.clear()
        self._round_log.clear()
        self._t0_s = time.monotonic()
        self._counters = EngineCounters(num_devices=len(self._devices), started_s=self._t0_s)
        log.info("engine policy switched to %s, round %.3f s", new.name, new.round_s)

    async def shutdown(self, drain: bool = True) -> None:
        """Stop the engine. drain=True: refuse new requests ("draining") and finish every accepted
        one first. drain=False: cancel every accepted request (final state CANCELLED, with a message
        saying so); running ones stop at their next step boundary. Idempotent."""
        if self._phase == "created":
            self._phase = "stopped"
            return
        if self._phase == "ready":  # from now on, new requests are refused with "draining"
            self._phase = "draining"
        if not drain:
            self._cancel_all("cancelled: the engine shut down without draining")
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self) -> None:
        while self._phase == "starting":  # start() is still loading: let it finish first
            await asyncio.sleep(0.05)
        if self._phase == "stopped":
            return
        self._phase = "draining"
        await self._all_finished.wait()
        self._stop_loop = True
        self._wake.set()
        if self._round_task is not None:
            await self._round_task
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown)
        self._phase = "stopped"
        log.info("engine stopped")

    def _cancel_all(self, reason: str) -> None:
        for tracked in list(self._live.values()):
            self._request_stop(tracked, reason)

    # ---- requests ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Outputs of one request: "queued" first, then "round"/"step"/"preview", then one "final".

        Admission errors raise from the first __anext__: RequestRejected (queue_full,
        deadline_impossible, draining) or ValueError (invalid input). Leaving the iterator early
        (break + aclose, task cancelled, client gone) cancels the request; a running one stops at its
        next step boundary and its devices go back to the scheduler.
        """
        tracked = self._admit(request)
        try:
            while True:
                output = await tracked.outputs.get()
                yield output
                if output.kind == "final":
                    return
        finally:
            # GeneratorExit (break / aclose / garbage collected) or CancelledError (task cancelled).
            if not tracked.state.is_terminal:
                self._request_stop(tracked, "cancelled: the client stopped reading the output stream")

    async def abort(self, request_id: str) -> bool:
        """Cancel a request. Returns when it has ended (a running one: after its current step, once
        its devices are free); False when no such request is live."""
        tracked = self._live.get(request_id)
        if tracked is None:
            return False
        self._request_stop(tracked, "cancelled: aborted")
        await tracked.finished_event.wait()
        return True

    def request_state(self, request_id: str) -> RequestState | None:
        """The state of a live request, None when it is unknown or has ended."""
        tracked = self._live.get(request_id)
        return tracked.state if tracked is not None else None

    def placement(self, request_id: str) -> tuple[str, ...]:
        """Devices that hold the request's latent now (empty when none: not started, or released)."""
        if self._executor is None:
            return ()
        indices = self._executor.placement(request_id)
        return tuple(self._devices[i] for i in indices) if indices else ()

    def _admit(self, request: GenerationRequest) -> TrackedRequest:
        try:
            return self._admit_or_raise(request)
        except RequestRejected:
            if self._counters is not None:
                self._counters.states[RequestState.REJECTED.value] += 1
            raise

    def _admit_or_raise(self, request: GenerationRequest) -> TrackedRequest:
        if self._phase in ("created", "starting"):
            raise EngineNotRunning("the engine is not started: use `async with engine:` or `await engine.start()`")
        if self._phase == "stopped":
            raise EngineNotRunning("the engine is stopped")
        req = validate_request(request, self.config, self._limits)
        self._runtime.check_size(req.width, req.height)  # model-specific limits (e.g. SD3's grid)
        try:
            self._cost.check(req.width, req.height)
        except ValueError as exc:
            raise ValueError(f"{req.width}x{req.height} cannot be scheduled on this engine: {exc}") from None
        if req.request_id in self._live:
            raise ValueError(f"request_id {req.request_id!r} is already in use by a live request")
        if self._phase == "draining":
            raise RequestRejected("the engine is draining (shutting down) and takes no new requests",
                                  reason="draining", retry_after_s=None)
        if len(self._live) >= self.config.max_queue:
            raise RequestRejected(
                f"queue full: {len(self._live)} requests are waiting or running (max_queue={self.config.max_queue})",
                reason="queue_full", retry_after_s=self._retry_after_s())

        from tetri_engine.sched import slo_s

        now_s = time.monotonic()
        steps = req.num_inference_steps
        if req.deadline_s is not None:
            deadline_rel_s = float(req.deadline_s)
        else:
            deadline_rel_s = slo_s(req.width, req.height, steps, cost=self._cost, scale=req.slo_scale,
                                   max_degree=self._policy.max_degree)
        fastest_s = self._policy.min_finish_s(req.width, req.height, steps, now_s, cached=req.cache == "auto") - now_s
        best_effort = False
        if fastest_s > deadline_rel_s:
            if self.config.admission == "reject":
                raise RequestRejected(
                    f"deadline {deadline_rel_s:.3g} s cannot be met: {req.width}x{req.height} in {steps} steps "
                    f"takes at least {fastest_s:.3g} s here, even alone on {self._policy.max_degree} device(s)",
                    reason="deadline_impossible", retry_after_s=None)
            best_effort = True

        tracked = TrackedRequest(request=req, arrival_s=now_s, deadline_at_s=now_s + deadline_rel_s,
                                 deadline_rel_s=deadline_rel_s, best_effort=best_effort)
        waiting_ahead = sum(1 for t in self._live.values() if t.first_round_s is None)
        self._live[req.request_id] = tracked
        self._all_finished.clear()
        tracked.outputs.put_nowait(tracked.output("queued", queue_position=waiting_ahead))
        self._submit_encode(tracked)
        return tracked

    def _retry_after_s(self) -> float:
        """Hint for a client refused with queue_full: when the soonest live request should end."""
        soonest_s = math.inf
        for t in self._live.values():
            remaining = t.total_steps - t.steps_done
            soonest_s = min(soonest_s, self._cost.isolated_s(t.width, t.height, remaining, self._policy.max_degree))
        return round(max(0.1, soonest_s if math.isfinite(soonest_s) else 1.0), 3)

    def _submit_encode(self, tracked: TrackedRequest) -> None:
        tracked.encode_submitted_s = time.monotonic()
        self._loop.create_task(self._encode(tracked), name=f"encode {tracked.request_id}")

    async def _encode(self, tracked: TrackedRequest) -> None:
        """Prompt encode on the executor; then the request joins the policy (unless it ended meanwhile)."""
        from tetri_engine.sched import SchedRequest

        rid = tracked.request_id
        error = None
        try:
            # shield: cancelling this task (loop teardown) must not cancel the executor's own future.
            result = await asyncio.shield(
                asyncio.wrap_future(self._executor.submit_encode(rid, tracked.request), loop=self._loop))
            tracked.encode_s = result.encode_s
        except Exception as exc:
            error = f"prompt encoding failed: {type(exc).__name__}: {exc}"
        if tracked.state.is_terminal:  # cancelled while it was encoding: drop what the executor holds
            self._release(rid)
            return
        if error is not None:
            self._finish(tracked, RequestState.FAILED, error=error)
            return
        req = tracked.request
        try:
            self._policy.add_request(SchedRequest(rid, req.width, req.height, req.num_inference_steps,
                                                  arrival_s=tracked.arrival_s, deadline_s=tracked.deadline_at_s,
                                                  cached=req.cache == "auto"))
        except Exception as exc:
            self._finish(tracked, RequestState.FAILED, error=f"the scheduler refused it: {exc}")
            return
        tracked.encoded = True
        self._wake.set()

    def _request_stop(self, tracked: TrackedRequest, reason: str) -> None:
        """Cancel a live request: at once unless its steps are running, else when its group reports."""
        if tracked.state.is_terminal:
            return
        if tracked.in_round:
            tracked.cancel_reason = tracked.cancel_reason or reason
            # The executor stops it at its next step boundary; its group then reports early, or goes
            # on for its batch-mates only.
            self._executor.cancel(tracked.request_id)
            return
        self._finish(tracked, RequestState.CANCELLED, error=reason)

    def _release(self, request_id: str) -> None:
        try:
            self._executor.release(request_id)
        except Exception:  # releasing must never take the engine down
            log.exception("releasing %s failed", request_id)

    def _finish(self, tracked: TrackedRequest, state: RequestState, *, error: str | None = None,
                image: Any = None, png: bytes | None = None) -> None:
        """The one place a request becomes terminal; its one "final" output goes out here."""
        if tracked.state.is_terminal:
            return
        rid = tracked.request_id
        tracked.state = state
        tracked.finished_s = time.monotonic()
        if tracked.encoded:
            self._policy.abort(rid)  # no-op when the policy already dropped it (completed / failed)
        if not tracked.in_round:
            self._release(rid)
        if not self._is_cuda:
            tracked.peak_memory_bytes = max(tracked.peak_memory_bytes, _process_peak_rss_bytes())
        self._live.pop(rid, None)
        counters = self._counters
        counters.states[state.value] += 1
        metrics = tracked.metrics()
        if metrics.deadline_met is not None:
            counters.deadline_total += 1
            counters.deadline_met += int(metrics.deadline_met)
        tracked.outputs.put_nowait(tracked.output("final", image=image, png=png, metrics=metrics, error=error,
                                                  devices=self._names(tracked.device_ids),
                                                  degree=len(tracked.device_ids)))
        tracked.finished_event.set()
        if not self._live:
            self._all_finished.set()
        self._wake.set()

    def _names(self, device_ids) -> tuple[str, ...]:
        return tuple(self._devices[i] for i in device_ids)

    # ---- the round clock -----------------------------------------------------------------------

    async def _round_loop(self) -> None:
        while True:
            self._wake.clear()
            if self._stop_loop and not self._inflight:
                return
            if not self._stop_loop:
                try:
                    self._launch_next_plan()
                except Exception as exc:  # a scheduler bug must not hang the clients
                    log.exception("planning a round failed")
                    self._fail_unplanned(f"internal error while planning a round: {type(exc).__name__}: {exc}")
            waiters: set[asyncio.Future] = set(self._inflight)
            wake = self._loop.create_task(self._wake.wait())
            waiters.add(wake)
            try:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not wake.done():
                    wake.cancel()
            for future in done:
                info = self._inflight.pop(future, None)
                if info is None:
                    continue
                try:
                    self._complete_group(future, info)
                except Exception as exc:  # an engine bug: fail the group's requests rather than hang them
                    log.exception("handling a finished group failed")
                    self._fail_group_after_error(info, f"internal error after a round: {type(exc).__name__}: {exc}")

    def _launch_next_plan(self) -> None:
        if not self._policy.has_work():
            return
        now_s = time.monotonic()
        plan = self._policy.schedule(now_s)
        plan_s = time.monotonic() - now_s
        if plan.is_empty:
            return
        self._open_rounds[plan.round_index] = _OpenRound(plan, now_s, plan_s, {})
        for index, group in enumerate(plan.groups):
            dispatch_s = time.monotonic()
            try:
                future = self._launch_group(group)
            except Exception as exc:  # refused at once, or a bookkeeping bug: the group fails as a unit
                log.exception("launching a group of round %d failed", plan.round_index)
                future = self._loop.create_future()
                future.set_exception(exc)
            self._inflight[future] = _InflightGroup(plan, index, dispatch_s)

    def _launch_group(self, group) -> asyncio.Future:
        names = self._names(group.device_ids)
        missing = [rid for rid in group.request_ids if rid not in self._live]
        if missing:
            raise RuntimeError(f"the policy planned requests the engine does not hold: {missing}")
        now_s = time.monotonic()
        for rid in group.request_ids:
            tracked = self._live[rid]
            if tracked.first_round_s is None:
                tracked.first_round_s = now_s
            tracked.state = RequestState.RUNNING
            tracked.in_round = True
            tracked.device_ids = tuple(group.device_ids)
            tracked.outputs.put_nowait(tracked.output("round", degree=len(names), devices=names))
        cf = self._executor.submit_steps(list(group.request_ids), list(group.device_ids), group.num_steps,
                                         on_step=self._make_on_step(), decode_after=group.decode_after)
        return asyncio.wrap_future(cf, loop=self._loop)

    def _make_on_step(self):
        loop = self._loop

        def on_step(request_id: str, step: int) -> None:  # runs on an executor thread
            try:
                loop.call_soon_threadsafe(self._on_step, request_id, step)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

        return on_step

    def _on_step(self, request_id: str, step: int) -> None:
        tracked = self._live.get(request_id)
        if tracked is None or tracked.state.is_terminal or step <= tracked.last_step_reported:
            return
        tracked.last_step_reported = step
        names = self._names(tracked.device_ids)
        tracked.outputs.put_nowait(tracked.output("step", step=step, degree=len(names), devices=names))
    def _complete_group(self, future: asyncio.Future, info: _InflightGroup) -> None:
        from tetri_engine.sched import RoundResult

        group = info.plan.groups[info.index]
        end_s = time.monotonic()
        steps_done: dict[str, int] = {}
        errors: dict[str, str] = {}
        images: dict[str, tuple[Any, bytes | None]] = {}
        executor_s = 0.0
        group_error = None
        exc = future.exception()
        if exc is not None:
            group_error = f"the group on {','.join(self._names(group.device_ids))} failed: {type(exc).__name__}: {exc}"
            errors = {rid: group_error for rid in group.request_ids}
        else:
            result = future.result()
            executor_s = result.seconds + result.regroup_s + result.decode_s
            for rid in group.request_ids:
                r = result.requests.get(rid)
                if r is None:
                    errors[rid] = "the executor returned no result for it"
                    continue
                # A request the executor cancelled (see `_request_stop`) is no failure: the policy
                # learns the steps it really did, and the request ends CANCELLED below.
                if r.error is not None and not r.cancelled:
                    errors[rid] = r.error
                else:
                    steps_done[rid] = r.steps_done
                tracked = self._live.get(rid)
                if tracked is None:
                    continue
                if r.cancelled and tracked.cancel_reason is None:
                    tracked.cancel_reason = "cancelled: stopped by the executor"  # (never planned again)
                tracked.denoise_s += r.seconds
                tracked.decode_s += r.decode_s
                if r.steps_done:
                    degree = len(group.device_ids)
                    tracked.steps_at_degree[degree] = tracked.steps_at_degree.get(degree, 0) + r.steps_done
                    self._counters.step_latency.add(r.seconds / r.steps_done)
                if r.regrouped:
                    tracked.regroups += 1
                    self._counters.regroups += 1
                tracked.steps_done = r.step
                if r.image is not None:
                    images[rid] = (r.image, r.png)
            stats = getattr(self._executor, "request_stats", None)
            if self._is_cuda and stats is not None:
                for rid in group.request_ids:
                    tracked = self._live.get(rid)
                    if tracked is not None:
                        try:
                            tracked.peak_memory_bytes = int(stats(rid).get("peak_memory_bytes", 0))
                        except Exception:
                            pass

        self._record_group(info, group, end_s, steps_done, executor_s, group_error)
        try:
            self._policy.update_from_output(info.plan, RoundResult(end_s=end_s, steps_done=steps_done,
                                                                   failed=set(errors)))
        except Exception as exc:  # the policy's books are off for these requests: they cannot go on
            log.exception("policy.update_from_output failed for round %d", info.plan.round_index)
            error = f"internal error in the scheduler after a round: {type(exc).__name__}: {exc}"
            errors = {rid: error for rid in group.request_ids}
        for rid in group.request_ids:
            tracked = self._live.get(rid)
            if tracked is None:
                continue
            tracked.in_round = False
            if rid in errors:
                self._finish(tracked, RequestState.FAILED, error=errors[rid])
            elif tracked.cancel_reason is not None:
                self._finish(tracked, RequestState.CANCELLED, error=tracked.cancel_reason)
            elif tracked.steps_done < tracked.total_steps:
                self._maybe_preview(tracked)
            else:
                if rid in images:
                    image, png = images[rid]
                    self._finish(tracked, RequestState.COMPLETED, image=image, png=png)
                else:  # the plan did not decode it (should not happen: decode_after is set on its last group)
                    self._decode_later(tracked, group.device_ids[0])

    def _maybe_preview(self, tracked: TrackedRequest) -> None:
        """A preview at this round boundary when the request crossed a multiple of preview_every.
        Previews come at round boundaries (the latent is only whole and idle between groups)."""
        every = tracked.request.preview_every
        if every <= 0 or tracked.steps_done // every <= tracked.last_preview_step // every:
            return
        tracked.last_preview_step = tracked.steps_done
        from tetri_engine.engine.preview import latent_preview

        try:
            # Idle now (its group just finished and nothing new was submitted): returns at once.
            latent = self._executor.latent(tracked.request_id, timeout_s=0.5)
            image = latent_preview(latent, tracked.width, tracked.height)
        except Exception:  # a preview is optional: never fail the request for one
            log.debug("preview of %s failed", tracked.request_id, exc_info=True)
            return
        names = self._names(tracked.device_ids)
        tracked.outputs.put_nowait(tracked.output("preview", image=image, degree=len(names), devices=names))

    def _decode_later(self, tracked: TrackedRequest, device_id: int) -> None:
        tracked.in_round = True  # its latent is still in use: a cancel waits for the decode
        future = asyncio.wrap_future(self._executor.submit_decode(tracked.request_id, device_id), loop=self._loop)
        started_s = time.monotonic()

        def done(f: asyncio.Future) -> None:
            tracked.in_round = False
            tracked.decode_s += time.monotonic() - started_s
            if f.cancelled() or f.exception() is not None:
                error = "decode was cancelled" if f.cancelled() else f"decode failed: {f.exception()}"
                self._finish(tracked, RequestState.FAILED, error=error)
            elif tracked.cancel_reason is not None:
                self._finish(tracked, RequestState.CANCELLED, error=tracked.cancel_reason)
            else:
                image, png = f.result()
                self._finish(tracked, RequestState.COMPLETED, image=image, png=png)

        future.add_done_callback(done)

    def _record_group(self, info: _InflightGroup, group, end_s: float, steps_done: dict[str, int],
                      executor_s: float, error: str | None) -> None:
        record = GroupRecord(request_ids=tuple(group.request_ids), device_ids=tuple(group.device_ids),
                             devices=self._names(group.device_ids), planned_steps=group.num_steps,
                             steps_done=dict(steps_done), executor_s=executor_s,
                             start_s=info.dispatch_s - self._t0_s, end_s=end_s - self._t0_s, error=error)
        open_round = self._open_rounds.get(info.plan.round_index)
        if open_round is None:
            return
        open_round.groups[info.index] = record
        if len(open_round.groups) == len(info.plan.groups):
            del self._open_rounds[info.plan.round_index]
            round_record = RoundRecord(
                index=info.plan.round_index, start_s=open_round.start_s - self._t0_s, end_s=end_s - self._t0_s,
                plan_s=open_round.plan_s,
                groups=tuple(open_round.groups[i] for i in range(len(info.plan.groups))))
            self._round_log.append(round_record)
            self._counters.record_round(round_record)

    # ---- faults in the loop itself -------------------------------------------------------------

    def _fail_unplanned(self, error: str) -> None:
        """schedule() raised: the policy's state is suspect, so fail what it holds that is not running
        (running groups still report normally)."""
        for tracked in list(self._live.values()):
            if tracked.encoded and not tracked.in_round:
                self._finish(tracked, RequestState.FAILED, error=error)

    def _fail_group_after_error(self, info: _InflightGroup, error: str) -> None:
        request_ids = info.plan.groups[info.index].request_ids
        for rid in request_ids:
            tracked = self._live.get(rid)
            if tracked is not None:
                tracked.in_round = False
                self._finish(tracked, RequestState.FAILED, error=error)
        self._open_rounds.pop(info.plan.round_index, None)
        try:  # free the group's devices in the policy, if its books allow
            from tetri_engine.sched import RoundResult

            self._policy.update_from_output(info.plan, RoundResult(end_s=time.monotonic(), failed=set(request_ids)))
        except Exception:
            log.exception("could not report the failed group to the policy")

    # ---- observation ---------------------------------------------------------------------------

    def round_records(self) -> list[RoundRecord]:
        """Completed rounds, oldest first (the last ROUND_LOG_SIZE): what ran where, for how long."""
        return list(self._round_log)

    def live_requests(self) -> list[dict[str, Any]]:
        """The requests accepted and not yet ended, oldest first, for live views (/dashboard). Read-only.

        Times are seconds since the engine started, the clock of round_records(). Each dict:
        request_id, width, height, num_steps, steps_done, state ("waiting": has not run yet,
        "running": has), arrival_s, deadline_s; slack_s = time left to the deadline minus the fastest
        it could still finish (remaining steps at the fastest degree, then decode); late = it cannot
        make its deadline any more: slack_s < 0 (the policies' own test for RoundPlan.late, applied
        now; true once the deadline has passed) or a plan in flight marks it late. Late is decided
        here only, so a better notion from the scheduler plugs in at one place. devices and
        group_start_s: the group running its steps now ([] and None when it is in none).
        """
        if self._policy is None or self._phase == "stopped":
            return []
        now_s = time.monotonic()
        marked_late = {rid for info in self._inflight.values() for rid in info.plan.late}
        in_group = {rid: info for info in self._inflight.values() for rid in info.plan.groups[info.index].request_ids}
        out = []
        for t in self._live.values():
            fastest_s = self._cost.isolated_s(t.width, t.height, t.total_steps - t.steps_done,
                                              self._policy.max_degree, cached=t.request.cache == "auto")
            info = in_group.get(t.request_id)
            slack_s = t.deadline_at_s - now_s - fastest_s
            out.append({
                "request_id": t.request_id, "width": t.width, "height": t.height,
                "num_steps": t.total_steps, "steps_done": t.steps_done,
                "state": "waiting" if t.first_round_s is None else "running",
                "arrival_s": t.arrival_s - self._t0_s, "deadline_s": t.deadline_at_s - self._t0_s,
                "slack_s": slack_s, "late": slack_s < 0 or t.request_id in marked_late,
                "devices": list(self._names(info.plan.groups[info.index].device_ids)) if info else [],
                "group_start_s": info.dispatch_s - self._t0_s if info else None,
            })
        return out

    def stats(self) -> dict[str, Any]:
        """Engine figures for /health and /metrics (docs/ARCHITECTURE.md, `engine`).

        Latency entries are the most recent raw samples in seconds (at most 1000 each), with
        `*_count` and `*_sum_s` over the engine's life (the server folds them into histograms).
        "states" counts requests by state: waiting/running now, terminal ones since start-up
        (rejected included). SAR = deadline_met / deadline_total over requests that completed or
        failed (cancelled and rejected requests are not counted).
        """
        counters = self._counters
        if counters is None:
            return {"phase": self._phase, "queue_depth": 0, "running": 0, "states": {}, "sar": None,
                    "deadline_met": 0, "deadline_total": 0, "device_busy_fraction": {d: 0.0 for d in self._devices},
                    "regroups": 0, "comm_cache": {}, "step_latency_s": [], "round_latency_s": [], "rounds": 0}
        states = {s.value: 0 for s in RequestState}
        states.update(counters.states)
        waiting = sum(1 for t in self._live.values() if t.first_round_s is None)
        running = len(self._live) - waiting
        states[RequestState.WAITING.value] = waiting
        states[RequestState.RUNNING.value] = running
        busy = counters.busy_fractions(time.monotonic())
        return {
            "phase": self._phase,
            "model": self.config.model,
            "policy": self._policy.name,
            "devices": list(self._devices),
            "queue_depth": waiting,
            "running": running,
            "states": states,
            "sar": counters.deadline_met / counters.deadline_total if counters.deadline_total else None,
            "deadline_met": counters.deadline_met,
            "deadline_total": counters.deadline_total,
            "device_busy_fraction": dict(zip(self._devices, busy)),
            "regroups": counters.regroups,
            "comm_cache": self._comm_cache.stats() if self._comm_cache is not None else {},
            "rounds": counters.rounds,
            "round_s_target": self._policy.round_s,
            "step_latency_s": counters.step_latency.recent(),
            "step_latency_count": counters.step_latency.count,
            "step_latency_sum_s": counters.step_latency.sum_s,
            "round_latency_s": counters.round_latency.recent(),
            "round_latency_count": counters.round_latency.count,
            "round_latency_sum_s": counters.round_latency.sum_s,
            "plan_latency_s": counters.plan_latency.recent(),
            "round_overhead_s": counters.round_overhead.recent(),
        }


def _process_peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
