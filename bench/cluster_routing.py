"""Does deadline-aware routing meet more deadlines than Ray Serve's routers on a live cluster?

Starts a local Ray cluster (loopback) with N engine replicas of K devices each (the tiny model on CPU
devices by default; GPUs when the cluster has them), then, for each routing policy in turn, deploys the
replicas with it and replays the same Poisson trace through a ClusterEngine (the server's path without
HTTP): each request at its arrival time, its deadline the engine's SLO (sched/slo.py on the replica's
own profile) x --slo-scale, counted from its arrival at the ingress (routing time included). Prints per
routing: SAR (sched/metrics.py: refused and failed requests count as missed), refusals, requests per
replica, and the time from sending a request to its first output (routing + admission on the replica).

    .venv/bin/python bench/cluster_routing.py --replicas 2 --devices-per-replica 2 --rate 6 --num-requests 150
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tetri_engine.cluster import ClusterConfig  # noqa: E402
from tetri_engine.cluster.engine import ClusterEngine  # noqa: E402
from tetri_engine.config import EngineConfig  # noqa: E402
from tetri_engine.errors import RequestRejected  # noqa: E402
from tetri_engine.request import GenerationRequest  # noqa: E402
from tetri_engine.sched.metrics import percentile, sar  # noqa: E402


def trace(num: int, rate_per_s: float, sides: list[int], seed: int) -> list[tuple[float, int]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num):
        t += rng.expovariate(rate_per_s)
        out.append((t, rng.choice(sides)))
    return out


async def one(engine: ClusterEngine, arrival_s: float, side: int, args, start: float, index: int) -> dict:
    """Met: finished within its deadline counted from its arrival here, at the ingress (the engine's own
    deadline_met counts from the request's arrival at its replica, after routing)."""
    await asyncio.sleep(max(0.0, start + arrival_s - time.monotonic()))
    request = GenerationRequest(prompt=f"request {index}", width=side, height=side, seed=index,
                                num_inference_steps=args.steps, slo_scale=args.slo_scale)
    sent = time.monotonic()
    routed_s = None
    try:
        async for out in engine.generate(request):
            routed_s = routed_s if routed_s is not None else time.monotonic() - sent
            if out.finished:
                m = out.metrics
                met = out.state.value == "completed" and time.monotonic() - sent <= m.deadline_s
                return {"state": out.state.value, "met": met, "replica": getattr(m, "replica", None),
                        "routed_s": routed_s}
    except RequestRejected as exc:
        return {"state": "rejected", "met": False, "replica": None, "reason": exc.reason.value,
                "routed_s": time.monotonic() - sent}
    return {"state": "lost", "met": False, "replica": None, "routed_s": routed_s}


async def run_routing(routing: str, args, requests) -> dict:
    engine = ClusterEngine(EngineConfig(model=args.model, max_width=args.max_side, max_height=args.max_side,
                                        max_steps=args.steps),
                           ClusterConfig(replicas=args.replicas, devices_per_replica=args.devices_per_replica,
                                         routing=routing, ray_num_cpus=args.ray_num_cpus))
    await engine.start()
    try:
        start = time.monotonic() + 1.0
        results = await asyncio.gather(*(one(engine, a, s, args, start, i) for i, (a, s) in enumerate(requests)))
    finally:
        await engine.shutdown()
    routed = [r["routed_s"] for r in results if r["routed_s"] is not None]
    return {"routing": routing, "sar": sar(r["met"] for r in results),
            "routing_p50_ms": 1000 * percentile(routed, 50), "routing_p99_ms": 1000 * percentile(routed, 99),
            "rejected": sum(r["state"] == "rejected" for r in results),
            "failed": sum(r["state"] not in ("completed", "rejected") for r in results),
            "per_replica": sorted(Counter(r["replica"] for r in results if r["replica"]).values())}


async def main_async(args) -> None:
    from tetri_engine.cluster import ray_cluster

    connection = ray_cluster.connect(ClusterConfig(replicas=args.replicas, ray_num_cpus=args.ray_num_cpus))
    requests = trace(args.num_requests, args.rate, [int(s) for s in args.sides.split(",")], args.seed)
    try:
        for routing in args.routing.split(","):
            row = await run_routing(routing, args, requests)
            print(f"{routing:<12} SAR {row['sar']:.3f}  refused {row['rejected']:>3}  failed {row['failed']}  "
                  f"requests per replica {row['per_replica']}  to first output p50 {row['routing_p50_ms']:.0f} ms "
                  f"p99 {row['routing_p99_ms']:.0f} ms", flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"bench": "cluster_routing", **vars(args), **row,
                                        "date": time.strftime("%Y-%m-%d")}) + "\n")
    finally:
        ray_cluster.disconnect(*connection)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--devices-per-replica", type=int, default=2)
    parser.add_argument("--ray-num-cpus", type=int, default=4)
    parser.add_argument("--routing", default="deadline,pow2,round-robin")
    parser.add_argument("--rate", type=float, default=6.0, help="requests per second")
    parser.add_argument("--num-requests", type=int, default=150)
    parser.add_argument("--sides", default="64,256,512", help="square image sides, drawn uniformly")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-side", type=int, default=1024, help="largest side the engines take (their profile covers it)")
    parser.add_argument("--slo-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
