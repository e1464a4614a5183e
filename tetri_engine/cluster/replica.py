"""EngineReplica: the Ray Serve deployment whose replicas are tetri-engine AsyncEngines.

Each replica is one Ray actor process owning the devices of its host: the GPUs Ray gives it (Ray sets
CUDA_VISIBLE_DEVICES; the engine takes every visible GPU), or `num_cpu_devices` virtual CPU devices.
It starts its engine in its constructor, so Serve counts it ready once the model is loaded, and drains
it in `__del__`, which Serve calls after the replica's graceful shutdown (in-flight calls finished or
`graceful_shutdown_timeout_s` passed). `check_health` fails once the engine has stopped, and Serve then
replaces the replica, as it replaces one whose process died.

Methods (called through a DeploymentHandle; `replica=` is the routing pin PinnedRouter reads, ignored here):
    estimate(request, replica=None) -> wire.ReplicaEstimate     AsyncEngine.estimate, pure and cheap
    generate(request, replica=None)  -> async iterator:          wire.Refused, or wire.Accepted then the
                                                                  outputs (wire.label_output)
    status() -> wire.ReplicaStatus                               stats and facts for the ingress
The class is plain (made a deployment by ray_cluster.deploy), so it imports without Ray.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import AsyncIterator

from tetri_engine.cluster.wire import Accepted, ReplicaEstimate, ReplicaStatus, Refused, device_label, label_output
from tetri_engine.config import EngineConfig
from tetri_engine.errors import EngineNotRunning, RequestRejected
from tetri_engine.request import GenerationOutput, GenerationRequest, OutputKind
from tetri_engine.server.app import encode_png  # the server's own preview encoding

log = logging.getLogger("tetri_engine.cluster")


def _replica_id() -> str:
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


class EngineReplica:
    async def __init__(self, engine_config: EngineConfig):
        from tetri_engine.engine.async_engine import AsyncEngine

        self.replica = _replica_id()
        self.pid = os.getpid()
        self._closing = False
        self.engine = AsyncEngine(engine_config)
        await self.engine.start()
        log.info("replica %s (pid %d) ready on %s", self.replica, self.pid, ",".join(self.engine.devices))

    def estimate(self, request: GenerationRequest, replica: str | None = None) -> ReplicaEstimate:
        try:
            return ReplicaEstimate(self.replica, estimate=self.engine.estimate(request))
        except ValueError as exc:
            return ReplicaEstimate(self.replica, error=str(exc))

    async def generate(self, request: GenerationRequest, replica: str | None = None) -> AsyncIterator[object]:
        outputs = self.engine.generate(request)
        # aclosing: a caller that goes away (Serve cancels this call) cancels the request in the engine.
        async with contextlib.aclosing(outputs):
            try:
                queued = await outputs.__anext__()
            except (RequestRejected, EngineNotRunning, ValueError) as exc:
                yield Refused.of(self.replica, exc)
                return
            yield Accepted(self.replica, self.pid, await self._wire(queued))
            async for out in outputs:
                yield await self._wire(out)

    async def _wire(self, out: GenerationOutput) -> GenerationOutput:
        png = out.png
        if png is None and out.kind == OutputKind.PREVIEW and out.image is not None:
            png = await asyncio.to_thread(encode_png, out.image)
        return label_output(out, self.replica, png)

    def status(self) -> ReplicaStatus:
        engine = self.engine
        stats = engine.stats()
        stats["device_busy_fraction"] = {device_label(self.replica, d): f
                                         for d, f in (stats.get("device_busy_fraction") or {}).items()}
        return ReplicaStatus(self.replica, self.pid, engine.is_ready, engine.is_draining, engine.model_name,
                             engine.policy_name, tuple(device_label(self.replica, d) for d in engine.devices),
                             tuple(device_label(self.replica, d) for d in engine.busy_devices()),
                             engine.default_steps, engine.size_rule, stats)

    def check_health(self) -> None:
        if not (self.engine.is_ready or self.engine.is_draining or self._closing):
            raise RuntimeError(f"replica {self.replica}: its engine is {self.engine.stats()['phase']}")

    async def __del__(self) -> None:
        self._closing = True  # stopped on purpose: not a health failure
        await self.engine.shutdown(drain=True)
