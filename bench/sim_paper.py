"""Does TetriServe beat the baselines on the paper's workload? (issue 4 SAR targets; since issue 14
`tetri` is the new policy and `tetri-paper` the paper-faithful one, both compared here; the issue-14
targets are checked by bench/sim_targets.py)

Replays the paper's workload (sched/trace.py: 300 requests, 50 steps, 256..2048 px, Poisson) through
every policy at SLO scales 1.0/1.1/1.2/1.5 on simulated devices with a profile, for several seeds,
and reports the SAR table per (devices, rate, mix), TetriServe's gain over the best fixed degree
and over the best baseline, and, as the strongest static baseline, `rssp*`: for each scale, the
best of every per-resolution degree assignment (4 resolutions x each degree), picked on the very
trace being scored (an oracle no real system has).

    .venv/bin/python bench/sim_paper.py --gpus 8 --rate 12 --seeds 0,1,2
    .venv/bin/python bench/sim_paper.py --gpus 2 --rate 3 --seeds 0,1,2

Writes one JSON line per (mix, seed) to --out when given, and prints the tables.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tetri_engine.sched import CostModel, RSSPPolicy, make_policy  # noqa: E402
from tetri_engine.sched.report import run_sweep  # noqa: E402
from tetri_engine.sched.simulator import simulate  # noqa: E402
from tetri_engine.sched.trace import PAPER_SIDES_PX, generate_trace  # noqa: E402

DEFAULT_PROFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles", "flux-dev-h200-modelled.json")


def rssp_oracle(trace, cost, gpus, scales) -> tuple[list[float], list[tuple[int, ...]]]:
    """Per scale, the best SAR over every static per-resolution degree assignment."""
    degrees = cost.degrees_upto(gpus)
    best = [-1.0] * len(scales)
    best_assignment: list[tuple[int, ...]] = [()] * len(scales)
    for combo in itertools.product(degrees, repeat=len(PAPER_SIDES_PX)):
        by_size = {(s, s): d for s, d in zip(PAPER_SIDES_PX, combo)}
        for i, scale in enumerate(scales):
            sar = simulate(trace, RSSPPolicy(gpus, cost, degree_by_size=by_size), slo_scale=scale).sar
            if sar > best[i]:
                best[i], best_assignment[i] = sar, combo
    return best, best_assignment


def gains(sar: dict[str, list[float]], names: list[str]) -> tuple[float, float, bool]:
    """(mean relative gain, mean absolute gain, tetri >= best at every scale) of tetri over the best of names."""
    rel, ab, ge = [], [], True
    for i in range(len(sar["tetri"])):
        best = max(sar[n][i] for n in names)
        t = sar["tetri"][i]
        ab.append(t - best)
        if best > 0:
            rel.append((t - best) / best)
        ge = ge and t >= best
    return statistics.mean(rel) if rel else float("nan"), statistics.mean(ab), ge


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--rate", type=float, default=12.0, help="requests per minute")
    parser.add_argument("--mixes", default="uniform,skewed")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--scales", default="1.0,1.1,1.2,1.5")
    parser.add_argument("--policies", default="tetri,tetri-paper,fixed1,fixed2,fixed4,fixed8,rssp,edf1,edf2,edf4,edf8")
    parser.add_argument("--round-steps", type=int, default=5)
    parser.add_argument("--jitter-cv", type=float, default=0.0)
    parser.add_argument("--no-oracle", action="store_true", help="skip rssp* (4^4 assignments per scale)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()

    cost = CostModel.from_json(args.profile)
    scales = [float(x) for x in args.scales.split(",")]
    policies = []
    for name in args.policies.split(","):
        try:
            make_policy(name, args.gpus, cost)
            policies.append(name)
        except ValueError:
            pass  # e.g. fixed8 on 2 devices
    machine = f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    for mix in args.mixes.split(","):
        per_seed = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            trace = generate_trace(args.num_requests, args.rate, mix, seed, cost=cost, max_degree=args.gpus)
            t0 = time.perf_counter()
            sweep = run_sweep(trace, cost, args.gpus, policies, scales, label=mix, round_steps=args.round_steps,
                              jitter_cv=args.jitter_cv, seed=seed, gantt_policy=None)
            sar = dict(sweep.sar)
            assignment = None
            if not args.no_oracle:
                sar["rssp*"], assignment = rssp_oracle(trace, cost, args.gpus, scales)
            row = {"bench": "sim_paper", "profile": os.path.basename(args.profile), "gpus": args.gpus,
                   "rate_per_min": args.rate, "mix": mix, "seed": seed, "scales": scales, "sar": sar,
                   "rssp_oracle_degrees": assignment, "round_steps": args.round_steps,
                   "jitter_cv": args.jitter_cv, "elapsed_s": time.perf_counter() - t0, "machine": machine,
                   "date": time.strftime("%Y-%m-%d")}
            per_seed.append(row)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
        names = list(per_seed[0]["sar"])
        mean = {n: [statistics.mean(r["sar"][n][i] for r in per_seed) for i in range(len(scales))] for n in names}
        print(f"\n{mix}, {args.gpus} devices, {args.rate:g} req/min, seeds {args.seeds} "
              f"(mean SAR over {len(per_seed)} trace(s) of {args.num_requests})")
        print(f"{'policy':<8}" + "".join(f"{'x' + format(s, 'g'):>8}" for s in scales))
        for n in names:
            print(f"{n:<8}" + "".join(f"{v:>8.3f}" for v in mean[n]))
        fixed = [n for n in names if n.startswith("fixed")]
        baselines = [n for n in names if n != "tetri"]
        best_label = "best baseline (incl. rssp*)" if "rssp*" in names else "best baseline"
        for label, group in (("best fixed degree", fixed), (best_label, baselines)):
            rel, ab, ge = gains(mean, group)
            print(f"tetri vs {label}: mean relative gain {100 * rel:+.1f}%, absolute {100 * ab:+.1f} points, "
                  f">= at every scale: {ge}")
        if not args.no_oracle and len(per_seed) == 1:
            print(f"rssp* degrees (256, 512, 1024, 2048) per scale: {per_seed[0]['rssp_oracle_degrees']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
