"""Which routing policy in front of N engine hosts meets the most deadlines? The N-host simulator.

Replays the paper's workload (sched/trace.py) at the paper's per-GPU rate (12 req/min per 8 GPUs by
default) over N hosts of M simulated GPUs, each host running `tetri` on its own GPUs, with each
routing policy in front (sched/routing.py: deadline-aware, power of two choices on queue length, round
robin), under both admission modes, and prints the mean SAR (metrics.sar: every request submitted
counts, refused ones as missed) over seeds per SLO scale. The "one pool" row is a reference, not a
router: one host with all N x M GPUs (the same admission), what no cluster can be.

    .venv/bin/python bench/sim_cluster.py --hosts 8 --gpus-per-host 8
    .venv/bin/python bench/sim_cluster.py --hosts 4 --gpus-per-host 2 --profile bench/profiles/flux-dev-2xH200.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tetri_engine.sched import CostModel, make_policy  # noqa: E402
from tetri_engine.sched.cluster_sim import ADMISSION_MODES, simulate_cluster  # noqa: E402
from tetri_engine.sched.routing import ROUTING_POLICIES  # noqa: E402
from tetri_engine.sched.trace import generate_trace  # noqa: E402

DEFAULT_PROFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles", "flux-dev-h200-modelled.json")
POOL = "one pool"


def _list(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def run_row(row: str, traces: list, args, cost, scale: float, admission: str) -> dict:
    """Mean SAR, refused share and host imbalance (max/mean requests per host) of one row over traces."""
    runs = []
    for seed, trace in traces:
        if row == POOL:
            result = simulate_cluster(trace, lambda: make_policy("tetri", args.hosts * args.gpus_per_host, cost), 1,
                                      "round-robin", slo_scale=scale, admission=admission,
                                      max_queue=args.max_queue * args.hosts, seed=seed)
        else:
            result = simulate_cluster(trace, lambda: make_policy("tetri", args.gpus_per_host, cost), args.hosts, row,
                                      slo_scale=scale, admission=admission, max_queue=args.max_queue, seed=seed)
        runs.append(result)
    per_host = [r.requests_per_host() for r in runs]
    return {"sar": statistics.mean(r.sar for r in runs),
            "refused": statistics.mean(r.rejected / len(r.requests) for r in runs),
            "imbalance": statistics.mean(max(c) / statistics.mean(c) for c in per_host if sum(c))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--gpus-per-host", type=int, default=8)
    parser.add_argument("--rate-per-gpu", type=float, default=1.5, help="req/min per GPU (paper: 12 per 8 GPUs)")
    parser.add_argument("--requests-per-gpu", type=float, default=37.5, help="trace length (paper: 300 per 8 GPUs)")
    parser.add_argument("--mixes", default="uniform,skewed")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--scales", default="1.0,1.1,1.2,1.5")
    parser.add_argument("--admission", default=",".join(ADMISSION_MODES))
    parser.add_argument("--routing", default=",".join(ROUTING_POLICIES) + "," + POOL)
    parser.add_argument("--max-queue", type=int, default=64, help="per host, as EngineConfig.max_queue")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()
    cost = CostModel.from_json(args.profile)
    gpus = args.hosts * args.gpus_per_host
    rate = args.rate_per_gpu * gpus
    num_requests = round(args.requests_per_gpu * gpus)
    scales, seeds = _list(args.scales, float), _list(args.seeds, int)
    print(f"{args.hosts} hosts x {args.gpus_per_host} GPUs ({os.path.basename(args.profile)}), {rate:g} req/min, "
          f"{num_requests} requests per trace; mean SAR over seeds {args.seeds} [refused share, max/mean "
          "requests per host]")
    for mix in _list(args.mixes):
        traces = [(seed, generate_trace(num_requests, rate, mix, seed, cost=cost, max_degree=args.gpus_per_host))
                  for seed in seeds]
        for admission in _list(args.admission):
            print(f"\n{mix}, admission {admission}")
            print(f"{'routing':<13}" + "".join(f"{'x' + format(s, 'g'):>24}" for s in scales))
            for row in _list(args.routing):
                t0 = time.perf_counter()
                cells = [run_row(row, traces, args, cost, scale, admission) for scale in scales]
                print(f"{row:<13}" + "".join(f"{c['sar']:>9.3f} [{c['refused']:.3f}, {c['imbalance']:.2f}]"
                                             for c in cells) + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as f:
                        for scale, c in zip(scales, cells):
                            f.write(json.dumps({"bench": "sim_cluster", "routing": row, "mix": mix,
                                                "admission": admission, "hosts": args.hosts,
                                                "gpus_per_host": args.gpus_per_host, "rate_per_min": rate,
                                                "num_requests": num_requests, "seeds": seeds, "slo_scale": scale,
                                                **c, "profile": os.path.basename(args.profile),
                                                "date": time.strftime("%Y-%m-%d")}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
