"""ClusterConfig: the `tetri-engine serve` flags that turn one engine into replicas on Ray Serve.

One field per flag, its help in `metadata["help"]` (as ServerConfig and EngineConfig do); `replicas`
None means the single-host server (`make serve`'s default), anything else the cluster.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass

from tetri_engine.config import option
from tetri_engine.sched.routing import ROUTING_POLICIES


@dataclass
class ClusterConfig:
    replicas: int | None = option(None, "serve with this many engine replicas on Ray Serve, each on the devices "
                                 "of one host (default: one engine in this process, no Ray)")
    devices_per_replica: int = option(1, "devices of each replica: GPUs when the Ray cluster has GPUs (Ray "
                                     "gives each replica this many), else virtual CPU devices")
    ray_address: str | None = option(None, "address of a running Ray cluster this machine belongs to (auto, or "
                                    "HEAD_IP:6379); default: start a local one, bound to loopback, stopped "
                                    "with the server", metavar="ADDR")
    routing: str = option("deadline", "how the ingress picks a replica: deadline (each replica's scheduler "
                         "estimates; meet the deadline at the least cost), pow2 (Ray Serve's default: "
                         "power of two choices on queue length), round-robin", choices=ROUTING_POLICIES)
    cpus_per_replica: float = option(1.0, "Ray CPUs each replica reserves")
    ray_num_cpus: int | None = option(None, "CPUs of the local Ray cluster (default: this machine's, at least "
                                     "replicas x cpus-per-replica + 1)")

    def __post_init__(self) -> None:
        if self.replicas is not None and (isinstance(self.replicas, bool) or self.replicas < 1):
            raise ValueError(f"replicas={self.replicas!r} must be an integer >= 1")
        if isinstance(self.devices_per_replica, bool) or self.devices_per_replica < 1:
            raise ValueError(f"devices_per_replica={self.devices_per_replica!r} must be an integer >= 1")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"routing={self.routing!r}: choose from {', '.join(ROUTING_POLICIES)}")
        if not self.cpus_per_replica >= 0:
            raise ValueError(f"cpus_per_replica={self.cpus_per_replica!r} must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.replicas is not None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("cluster (Ray Serve; needs the `cluster` extra)")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = _base_type(hints[f.name])
            extra = {k: f.metadata[k] for k in ("metavar", "choices") if k in f.metadata}
            group.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f.metadata["help"]
                               + ("" if f.default is None else f" (default: {f.default})"), **extra)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClusterConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _base_type(hint) -> type:
    """int -> int, int | None -> int."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint
