"""Ray: connect to a cluster or start a local one, deploy the engine replicas, take them down.

A local cluster (no --ray-address) runs in Ray's single-machine mode, every Ray process bound to
127.0.0.1 (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: Ray's own switch for "this is not a cluster"), with
no dashboard and no usage report; it must be set before Ray is imported, which is why Ray is imported
here, in `connect`, and nowhere at module level on the ingress's path. Ray Serve's HTTP proxy is not
started: the ingress is tetri-engine's own aiohttp server (tetri_engine.server), talking to the
replicas through a DeploymentHandle.

Blocking calls (Ray start, `serve.run` waiting for every replica's model to load): run them in a thread.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any

from tetri_engine.cluster.config import ClusterConfig
from tetri_engine.config import EngineConfig

log = logging.getLogger("tetri_engine.cluster")

APP_NAME = "tetri-engine"
DEPLOYMENT_NAME = "EngineReplica"
NAMESPACE = "tetri-engine"
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single machine: bind 127.0.0.1 only
             "RAY_USAGE_STATS_ENABLED": "0"}  # no usage report leaves the machine
# Calls beyond the engine's own queue bound that a replica takes at once: estimates and status polls
# are calls too, and the engine answers "queue full" itself (429), so Serve must not queue in front of it.
EXTRA_ONGOING_CALLS = 64
# A replica whose engine fails to start (a bad model path, out of memory) fails again: give up after 3 failed
# starts in all (Serve's default: 3 per replica, at most 20: with 8 replicas, 20 model loads before it says so).
CONSTRUCTOR_ATTEMPTS = 3


def connect(config: ClusterConfig) -> tuple[bool, bool]:
    """Connect this process to Ray (and start Serve, without its HTTP proxy). Returns (connected here,
    local cluster started here), what `disconnect` undoes; Ray already initialised in this process (a
    test, an embedding program) is used as it is."""
    local = config.ray_address is None
    if local:
        if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
            log.warning("Ray was imported before the local cluster was set up: it may bind this host's "
                        "address rather than 127.0.0.1")
        os.environ.update(LOCAL_ENV)
    import ray
    from ray import serve

    connected = not ray.is_initialized()
    if connected and local:
        cpus = config.ray_num_cpus or max(os.cpu_count() or 1, int(config.replicas * config.cpus_per_replica) + 1)
        ray.init(num_cpus=cpus, include_dashboard=False, namespace=NAMESPACE)
    elif connected:
        ray.init(address=config.ray_address, namespace=NAMESPACE)
    serve.start(proxy_location="Disabled")
    return connected, connected and local


def replica_engine_config(engine: EngineConfig, config: ClusterConfig) -> EngineConfig:
    """What each replica's engine is started with: the served config on the devices of its host."""
    return dataclasses.replace(engine, devices=None, num_cpu_devices=config.devices_per_replica)


def deploy(engine: EngineConfig, config: ClusterConfig, drain_timeout_s: float) -> Any:
    """Run the replicas (waits until every one has loaded its model); returns the DeploymentHandle.
    Replicas get GPUs when the cluster has any (devices_per_replica each), else CPU devices."""
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from tetri_engine.cluster.replica import EngineReplica
    from tetri_engine.cluster.routers import ROUTER_CLASSES

    gpus = config.devices_per_replica if ray.cluster_resources().get("GPU", 0) > 0 else 0
    deployment = serve.deployment(
        EngineReplica, name=DEPLOYMENT_NAME, num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=engine.max_queue + EXTRA_ONGOING_CALLS,
        graceful_shutdown_timeout_s=drain_timeout_s, graceful_shutdown_wait_loop_s=0.5,
        max_constructor_retry_count=CONSTRUCTOR_ATTEMPTS,
        request_router_config=RequestRouterConfig(request_router_class=ROUTER_CLASSES[config.routing]))
    log.info("deploying %d replicas of %d %s each, routing %s", config.replicas, config.devices_per_replica,
             "GPUs" if gpus else "CPU devices", config.routing)
    try:  # no access log: every estimate and status poll would be a line
        return serve.run(deployment.bind(replica_engine_config(engine, config)), name=APP_NAME, route_prefix=None,
                         logging_config={"enable_access_log": False})
    except RuntimeError as exc:
        raise RuntimeError(f"the replicas failed to start: {_replica_error(serve) or exc}") from exc


def _replica_error(serve) -> str | None:
    """The last line of the deployment's status message: a replica constructor's exception."""
    try:
        message = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].message
    except (KeyError, AttributeError):
        return None
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


def disconnect(connected: bool, local: bool) -> None:
    """Take the replicas down (Serve drains each: in-flight calls finish, then its engine drains); then
    stop Serve and Ray if the local cluster was started here, and disconnect if the connection was made
    here (a shared cluster keeps running)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
    finally:
        if connected:
            ray.shutdown()
