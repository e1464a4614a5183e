"""Beyond one host: engine replicas on Ray Serve, behind the same OpenAI-compatible server.

    tetri-engine serve --replicas 2 --devices-per-replica 8 [--ray-address ADDR] [--routing deadline]

    config.py    ClusterConfig: the `serve` flags of a cluster (replicas, devices per replica, Ray address,
                 routing), one field each
    replica.py   EngineReplica: the Ray Serve deployment; each replica is one AsyncEngine on the devices of
                 its host (its GPUs, or N virtual CPU devices), answering estimate / generate / stats
    wire.py      what travels between a replica and the ingress (outputs without PIL images, refusals,
                 estimates), labelled with the replica that served them
    routers.py   the Ray Serve request routers: Ray's own power-of-two and round-robin, and PinnedRouter,
                 which sends a request to the replica the ingress chose (deadline-aware routing)
    engine.py    ClusterEngine: what the aiohttp app (tetri_engine.server) talks to instead of one
                 AsyncEngine: routes each request (sched/routing.py), re-routes a request whose replica
                 died before it started, aggregates stats over the replicas
    stats.py     the aggregation of the replicas' stats (counters stay monotonic across restarts)
    ray_cluster.py  connect to a Ray cluster or start a local one (loopback only), deploy, shut down

Layering: cluster sits beside server (cluster -> server, engine, sched). Ray is imported only where it
is used, so `import tetri_engine.cluster` needs no Ray; the `cluster` extra installs `ray[serve]`.
"""
from __future__ import annotations

from tetri_engine.cluster.config import ClusterConfig

__all__ = ["ClusterConfig"]
