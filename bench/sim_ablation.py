"""Which parts of the `tetri` policy matter? Ablations on the paper's workload.

Replays the same traces (sched/trace.py, the paper's workload) through `tetri` with one mechanism
switched off or changed at a time (elastic scale-up, giving up, the opt-in tail rescue, other group
lengths), next to the paper-faithful `tetri-paper`, and prints the mean SAR and the mean p99
slowdown over SLO scales 1.0/1.1/1.2/1.5 and seeds per variant.

    .venv/bin/python bench/sim_ablation.py --gpus 8 --rate 12 --seeds 0,1,2
    .venv/bin/python bench/sim_ablation.py --gpus 2 --rate 4.5 --profile bench/profiles/flux-dev-2xH200.json
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

VARIANTS = {  # label -> (policy, options)
    "tetri": ("tetri", {}),
    "no scale-up": ("tetri", {"scale_up": False}),
    "no giving up": ("tetri", {"give_up": False}),
    "rescue at 3x": ("tetri", {"rescue_slowdown": 3.0}),
    "groups 3 steps": ("tetri", {"round_steps": 3}),
    "groups 8 steps": ("tetri", {"round_steps": 8}),
    "tetri-paper": ("tetri-paper", {}),
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
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for mix in mixes:
        traces = [generate_trace(300, args.rate, mix, seed, cost=cost, max_degree=args.gpus) for seed in seeds]
        for label, (name, options) in VARIANTS.items():
            options = dict(options)
            round_steps = options.pop("round_steps", 5)
            runs = [simulate(trace, make_policy(name, args.gpus, cost, round_steps=round_steps, **options),
                             slo_scale=scale) for trace in traces for scale in scales]
            sar = statistics.mean(r.sar for r in runs)
            p99 = statistics.mean(r.slowdowns()["p99"] for r in runs)
            table.setdefault(label, {})[mix] = (sar, p99)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"bench": "sim_ablation", "variant": label, "policy": name, "mix": mix,
                                        "gpus": args.gpus, "rate_per_min": args.rate, "seeds": seeds,
                                        "scales": scales, "mean_sar": sar, "mean_p99_slowdown": p99,
                                        "profile": os.path.basename(args.profile),
                                        "date": time.strftime("%Y-%m-%d")}) + "\n")
    print(f"tetri ablations, {args.gpus} devices, {args.rate:g} req/min, mean SAR / mean p99 slowdown over "
          f"scales {args.scales} and seeds {args.seeds}")
    print(f"{'variant':<16}" + "".join(f"{m:>18}" for m in mixes))
    for label, row in table.items():
        print(f"{label:<16}" + "".join(f"{row[m][0]:>11.3f} /{row[m][1]:>5.1f}" for m in mixes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
