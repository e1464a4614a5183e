"""The Ray Serve request routers of the engine deployment, one per routing policy (sched/routing.py).

    pow2         Ray Serve's default, PowerOfTwoChoicesRequestRouter: two replicas at random, the one with
                 fewer ongoing requests (queue length, probed or cached).
    round-robin  Ray Serve's RoundRobinRouter (ray.serve.experimental): the next replica in turn.
    deadline     PinnedRouter: the ingress (engine.py) has asked every replica for an estimate and chosen
                 one; the call names it (`replica=` keyword) and this router sends it there. A call that
                 names none, or a replica that has gone, gets two random replicas, the less loaded one
                 (as pow2): the replica's own admission then decides.

PinnedRouter leaves out Ray's FIFOMixin on purpose: with it, a replica chosen for one request may be
handed to another one waiting (FIFO order), which would break the pin.
"""
from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PIN_KEYWORD = "replica"  # the keyword of EngineReplica.estimate / generate that names the replica

ROUTER_CLASSES = {
    "pow2": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",  # Serve's default path
    "round-robin": "ray.serve.experimental.round_robin_router:RoundRobinRouter",
    "deadline": "tetri_engine.cluster.routers:PinnedRouter",
}


class PinnedRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        pin = pending_request.kwargs.get(PIN_KEYWORD) if pending_request is not None else None
        if pin is not None:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == pin:
                    return [[replica]]
        if not candidate_replicas:
            return []
        # Serve probes the queue lengths of one rank and takes the shortest: two random ones = pow2.
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
