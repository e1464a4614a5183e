"""AsyncEngine: the embedded engine's front end (generate, abort, shutdown, stats) over the engine core.

    AsyncEngine  life cycle (start, switch_policy, shutdown) and the public API; admits requests
      Admission    validation, defaults, deadline, queue bound (admission.py)
      EngineCore   the round clock: policy -> executor -> policy (core.py)
        RequestTracker  live requests, outputs, metrics, cancellation, the one terminal transition (tracker.py)
      Executor     the model and the per-device threads (tetri_engine.executor): the engine knows the
                   model only through `executor.model`

A request's life: admitted (validated, deadline fixed, "queued" output) -> prompt encoded on the
executor -> known to the policy -> groups ("round" and "step" outputs, previews between them) ->
decoded right after its last step (the plan's decode_after) -> exactly one "final" output with its
terminal state and metrics (docs/ARCHITECTURE.md, `engine`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable

from tetri_engine.config import EngineConfig
from tetri_engine.engine.admission import Admission, ModelLimits
from tetri_engine.engine.core import EngineCore
from tetri_engine.engine.estimate import estimate_request
from tetri_engine.engine.stats import RoundRecord, stats_dict
from tetri_engine.engine.tracker import TrackedRequest
from tetri_engine.errors import EngineNotRunning, RequestRejected
from tetri_engine.sched.routing import Quote
from tetri_engine.request import (CacheMode, GenerationOutput, GenerationRequest, OutputKind, RequestState, SizeRule,
                                  StrEnum)

log = logging.getLogger("tetri_engine.engine")


class EnginePhase(StrEnum):
    CREATED = "created"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # accepted requests finish; new ones are refused
    STOPPED = "stopped"


def check_policy_name(name: str) -> None:
    """ValueError unless `sched.make_policy` knows `name`: one of sched.POLICY_NAMES, or a family of
    them with another degree (fixed16, edf3)."""
    from tetri_engine.sched import POLICY_NAMES

    key = str(name).strip().lower()
    families = {n.rstrip("0123456789") for n in POLICY_NAMES if n[-1].isdigit()}
    if key in POLICY_NAMES or any(key.startswith(f) and key[len(f):].isdigit() for f in families):
        return
    raise ValueError(f"unknown policy {name!r}: choose from {', '.join(POLICY_NAMES)}")


def resolve_devices(config: EngineConfig) -> list[str]:
    """The engine's devices: as configured, else every visible GPU, else `num_cpu_devices` CPU ones."""
    if not config.devices:
        from tetri_engine.executor import Executor

        return Executor.visible_devices(config.num_cpu_devices)
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
        if policy_factory is None:
            check_policy_name(self.config.policy)
        self._devices = resolve_devices(self.config)
        self._phase = EnginePhase.CREATED
        self._executor = None
        self._cost = None
        self._admission: Admission | None = None
        self._core: EngineCore | None = None  # from start()
        self._clock_task: asyncio.Task | None = None
        self._shutdown_task: asyncio.Task | None = None
        self.warmup_report = None  # executor.warmup.WarmupReport of the last shape warm-up (compiled models)

    # ---- what the server and bench scripts read ------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._phase == EnginePhase.READY

    @property
    def is_draining(self) -> bool:
        return self._phase == EnginePhase.DRAINING

    @property
    def devices(self) -> list[str]:
        return list(self._devices)

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def policy_name(self) -> str:
        return self._core.policy.name if self._core is not None else self.config.policy

    @property
    def started_s(self) -> float:
        """Monotonic time the engine became ready (or switched policy): round records count from here."""
        return self._core.counters.started_s if self._core is not None else 0.0

    @property
    def default_steps(self) -> int | None:
        """The model's default number of steps (None before start())."""
        return self._executor.model.default_steps if self._executor is not None else None

    @property
    def size_rule(self) -> SizeRule:
        """The image sizes this engine takes: the configuration's, narrowed by the model's once loaded."""
        rule = self.config.size_rule()
        return rule.narrow(self._executor.model.size_rule) if self._executor is not None else rule

    @property
    def cost_model(self):
        """The sched.CostModel the engine schedules with (None before start())."""
        return self._cost

    @property
    def executor(self):
        """The executor (None before start()): the model, placement checks, benchmarks."""
        return self._executor

    def lora_adapters(self) -> list[str]:
        """The LoRA adapters requests may name (config.lora_dir; [] without one), less any that was found not to
        fit the model."""
        if self._executor is not None and self._executor.loras is not None:
            return self._executor.loras.names()
        return list(self.config.lora_files())

    def lora_check(self, name: str) -> None:
        """ValueError unless requests may name LoRA adapter `name` (the check admission makes; cheap)."""
        loras = self._executor.loras if self._executor is not None else None
        if loras is None:
            raise ValueError("this engine serves no LoRA adapters (it is not started, or has no --lora-dir)")
        loras.check(name)

    def busy_devices(self) -> list[str]:
        """Devices running a group's steps right now."""
        busy = self._core.busy_device_ids() if self._core is not None else set()
        return [self._devices[i] for i in sorted(busy)]

    def placement(self, request_id: str) -> tuple[str, ...]:
        """Devices that hold the request's latent now (empty when none: not started, or released)."""
        indices = self._executor.placement(request_id) if self._executor is not None else None
        return tuple(self._devices[i] for i in indices) if indices else ()

    def request_state(self, request_id: str) -> RequestState | None:
        """The state of a live request, None when it is unknown or has ended."""
        tracked = self._core.tracker.get(request_id) if self._core is not None else None
        return tracked.state if tracked is not None else None

    def round_records(self) -> list[RoundRecord]:
        """Completed rounds, oldest first (the last ROUND_LOG_SIZE): what ran where, for how long."""
        return self._core.rounds.records() if self._core is not None else []

    def live_requests(self) -> list[dict[str, Any]]:
        """The requests accepted and not yet ended, oldest first, for live views (/dashboard). Read-only.

        Times are seconds since `started_s`, the clock of round_records(). Each dict: request_id, width,
        height, num_steps, steps_done, state ("waiting": has not run yet, "running": has), arrival_s,
        deadline_s; slack_s = time left to the deadline minus the fastest it could still finish
        (remaining steps at the fastest degree, then decode); late = slack_s < 0 or a plan in flight
        marks it late; devices and group_start_s: the group running its steps now ([] and None).
        """
        if self._core is None or self._phase == EnginePhase.STOPPED:
            return []
        max_degree = self._core.policy.max_degree

        def fastest_s(t, steps_left: int) -> float:
            return self._cost.isolated_s(t.request.width, t.request.height, steps_left, max_degree,
                                         cached=t.request.cache == CacheMode.AUTO)

        return self._core.live_requests(time.monotonic(), fastest_s)

    def stats(self) -> dict[str, Any]:
        """Engine figures for /health and /metrics (docs/ARCHITECTURE.md, `engine`).

        Latency entries are the most recent raw samples in seconds (at most 1000 each), with
        `*_count` and `*_sum_s` over the engine's life (the server folds them into histograms).
        "states" counts requests by state: waiting/running now, terminal ones since start-up
        (rejected included). SAR = deadline_met / deadline_total over requests that completed or
        failed (cancelled and rejected requests are not counted).
        """
        core = self._core
        if core is None:
            return {"phase": self._phase.value, "queue_depth": 0, "running": 0, "states": {}, "sar": None,
                    "deadline_met": 0, "deadline_total": 0, "device_busy_fraction": {d: 0.0 for d in self._devices},
                    "regroups": 0, "comm_cache": {}, "step_latency_s": [], "round_latency_s": [], "rounds": 0}
        waiting = core.tracker.waiting()
        return {"phase": self._phase.value, "model": self.config.model, "policy": core.policy.name,
                "devices": list(self._devices), "comm_cache": self._executor.comm_stats(),
                "round_s_target": core.policy.round_s,
                **stats_dict(requests=core.tracker.counters, rounds=core.counters, devices=self._devices,
                             waiting=waiting, running=len(core.tracker) - waiting, now_s=time.monotonic())}

    # ---- life cycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        # A body that raised does not wait for the queue to drain: it cancels what is left.
        await self.shutdown(drain=exc_type is None)

    async def start(self) -> None:
        """Load the model on the devices (the executor's threads), load or measure the cost model,
        make the policy and warm its communicators up, and start the round clock. Slow work runs in a
        thread: the loop stays responsive."""
        if self._phase != EnginePhase.CREATED:
            raise RuntimeError(f"an AsyncEngine starts once (it is {self._phase})")
        self._phase = EnginePhase.STARTING
        try:
            await asyncio.to_thread(self._load)
            policy = self._make_policy(self.config.policy, self._policy_factory)
            await asyncio.to_thread(self._executor.warm_up, policy.candidate_groups())
            await asyncio.to_thread(self._warm_up_shapes, policy)
        except BaseException:
            self._phase = EnginePhase.STOPPED
            if self._executor is not None:
                await asyncio.to_thread(self._executor.shutdown)
            raise
        model = self._executor.model
        loras = self._executor.loras
        self._admission = Admission(self.config, ModelLimits(self.size_rule, model.default_steps,
                                                             model.default_guidance, model.cfg_parallel,
                                                             loras.check if loras is not None else None), self._cost)
        self._core = EngineCore(self._executor, policy, self._devices)
        self._clock_task = asyncio.get_running_loop().create_task(self._core.run(), name="tetri-engine round clock")
        self._phase = EnginePhase.READY
        log.info("engine ready: model %s on %s, policy %s, round %.3f s", self.config.model,
                 ",".join(self._devices), policy.name, policy.round_s)

    def _load(self) -> None:
        from tetri_engine.engine.profiling import load_or_measure_profile
        from tetri_engine.executor import Executor
        from tetri_engine.sched import CostModel

        config = self.config
        self._executor = Executor.load(config.model, self._devices, dtype=config.dtype,
                                       comm_cache_size=config.comm_cache_size,
                                       cuda_graphs=config.cuda_graphs,  # graphs and compile: GPU only
                                       compile=config.compile, attention=config.attention,
                                       ulysses_chunks=config.ulysses_chunks, cache_dir=config.cache_dir,
                                       lora_dir=config.lora_dir, lora_cache_mb=config.lora_cache_mb)
        if config.profile:
            self._cost = CostModel.from_json(config.profile)
        else:
            with self._executor.compiling():  # measured as requests will run: compiled
                self._cost = CostModel.from_dict(load_or_measure_profile(
                    self._executor, config.model, cache_dir=config.cache_dir, size_rule=self.size_rule,
                    variant={"ulysses_chunks": config.ulysses_chunks}))
        if self._executor.loras is not None:  # what a group pays when its devices hold another adapter set
            switch_s = self._executor.loras.measure_switch_s()
            self._cost = self._cost.with_lora_switch_s(switch_s)
            log.info("LoRA adapters from %s; a switch of adapter set takes %.2f ms (measured)", config.lora_dir,
                     switch_s * 1e3)

    def _warm_up_shapes(self, policy) -> None:
        """Compile every shape the policy can plan now (engine/warmup.py), when the model is compiled."""
        from tetri_engine.engine.warmup import plan_warmup

        if not self._executor.model.compiled:
            return
        cfg_keys = self._cost.cfg_step_ms if policy.cfg_parallel else {}
        shapes = plan_warmup(self._cost.step_ms, policy.candidate_groups(), len(self._devices), self.size_rule,
                             self.config.warmup_size_list(), cfg_keys)
        self.warmup_report = self._executor.warm_up_shapes(shapes, log=lambda message: log.debug("%s", message))
        log.info("warm-up: %s", self.warmup_report.describe())

    def _make_policy(self, name: str | None, factory: Callable[..., Any] | None):
        from tetri_engine.sched import make_policy

        if factory is not None:
            return factory(len(self._devices), self._cost)
        return make_policy(name, len(self._devices), self._cost, round_steps=self.config.round_steps,
                           round_s=self.config.round_s)

    async def switch_policy(self, policy: str | None = None, *,
                            policy_factory: Callable[..., Any] | None = None) -> None:
        """Schedule with another policy from now on, keeping the loaded model, communicators and CUDA
        graphs (to compare policies on a warm engine: bench/e2e_slo.py). Only while idle: raises
        RuntimeError when a request is live. Resets the counters and round records, as at start().
        policy: a `sched.make_policy` name; policy_factory: as in the constructor."""
        if self._phase != EnginePhase.READY:
            raise RuntimeError(f"switch_policy needs a ready engine (it is {self._phase})")
        if not self._core.is_idle:
            raise RuntimeError(f"switch_policy needs an idle engine ({len(self._core.tracker)} requests are live)")
        if (policy is None) == (policy_factory is None):
            raise ValueError("give exactly one of policy (a name) or policy_factory")
        new = self._make_policy(policy, policy_factory)
        await asyncio.to_thread(self._executor.warm_up, new.candidate_groups())
        await asyncio.to_thread(self._warm_up_shapes, new)  # (shapes warmed before cost one step each)
        self._core.reset(new)
        log.info("engine policy switched to %s, round %.3f s", new.name, new.round_s)

    async def shutdown(self, drain: bool = True) -> None:
        """Stop the engine. drain=True: refuse new requests ("draining") and finish every accepted
        one first. drain=False: cancel every accepted request (final state CANCELLED, with a message
        saying so); running ones stop at their next step boundary. Idempotent."""
        if self._phase == EnginePhase.CREATED:
            self._phase = EnginePhase.STOPPED
            return
        if self._phase == EnginePhase.READY:  # from now on, new requests are refused with "draining"
            self._phase = EnginePhase.DRAINING
        if not drain and self._core is not None:
            self._core.tracker.cancel_all("cancelled: the engine shut down without draining")
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self) -> None:
        while self._phase == EnginePhase.STARTING:  # start() is still loading: let it finish first
            await asyncio.sleep(0.05)
        if self._phase == EnginePhase.STOPPED:
            return
        self._phase = EnginePhase.DRAINING
        await self._core.tracker.all_ended.wait()
        self._core.stop()
        await self._clock_task
        await asyncio.to_thread(self._executor.shutdown)
        self._phase = EnginePhase.STOPPED
        log.info("engine stopped")

    # ---- requests ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, *, group_size: int = 1) -> AsyncIterator[GenerationOutput]:
        """Outputs of one request: "queued" first, then "round"/"step"/"preview", then one "final".

        Admission errors raise from the first __anext__: RequestRejected (queue_full,
        deadline_impossible, draining) or ValueError (invalid input). Leaving the iterator early
        (break + aclose, task cancelled, client gone) cancels the request; a running one stops at its
        next step boundary and its devices go back to the scheduler. group_size > 1: this request is
        the first of that many sent together, admitted only if the queue holds them all (a refusal
        counts all of them as rejected); the caller submits the others right after.
        """
        tracked = self._admit(request, group_size)
        try:
            while True:
                output = await tracked.outputs.get()
                yield output
                if output.kind == OutputKind.FINAL:
                    return
        finally:
            # GeneratorExit (break / aclose / garbage collected) or CancelledError (task cancelled).
            self._core.tracker.cancel(tracked, "cancelled: the client stopped reading the output stream")

    def estimate(self, request: GenerationRequest) -> Quote:
        """If this engine took `request` now: would it meet its deadline, when would it finish, what
        would it cost the requests held (engine/estimate.py)? Pure and cheap, changes nothing: for a
        router in front of several engines. ValueError (invalid input), EngineNotRunning."""
        if self._phase not in (EnginePhase.READY, EnginePhase.DRAINING):
            raise EngineNotRunning(f"the engine is {self._phase}: no estimate")
        return estimate_request(self._admission, self._core.policy, self._core.tracker.live,
                                self._phase == EnginePhase.DRAINING, request, time.monotonic())

    async def abort(self, request_id: str) -> bool:
        """Cancel a request. Returns when it has ended (a running one: after its current step, once
        its devices are free); False when no such request is live."""
        tracked = self._core.tracker.get(request_id) if self._core is not None else None
        if tracked is None:
            return False
        self._core.tracker.cancel(tracked, "cancelled: aborted")
        await tracked.ended.wait()
        return True

    def _admit(self, request: GenerationRequest, group_size: int = 1) -> TrackedRequest:
        if self._phase in (EnginePhase.CREATED, EnginePhase.STARTING):
            raise EngineNotRunning("the engine is not started: use `async with engine:` or `await engine.start()`")
        if self._phase == EnginePhase.STOPPED:
            raise EngineNotRunning("the engine is stopped")
        now_s = time.monotonic()
        try:
            req, deadline_s = self._admission.check(request, policy=self._core.policy, live=self._core.tracker.live,
                                                    draining=self._phase == EnginePhase.DRAINING, now_s=now_s,
                                                    group_size=group_size)
        except RequestRejected:
            self._core.tracker.count_rejected(group_size)
            raise
        tracked = TrackedRequest(request=req, arrival_s=now_s, deadline_s=deadline_s,
                                 cfg=self._admission.cfg_parallel(req))
        self._core.add(tracked)
        return tracked
