"""Which parts of the TetriServe policy matter? Ablations on the paper's workload.

Replays the same traces (sched/trace.py, the paper's workload) through the TetriServe policy with
one mechanism switched off at a time (elastic scale-up, selective batching, round-length fill,
mid-round backfill) and with other round lengths, and prints the mean SAR over SLO scales
1.0/1.1/1.2/1.5 and seeds per variant.

    .venv/bin/python bench/sim_ablation.py --gpus 8 --rate 12 --seeds 0,1,2,3,4
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
from tetri_engine.sched.simulator import simulate  # noqa: E402
from tetri_engine.sched.trace import generate_trace  # noqa: E402

DEFAULT_PROFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles", "flux-dev-h200-modelled.json")

VARIANTS = {
    "full": {},
    "no scale-up": {"scale_up": False},
    "no batching": {"batching": False},
    "no round fill": {"fill_rounds": False},
    "no backfill": {"backfill": False},
    "round 3 steps": {"round_steps": 3},
    "round 8 steps": {"round_steps": 8},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--rate", type=float, default=12.0)
    parser.add_argument("--mixes", default="uniform,skewed")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--scales", default="1.0,1.1,1.2,1.5")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()
    cost = CostModel.from_json(args.profile)
    scales = [float(x) for x in args.scales.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    mixes = args.mixes.split(",")
    table: dict[str, dict[str, float]] = {}
    for mix in mixes:
        traces = [generate_trace(300, args.rate, mix, seed, cost=cost, max_degree=args.gpus) for seed in seeds]
        for name, options in VARIANTS.items():
            options = dict(options)
            round_steps = options.pop("round_steps", 5)
            sars = [simulate(trace, make_policy("tetri", args.gpus, cost, round_steps=round_steps, **options),
                             slo_scale=scale).sar for trace in traces for scale in scales]
            table.setdefault(name, {})[mix] = statistics.mean(sars)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"bench": "sim_ablation", "variant": name, "mix": mix, "gpus": args.gpus,
                                        "rate_per_min": args.rate, "seeds": seeds, "scales": scales,
                                        "mean_sar": table[name][mix], "date": time.strftime("%Y-%m-%d")}) + "\n")
    print(f"TetriServe ablations, {args.gpus} devices, {args.rate:g} req/min, mean SAR over scales {args.scales} "
          f"and seeds {args.seeds}")
    print(f"{'variant':<16}" + "".join(f"{m:>10}" for m in mixes))
    for name, row in table.items():
        print(f"{name:<16}" + "".join(f"{row[m]:>10.3f}" for m in mixes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
