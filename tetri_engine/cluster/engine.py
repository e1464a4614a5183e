"""ClusterEngine: engine replicas on Ray Serve behind the face of one AsyncEngine, so that the aiohttp
server (tetri_engine.server, `create_app(config, engine_factory=...)`) serves a cluster unchanged:
the same routes, the same wire format, byte for byte.

Routing (sched/routing.py; ClusterConfig.routing):
- deadline: each request, one at a time (a lock, so that each decision sees the previous request
  accepted), asks every replica `estimate` (its scheduler's answer, engine/estimate.py), picks one with
  `routing.choose_by_deadline` and sends the request there (PinnedRouter). Every replica refusing is a
  RequestRejected (HTTP 429 with the soonest Retry-After any replica estimated). A replica that refuses
  a request it said it would take (another request got there first) makes the request route again.
- pow2, round-robin: Ray Serve's own routers; the replica's admission has the last word.

Faults: a request whose replica dies (its process killed, its node lost) before the request made any
progress (only "queued" seen) is routed again, at most MAX_ROUTES times in all; one that had started
ends with a "final" output in state FAILED whose error says which replica was lost and that the request
should be sent again. Ray Serve replaces the dead replica; the other replicas' requests go on untouched.

Stats: the replicas are polled every STATUS_PERIOD_S (`status`), folded by ClusterStats; `stats()`,
`devices`, `busy_devices()` answer from the last poll (at most that old), since the server reads them
synchronously. The dashboard (one engine's rounds) is not served for a cluster.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import signal
import threading
import uuid
from typing import Any, AsyncIterator

from tetri_engine.cluster.config import ClusterConfig
from tetri_engine.cluster.stats import ClusterStats
from tetri_engine.cluster.wire import Accepted, ClusterRequestMetrics, ReplicaEstimate
from tetri_engine.config import EngineConfig
from tetri_engine.errors import EngineNotRunning, RejectionReason, RequestRejected
from tetri_engine.request import GenerationOutput, GenerationRequest, OutputKind, RequestState, SizeRule
from tetri_engine.sched.routing import Refusal, choose_by_deadline

log = logging.getLogger("tetri_engine.cluster")

STATUS_PERIOD_S = 0.5
CALL_TIMEOUT_S = 10.0  # a status poll not answered by then is skipped (the last view stays)
ESTIMATE_TIMEOUT_S = 2.0  # a replica that has not answered an estimate by then is left out of the decision
MAX_ROUTES = 3  # routings of one request: a lost race for a replica's last slot, or a replica that died


class ClusterEngine:
    """The AsyncEngine surface the server uses (start, shutdown, generate, stats, ...) over Ray Serve."""

    def __init__(self, engine_config: EngineConfig, cluster: ClusterConfig, *, drain_timeout_s: float = 60.0):
        from tetri_engine.engine.async_engine import check_policy_name

        if engine_config.devices:
            raise ValueError("--devices names the devices of one host; with --replicas, give "
                             "--devices-per-replica (each replica gets that many GPUs, or CPU devices)")
        if not cluster.enabled:
            raise ValueError("a ClusterEngine needs replicas >= 1")
        check_policy_name(engine_config.policy)
        self.config = engine_config
        self.cluster = cluster
        self.drain_timeout_s = drain_timeout_s
        self._phase = "created"
        self._handle: Any = None
        self._ray: tuple[bool, bool] = (False, False)  # (connected here, local cluster started here)
        self._stats = ClusterStats()
        self._poller: asyncio.Task | None = None
        self._route_lock = asyncio.Lock()
        self._rng = random.Random()
        self._streams: set[Any] = set()  # replica calls in flight (cancelled by shutdown(drain=False))
        self._lost = 0  # requests that failed because their replica was lost

    # ---- what the server reads (AsyncEngine's names) ---------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._phase == "ready"

    @property
    def is_draining(self) -> bool:
        return self._phase == "draining"

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def policy_name(self) -> str:
        return self.config.policy

    @property
    def devices(self) -> list[str]:
        return [d for s in self._stats.live.values() for d in s.devices]

    @property
    def replicas(self) -> list[str]:
        """The replicas that answered the last poll."""
        return sorted(self._stats.live)

    @property
    def default_steps(self) -> int | None:
        return next((s.default_steps for s in self._stats.live.values()), None)

    @property
    def size_rule(self) -> SizeRule:
        return next((s.size_rule for s in self._stats.live.values()), self.config.size_rule())

    def busy_devices(self) -> list[str]:
        return [d for s in self._stats.live.values() for d in s.busy_devices]

    def lora_adapters(self) -> list[str]:
        """The adapters of --lora-dir as this host sees it (every replica's host has the same directory)."""
        return list(self.config.lora_files())

    def lora_check(self, name: str) -> None:
        """ValueError for an adapter not in --lora-dir (the replica's admission checks the file itself)."""
        if name not in self.config.lora_files():
            raise ValueError(f"unknown LoRA adapter {name!r}: the adapters here are "
                             f"{', '.join(self.config.lora_files()) or 'none'}")

    def stats(self) -> dict[str, Any]:
        out = self._stats.stats()
        out["phase"] = self._phase
        out["routing"] = self.cluster.routing
        out["states"]["failed"] += self._lost
        return out

    # ---- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Ray (or start a local cluster), deploy the replicas and wait until each has its
        model loaded, then poll their status."""
        from tetri_engine.cluster import ray_cluster

        if self._phase != "created":
            raise RuntimeError(f"a ClusterEngine starts once (it is {self._phase})")
        self._phase = "starting"
        try:
            self._ray = await asyncio.to_thread(ray_cluster.connect, self.cluster)
            _restore_python_signal_handlers()
            self._handle = await asyncio.to_thread(ray_cluster.deploy, self.config, self.cluster, self.drain_timeout_s)
            await self._poll()
            if not self._stats.live:
                raise RuntimeError("the replicas are deployed but none answered")
        except BaseException:
            self._phase = "stopped"
            await asyncio.to_thread(ray_cluster.disconnect, *self._ray)
            raise
        self._phase = "ready"
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever(), name="replica status")
        log.info("cluster ready: %d replicas (%s), routing %s", len(self._stats.live), ", ".join(self.replicas),
                 self.cluster.routing)

    async def shutdown(self, drain: bool = True) -> None:
        """Take the replicas down: new requests are refused at once; drain=True lets the requests in flight
        finish (Serve's graceful shutdown, then each engine's drain), drain=False cancels them."""
        from tetri_engine.cluster import ray_cluster

        while self._phase == "starting":  # a deploy in progress cannot be interrupted: let it end
            await asyncio.sleep(0.05)
        if self._phase in ("created", "stopped"):
            self._phase = "stopped"
            return
        self._phase = "draining"
        if not drain:
            for stream in list(self._streams):
                stream.cancel()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await asyncio.to_thread(ray_cluster.disconnect, *self._ray)
        self._phase = "stopped"
        log.info("cluster stopped")

    async def _poll(self) -> None:
        try:
            answers = await self._handle.broadcast("status").results_async(timeout_s=CALL_TIMEOUT_S,
                                                                          return_exceptions=True)
        except Exception as exc:  # every replica gone, or the poll timed out: keep the last view
            log.debug("replica status poll failed: %s", exc)
            return
        self._stats.update(a for a in answers if not isinstance(a, BaseException))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(STATUS_PERIOD_S)
            await self._poll()

    # ---- requests --------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, **_options: Any) -> AsyncIterator[GenerationOutput]:
        """As AsyncEngine.generate: "queued" first, then the outputs of the replica that took it, then one
        "final". Admission errors raise from the first __anext__ (RequestRejected, ValueError,
        EngineNotRunning). Leaving early cancels the request on its replica. Options of AsyncEngine.generate
        (group_size) do not apply: each request is admitted by its own replica."""
        if self._phase != "ready":
            raise EngineNotRunning(f"the cluster is {self._phase}")
        if request.request_id is None:
            request = dataclasses.replace(request, request_id=uuid.uuid4().hex)
        accepted, stream = await self._admit(request)
        try:  # whatever ends this (the final, an error, the caller leaving), the replica call is closed
            yield accepted.queued
            for routes in range(1, MAX_ROUTES + 1):
                progressed, lost = False, "its answer ended without a final output"
                try:
                    async for out in stream:
                        progressed = progressed or out.kind != OutputKind.QUEUED
                        yield out
                        if out.finished:
                            return
                except Exception as exc:
                    lost = _lost_reason(exc)
                    if lost is None:
                        raise
                self._close(stream)
                if progressed or routes == MAX_ROUTES:
                    break
                log.warning("replica %s was lost before request %s started (%s): routing it again",
                            accepted.replica, request.request_id, lost)
                try:
                    accepted, stream = await self._admit(request)
                except (RequestRejected, EngineNotRunning, ValueError) as exc:
                    lost = f"{lost}; routing it again failed: {exc}"
                    break
            self._lost += 1
            yield _lost_final(request, accepted, lost)
        finally:
            self._close(stream)

    async def _admit(self, request: GenerationRequest) -> tuple[Accepted, Any]:
        """Route the request and open its call on the chosen replica; its first answer is Accepted (returned
        with the open call) or Refused (raised as AsyncEngine.generate would raise it)."""
        last = "no replica"
        for attempt in range(1, MAX_ROUTES + 1):
            deadline = self.cluster.routing == "deadline"
            async with self._route_lock if deadline else contextlib.nullcontext():
                pin = await self._choose(request) if deadline else None
                stream = self._handle.options(stream=True, method_name="generate").remote(request, replica=pin)
                self._streams.add(stream)
                try:
                    first = await stream.__anext__()
                except BaseException as exc:  # (the caller cancelled too: close the call)
                    self._close(stream)
                    last = _lost_reason(exc) if isinstance(exc, Exception) else None
                    if last is None:
                        raise
                    continue  # the replica died before it answered: route again
            if isinstance(first, Accepted):
                return first, stream
            self._close(stream)
            retry_race = deadline and first.kind == "rejected" and first.reason in ("busy", "queue_full")
            if not retry_race or attempt == MAX_ROUTES:
                raise first.to_exception()
            last = f"replica {first.replica}: {first.message}"
        raise EngineNotRunning(f"no replica took the request in {MAX_ROUTES} routings (last: {last})")

    async def _choose(self, request: GenerationRequest) -> str:
        """Deadline-aware routing: every replica's estimate, then routing.choose_by_deadline."""
        names = list(self._stats.live) or [None]
        answers = await asyncio.gather(*(self._estimate(name, request) for name in names))
        by_replica = {a.replica: a for a in answers if a is not None}  # a stale name is answered by another
        errors = [a.error for a in by_replica.values() if a.error is not None]
        if errors:
            raise ValueError(errors[0])
        if not by_replica:
            raise EngineNotRunning(f"no replica answered an estimate within {ESTIMATE_TIMEOUT_S:g} s")
        choice = choose_by_deadline([a.offer() for a in by_replica.values()], self._rng)
        if isinstance(choice, Refusal):
            reasons = sorted({a.estimate.reason for a in by_replica.values()})
            when = f"; the soonest would take it in about {choice.retry_after_s:.3g} s" \
                if choice.retry_after_s is not None else ""
            raise RequestRejected(f"every replica ({len(by_replica)}) refused the request ({', '.join(reasons)})"
                                  f"{when}", RejectionReason(choice.reason), choice.retry_after_s)
        return choice.replica

    async def _estimate(self, name: str | None, request: GenerationRequest) -> ReplicaEstimate | None:
        call = self._handle.options(method_name="estimate").remote(request, replica=name)
        try:
            return await asyncio.wait_for(_result(call), ESTIMATE_TIMEOUT_S)
        except Exception as exc:  # timed out, or the replica is gone: leave it out
            if _lost_reason(exc) is None and not isinstance(exc, asyncio.TimeoutError):
                raise
            call.cancel()
            log.debug("replica %s gave no estimate: %s", name, exc)
            return None

    def _close(self, stream: Any) -> None:
        """Cancel the call if it is still running (a no-op once it has ended)."""
        stream.cancel()
        self._streams.discard(stream)


def _restore_python_signal_handlers() -> None:
    """ray.init puts Ray's C++ crash handler on SIGTERM (it logs a stack, then the process dies), over the
    server's drain: put the Python handlers that were there back (from the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            signal.signal(signum, handler)


async def _result(call: Any) -> Any:
    return await call


def _lost_reason(exc: BaseException) -> str | None:
    """Why a replica call failed if the replica is lost (its process or node died, it cannot be reached),
    else None (an error of the request itself: let it propagate)."""
    from ray.exceptions import RayError, RayTaskError
    from ray.serve.exceptions import RayServeException

    if isinstance(exc, RayTaskError):  # the replica's own code raised: not a lost replica
        return None
    if isinstance(exc, (RayError, RayServeException)):
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return None


def _lost_final(request: GenerationRequest, accepted: Accepted, reason: str) -> GenerationOutput:
    return GenerationOutput(
        request.request_id, OutputKind.FINAL, RequestState.FAILED, total_steps=accepted.queued.total_steps,
        seed=accepted.queued.seed, metrics=ClusterRequestMetrics(replica=accepted.replica),
        error=(f"replica {accepted.replica} (pid {accepted.pid}) was lost while running this request: {reason}. "
               "Nothing of it survived; send it again (the other replicas serve, and Ray Serve replaces the lost "
               "one)."))
