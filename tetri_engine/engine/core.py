"""EngineCore: the round clock, which drives the policy (what runs where) and the executor (running it).

One asyncio event loop owns every piece of engine state. The executor's worker threads run the steps
and never touch the loop: the core hands each plan's groups to them and awaits their
`concurrent.futures.Future`s; step progress and previews come back through
`loop.call_soon_threadsafe`, in the order the threads sent them.

`step()` is one turn of the clock:

    1. plan      policy.schedule(now), the real monotonic time -> a frozen RoundPlan (may be empty)
    2. launch    executor.submit_steps(...) per group (the executor moves latents that change group)
    3. wait      for the first of {a group finishing, the wake event (arrival, end, shutdown)}
    4. report    policy.update_from_output(plan, RoundResult) per finished group; the round record
    5. hand over each request's outcome to the tracker: outputs, a preview, its end

TetriServe's policy is round-synchronous (its schedule() plans nothing new while a round is in flight
but may backfill idle devices), so with it this is the paper's round clock; the FCFS/EDF baselines
are event driven, and the same loop serves both. With nothing to do the loop sleeps on the wake
event (no polling).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tetri_engine.engine.lora import lora_key
from tetri_engine.engine.stats import GroupRecord, RequestCounters, RoundCounters, RoundLog
from tetri_engine.engine.tracker import RequestTracker, TrackedRequest
from tetri_engine.request import CacheMode, RequestState

log = logging.getLogger("tetri_engine.engine")


@dataclass(frozen=True)
class InflightGroup:
    plan: Any  # sched.RoundPlan
    index: int  # which group of the plan
    dispatch_s: float  # monotonic
    devices: tuple[str, ...]  # the group's device names

    @property
    def group(self):
        return self.plan.groups[self.index]


@dataclass
class GroupOutcome:
    """What one finished group did, as the executor reported it."""

    end_s: float  # monotonic: the loop saw it finish
    results: dict[str, Any] = field(default_factory=dict)  # request_id -> RequestStepResult (not failed)
    errors: dict[str, str] = field(default_factory=dict)  # request_id -> why it failed
    executor_s: float = 0.0  # regroup + steps + decode
    group_error: str | None = None  # the whole call failed

    @property
    def steps_done(self) -> dict[str, int]:
        return {rid: r.steps_done for rid, r in self.results.items()}


class EngineCore:
    """The round clock over `executor` (an Executor) and `policy` (a sched.Policy), for `devices`.
    Owns the RequestTracker of the live requests (`tracker`)."""

    def __init__(self, executor: Any, policy: Any, devices: list[str]):
        self.executor = executor
        self.policy = policy
        self.devices = devices
        self.tracker = RequestTracker(executor, devices, drop_from_policy=lambda rid: self.policy.abort(rid),
                                      changed=self.wake)
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: dict[asyncio.Future, InflightGroup] = {}
        self.counters = RoundCounters(num_devices=len(devices), started_s=time.monotonic())
        self.rounds = RoundLog(self.counters)

    def wake(self) -> None:
        self._wake.set()

    @property
    def is_idle(self) -> bool:
        return not self.tracker.live and not self._inflight

    def busy_device_ids(self) -> set[int]:
        return {d for info in self._inflight.values() for d in info.group.device_ids}

    def reset(self, policy: Any) -> None:
        """Schedule with `policy` from now on, with counters and round records afresh (only while idle)."""
        self.policy = policy
        self.counters = RoundCounters(num_devices=len(self.devices), started_s=time.monotonic())
        self.rounds = RoundLog(self.counters)
        self.tracker.counters = RequestCounters()

    def live_requests(self, now_s: float, fastest_s: Callable[[TrackedRequest, int], float]) -> list[dict[str, Any]]:
        """A read-only snapshot of the live requests for live views (AsyncEngine.live_requests).
        fastest_s(tracked, steps_left): the least time those steps and the decode can take."""
        t0_s = self.counters.started_s
        marked_late = {rid for info in self._inflight.values() for rid in info.plan.late}
        running = {rid: info for info in self._inflight.values() for rid in info.group.request_ids}
        out = []
        for t in self.tracker.live.values():
            steps_done = t.last_step_reported
            slack_s = t.deadline_at_s - now_s - fastest_s(t, t.total_steps - steps_done)
            info = running.get(t.request_id)
            out.append({
                "request_id": t.request_id, "width": t.request.width, "height": t.request.height,
                "num_steps": t.total_steps, "steps_done": steps_done,
                "state": "waiting" if t.first_round_s is None else "running",
                "arrival_s": t.arrival_s - t0_s, "deadline_s": t.deadline_at_s - t0_s,
                # late: the policies' own test (slack < 0, true once the deadline has passed) or a plan says so
                "slack_s": slack_s, "late": t.late or slack_s < 0 or t.request_id in marked_late,
                "devices": list(info.devices) if info else [],
                "group_start_s": info.dispatch_s - t0_s if info else None,
            })
        return out

    # ---- the clock -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Turn the clock until `stop()` and no group is in flight."""
        while not (self._stopping and not self._inflight):
            await self.step()

    def stop(self) -> None:
        self._stopping = True
        self.wake()

    async def step(self) -> None:
        """One turn of the round clock.

        Invariant: the policy decides everything that runs and learns everything that happened. Each
        group it plans is launched once and reported back to it once (update_from_output), whether it
        finished, failed or was cut short by a cancel, so its books (busy devices, steps done) match
        the executor's and no device is ever given two groups at once.
        """
        self._wake.clear()
        plan = self._plan()  # 1
        if plan is not None:
            self._launch(plan)  # 2
        for future in await self._wait():  # 3
            info = self._inflight.pop(future)
            try:
                outcome = self._collect(info, future)
                self._report(info, outcome)  # 4
                self._hand_over(info, outcome)  # 5
            except Exception as exc:  # an engine bug: fail the group's requests rather than hang them
                log.exception("handling a finished group failed")
                self._fail_group(info, f"internal error after a round: {type(exc).__name__}: {exc}")

    # 1. plan
    def _plan(self):
        if self._stopping or not self.policy.has_work():
            return None
        now_s = time.monotonic()
        try:
            plan = self.policy.schedule(now_s)
        except Exception as exc:  # a scheduler bug must not hang the clients
            log.exception("planning a round failed")
            self.tracker.fail_idle(f"internal error while planning a round: {type(exc).__name__}: {exc}")
            return None
        for rid in plan.given_up:  # announced at the decision that gives it up, empty plan or not
            self.tracker.given_up(rid)
        if plan.is_empty:
            return None
        self.rounds.open(plan.round_index, len(plan.groups), now_s, time.monotonic() - now_s)
        return plan

    # 2. launch
    def _launch(self, plan) -> None:
        for index, group in enumerate(plan.groups):
            info = InflightGroup(plan, index, time.monotonic(), tuple(self.devices[i] for i in group.device_ids))
            try:
                future = self._submit(info)
            except Exception as exc:  # refused at once, or a bookkeeping bug: the group fails as a unit
                log.exception("launching a group of round %d failed", plan.round_index)
                future = self._loop.create_future()
                future.set_exception(exc)
            self._inflight[future] = info

    def _submit(self, info: InflightGroup) -> asyncio.Future:
        group = info.group
        tracked = [self.tracker.get(rid) for rid in group.request_ids]
        missing = [rid for rid, t in zip(group.request_ids, tracked) if t is None]
        if missing:
            raise RuntimeError(f"the policy planned requests the engine does not hold: {missing}")
        for t in tracked:
            self.tracker.start_group(t, info.devices, group.layout)
        future = self.executor.submit_steps(list(group.request_ids), list(group.device_ids), group.num_steps,
                                            on_step=self._on_step(info.devices), decode_after=group.decode_after,
                                            cfg=group.cfg, decode_degree=group.decode_degree)
        return asyncio.wrap_future(future, loop=self._loop)

    def _on_step(self, devices: tuple[str, ...]) -> Callable[[str, int], None]:
        def on_step(request_id: str, step: int) -> None:  # runs on an executor thread
            self._to_loop(self.tracker.step_done, request_id, step, devices)

        return on_step

    def _to_loop(self, callback: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    # 3. wait
    async def _wait(self) -> list[asyncio.Future]:
        wake = self._loop.create_task(self._wake.wait())
        try:
            done, _ = await asyncio.wait({*self._inflight, wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not wake.done():
                wake.cancel()
        return [f for f in done if f in self._inflight]

    # 4. report
    def _collect(self, info: InflightGroup, future: asyncio.Future) -> GroupOutcome:
        outcome = GroupOutcome(end_s=time.monotonic())
        exc = future.exception()
        if exc is not None:
            outcome.group_error = f"the group on {','.join(info.devices)} failed: {type(exc).__name__}: {exc}"
            outcome.errors = {rid: outcome.group_error for rid in info.group.request_ids}
            return outcome
        result = future.result()
        outcome.executor_s = result.seconds + result.regroup_s + result.decode_s + result.lora_s
        for rid in info.group.request_ids:
            r = result.requests.get(rid)
            if r is None:
                outcome.errors[rid] = "the executor returned no result for it"
            elif r.error is not None and not r.cancelled:  # a cancel is no failure: the steps it did count
                outcome.errors[rid] = r.error
            else:
                outcome.results[rid] = r
        return outcome

    def _report(self, info: InflightGroup, outcome: GroupOutcome) -> None:
        from tetri_engine.sched import RoundResult

        self._record(info, outcome)
        try:
            finished = self.policy.update_from_output(info.plan, RoundResult(
                end_s=outcome.end_s, steps_done=outcome.steps_done, failed=set(outcome.errors)))
        except Exception as exc:  # the policy's books are off for these requests: they cannot go on
            log.exception("policy.update_from_output failed for round %d", info.plan.round_index)
            error = f"internal error in the scheduler after a round: {type(exc).__name__}: {exc}"
            outcome.errors = {rid: error for rid in info.group.request_ids}
            return
        self._dropped_by_policy(finished)

    def _record(self, info: InflightGroup, outcome: GroupOutcome) -> None:
        group, t0 = info.group, self.counters.started_s
        for r in outcome.results.values():
            if r.steps_done:
                self.counters.step_latency.add(r.seconds / r.steps_done)
            self.counters.regroups += int(r.regrouped)
        record = GroupRecord(request_ids=tuple(group.request_ids), device_ids=tuple(group.device_ids),
                             devices=info.devices, planned_steps=group.num_steps, steps_done=outcome.steps_done,
                             executor_s=outcome.executor_s, start_s=info.dispatch_s - t0,
                             end_s=outcome.end_s - t0, error=outcome.group_error)
        self.rounds.close_group(info.plan.round_index, info.index, record)

    def _dropped_by_policy(self, requests) -> None:
        """The policy forgot these (completed or failed there): never abort them in it afterwards."""
        for req in requests:
            tracked = self.tracker.get(req.request_id)
            if tracked is not None:
                tracked.in_policy = False

    # 5. hand over
    def _hand_over(self, info: InflightGroup, outcome: GroupOutcome) -> None:
        for rid in info.group.request_ids:
            tracked = self.tracker.get(rid)
            if tracked is None:
                continue
            tracked.busy = False
            r = outcome.results.get(rid)
            if rid in outcome.errors:
                self.tracker.finish(tracked, RequestState.FAILED, error=outcome.errors[rid])
            elif self.tracker.settle_cancel(tracked, stopped_by_executor=r.cancelled):
                pass
            elif not r.finished:
                self._preview_if_due(tracked, r.step, info.devices)
            elif r.image is not None:
                self.tracker.finish(tracked, RequestState.COMPLETED, image=r.image, png=r.png)
            else:  # the plan did not decode it (it should: decode_after is set on a request's last group)
                self._decode_later(tracked, info.group.device_ids[0])

    def _preview_if_due(self, tracked: TrackedRequest, step: int, devices: tuple[str, ...]) -> None:
        """A preview when the request crossed a multiple of preview_every. Previews come at group
        boundaries (the latent is only whole and idle between groups), made on an executor thread."""
        every = tracked.request.preview_every
        if every <= 0 or step // every <= tracked.last_preview_step // every:
            return
        tracked.last_preview_step = step
        rid = tracked.request_id
        try:
            future = self.executor.submit_preview(rid)
        except Exception:  # a preview is optional: never fail the request for one
            log.debug("preview of %s failed", rid, exc_info=True)
            return

        def done(f) -> None:  # on an executor thread, before the request's next steps start
            if f.exception() is None:
                self._to_loop(self.tracker.preview_made, rid, f.result(), devices)
            else:
                log.debug("preview of %s failed: %s", rid, f.exception())

        future.add_done_callback(done)

    def _decode_later(self, tracked: TrackedRequest, device_id: int) -> None:
        tracked.busy = True  # its latent is still in use: a cancel waits for the decode
        future = asyncio.wrap_future(self.executor.submit_decode(tracked.request_id, device_id), loop=self._loop)

        def done(f: asyncio.Future) -> None:
            tracked.busy = False
            if f.cancelled() or f.exception() is not None:
                error = "decode was cancelled" if f.cancelled() else f"decode failed: {f.exception()}"
                self.tracker.finish(tracked, RequestState.FAILED, error=error)
            elif not self.tracker.settle_cancel(tracked):
                image, png = f.result()
                self.tracker.finish(tracked, RequestState.COMPLETED, image=image, png=png)

        future.add_done_callback(done)

    def _fail_group(self, info: InflightGroup, error: str) -> None:
        """Handling a finished group broke: fail its requests, and free its devices in the policy if its
        books allow."""
        from tetri_engine.sched import RoundResult

        request_ids = info.group.request_ids
        self.rounds.discard(info.plan.round_index)
        try:
            self._dropped_by_policy(self.policy.update_from_output(
                info.plan, RoundResult(end_s=time.monotonic(), failed=set(request_ids))))
        except Exception:
            log.exception("could not report the failed group to the policy")
        for rid in request_ids:
            tracked = self.tracker.get(rid)
            if tracked is not None:
                tracked.busy = False
                self.tracker.finish(tracked, RequestState.FAILED, error=error)

    # ---- requests ------------------------------------------------------------------------------

    def add(self, tracked: TrackedRequest) -> None:
        """An admitted request: track it, encode its prompt on the executor, then give it to the policy."""
        self.tracker.add(tracked)
        self._loop.create_task(self._encode(tracked), name=f"encode {tracked.request_id}")

    async def _encode(self, tracked: TrackedRequest) -> None:
        from tetri_engine.sched import SchedRequest

        rid, req = tracked.request_id, tracked.request
        error = None
        try:
            # shield: cancelling this task (loop teardown) must not cancel the executor's own future.
            await asyncio.shield(asyncio.wrap_future(self.executor.submit_encode(rid, req), loop=self._loop))
        except Exception as exc:
            error = f"prompt encoding failed: {type(exc).__name__}: {exc}"
        if tracked.state.is_terminal:  # cancelled while it was encoding: drop what the executor holds
            self.executor.release(rid)
            return
        if error is None:
            try:
                self.policy.add_request(SchedRequest(rid, req.width, req.height, req.denoise_steps,
                                                     arrival_s=tracked.arrival_s, deadline_s=tracked.deadline_at_s,
                                                     cached=req.cache == CacheMode.AUTO, cfg=tracked.cfg,
                                                     adapters=lora_key(req.lora)))
            except Exception as exc:
                error = f"the scheduler refused it: {exc}"
        if error is not None:
            self.tracker.finish(tracked, RequestState.FAILED, error=error)
            return
        tracked.in_policy = True
        self.wake()
