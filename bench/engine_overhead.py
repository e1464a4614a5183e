"""Engine overhead per round: what the round clock costs on top of the steps themselves.

For every round of a mixed workload run through `AsyncEngine`:

    overhead = round wall time - the busiest group's executor time
             = planning (policy.schedule) + dispatch to the worker threads + waking the loop when
               the futures resolve + bookkeeping (outputs, policy.update_from_output)

where a group's executor time is the executor's own measure (regroup + steps + decode; on GPUs the
devices are synchronised). Planning time is also reported on its own. Prints a summary table and
JSON lines (one per round, then one summary line). Examples:

    python bench/engine_overhead.py                                   # tiny, cpu:0..cpu:3
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python bench/engine_overhead.py --model flux-dev --devices cuda:0,cuda:1 --sizes 512,1024 --steps 20
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest  # noqa: E402
from tetri_engine.sched.metrics import percentile  # noqa: E402


async def run(args) -> dict:
    devices = [d for d in args.devices.split(",") if d] if args.devices else None
    config = EngineConfig(model=args.model, devices=devices, policy=args.policy, profile=args.profile,
                          max_queue=max(64, args.requests), admission="best_effort", round_steps=args.round_steps)
    sides = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(args.seed)
    async with AsyncEngine(config) as engine:
        # Warm-up: one request per size (first-use costs: allocator, communicators, kernels).
        await asyncio.gather(*(drain(engine, GenerationRequest(prompt="warm-up", width=s, height=s,
                                                               num_inference_steps=args.steps, deadline_s=3600))
                               for s in sides))
        skip = len(engine.round_records())
        start = time.monotonic()

        async def client(i: int) -> None:
            await asyncio.sleep(i * args.gap_s)
            side = sides[i % len(sides)] if i < len(sides) else rng.choice(sides)
            await drain(engine, GenerationRequest(prompt=f"overhead {i}", width=side, height=side,
                                                  num_inference_steps=args.steps, seed=i, deadline_s=3600))

        await asyncio.gather(*(client(i) for i in range(args.requests)))
        wall_s = time.monotonic() - start
        rounds = engine.round_records()[skip:]
        devices = engine.devices
    rows = []
    for r in rounds:
        busiest = max((g.executor_s for g in r.groups), default=0.0)
        rows.append({"kind": "round", "index": r.index, "groups": len(r.groups),
                     "degrees": [g.degree for g in r.groups], "wall_ms": r.wall_s * 1e3,
                     "busiest_executor_ms": busiest * 1e3, "overhead_ms": r.overhead_s * 1e3,
                     "plan_ms": r.plan_s * 1e3})
    overhead = [row["overhead_ms"] for row in rows]
    plan = [row["plan_ms"] for row in rows]
    walls = [row["wall_ms"] for row in rows]
    summary = {
        "kind": "summary", "model": args.model, "devices": devices, "policy": args.policy,
        "requests": args.requests, "sizes": sides, "steps": args.steps, "rounds": len(rows), "run_s": wall_s,
        "overhead_ms_median": statistics.median(overhead), "overhead_ms_p90": percentile(overhead, 90),
        "overhead_ms_p99": percentile(overhead, 99), "overhead_ms_mean": statistics.mean(overhead),
        "plan_ms_median": statistics.median(plan), "plan_ms_p99": percentile(plan, 99),
        "round_wall_ms_median": statistics.median(walls),
        "overhead_fraction": sum(overhead) / sum(walls) if sum(walls) else 0.0,
    }
    return {"rows": rows, "summary": summary}


async def drain(engine, request) -> None:
    async for out in engine.generate(request):
        if out.kind == "final" and out.error:
            raise RuntimeError(f"{request.request_id}: {out.error}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--devices", default=None, help="default: every GPU, else cpu:0..cpu:3")
    parser.add_argument("--policy", default="tetri")
    parser.add_argument("--profile", default=None, help="profile JSON (default: measured at start-up, cached)")
    parser.add_argument("--sizes", default="256,512", help="square sides, mixed (default: 256,512)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--gap-s", type=float, default=0.1, help="seconds between arrivals (default: 0.1)")
    parser.add_argument("--round-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    lines = [json.dumps(row) for row in result["rows"]] + [json.dumps(result["summary"])]
    for line in lines:
        print(line)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    s = result["summary"]
    print(f"\n# engine overhead per round, {s['model']} on {','.join(s['devices'])}, policy {s['policy']}, "
          f"{s['rounds']} rounds", file=sys.stderr)
    print("| overhead median | p90 | p99 | mean | plan median | plan p99 | round wall median | share of wall |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|", file=sys.stderr)
    print(f"| {s['overhead_ms_median']:.2f} ms | {s['overhead_ms_p90']:.2f} ms | {s['overhead_ms_p99']:.2f} ms | "
          f"{s['overhead_ms_mean']:.2f} ms | {s['plan_ms_median']:.3f} ms | {s['plan_ms_p99']:.3f} ms | "
          f"{s['round_wall_ms_median']:.1f} ms | {s['overhead_fraction']:.1%} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
