#!/usr/bin/env python3
"""Do the parallel layouts raise SLO attainment? (issue 16's simulation target)

Replays SD3 workloads (every request with true classifier-free guidance: the model's guidance 7, the
paper's sizes 256..2048, 28 steps) through `tetri` on a profile with layout rows (the CFG-parallel step,
the patch-parallel decode) and on the same profile without them (`CostModel.without_layouts`), on the
same traces: their deadlines come from the SP-only profile (sched/slo.py), so both runs chase the same
deadlines. The baselines (sequence parallelism only, whatever the profile) and the LP upper bound with
the layouts are printed for context. Target: tetri's SAR with the layouts >= without, in every cell
(mean over seeds).

    .venv/bin/python bench/sim_layouts.py --profile bench/profiles/sd3-medium-2xH200-modelled.json \\
        --gpus 2 --out bench/results/sim-layouts-sd3-2xH200-modelled.jsonl

--cfg-scale multiplies the profile's CFG-parallel step times (a sensitivity check on an assumed row:
1.2 = the layout 20% slower than the profile says). Writes one JSON line per cell to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tetri_engine.sched import CostModel, make_policy  # noqa: E402
from tetri_engine.sched.simulator import simulate  # noqa: E402
from tetri_engine.sched.trace import generate_trace  # noqa: E402

CONTEXT = ("fixed1", "fixed2", "rssp")


def scaled_cfg(cost: CostModel, factor: float) -> CostModel:
    data = cost.to_dict()
    for entry in data["step_ms"]:
        if entry.get("cfg", 1) > 1:
            entry["ms"] *= factor
    return CostModel.from_dict(data)


def run_cell(cost: CostModel, plain: CostModel, gpus: int, mix: str, rate: float, seed: int, scales, args) -> list[dict]:
    trace = generate_trace(args.num_requests, rate, mix, seed, steps=args.steps, cost=plain, max_degree=gpus)
    trace = [r.__class__(**{**r.__dict__, "cfg": True}) for r in trace]  # SD3 at guidance 7: true CFG
    rows = []
    for scale in scales:
        row = {"mix": mix, "rate_per_min": rate, "seed": seed, "slo_scale": scale, "gpus": gpus,
               "cfg_scale": args.cfg_scale}
        for label, model, name in (("tetri+layouts", cost, "tetri"), ("tetri", plain, "tetri"),
                                   *((n, plain, n) for n in CONTEXT)):
            result = simulate(trace, make_policy(name, gpus, model, round_steps=args.round_steps), slo_scale=scale)
            row[label] = result.sar
            if label == "tetri+layouts":  # how much it used the CFG layout: its share of busy device-time
                busy = sum(b.end_s - b.start_s for b in result.busy)
                row["cfg_busy_share"] = sum(b.end_s - b.start_s for b in result.busy if b.cfg > 1) / max(busy, 1e-9)
        if args.bound:
            from tetri_engine.sched.bound import sar_bound

            row["bound+layouts"] = sar_bound(trace, cost, gpus, scale).sar
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="bench/profiles/sd3-medium-2xH200-modelled.json")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--mixes", default="uniform,skewed")
    parser.add_argument("--rates", default="6,12,18,24", help="arrivals per minute")
    parser.add_argument("--scales", default="1.0,1.2,1.5", help="SLO scales")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--steps", type=int, default=28, help="denoising steps (SD3's default: 28)")
    parser.add_argument("--round-steps", type=int, default=5)
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="multiply the CFG-parallel step rows")
    parser.add_argument("--bound", action=argparse.BooleanOptionalAction, default=True, help="the LP bound (highspy)")
    parser.add_argument("--out", default=None, help="JSON lines (one per cell)")
    args = parser.parse_args()

    cost = CostModel.from_json(args.profile)
    if args.cfg_scale != 1.0:
        cost = scaled_cfg(cost, args.cfg_scale)
    plain = cost.without_layouts()
    if not cost.cfg_degrees and cost.decode_degrees == (1,):
        print(f"note: {args.profile} has no layout rows: both runs are the same", file=sys.stderr)
    scales = [float(s) for s in args.scales.split(",")]
    rows = []
    for mix in args.mixes.split(","):
        for rate in (float(r) for r in args.rates.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                rows += run_cell(cost, plain, args.gpus, mix, rate, seed, scales, args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return report(rows, cost, args)


def report(rows: list[dict], cost: CostModel, args) -> int:
    labels = ["tetri+layouts", "tetri", *CONTEXT] + (["bound+layouts"] if args.bound else [])
    print(f"SAR, mean over seeds {args.seeds}: {cost.name}, {args.gpus} GPUs, SD3 workload (true CFG), "
          f"{args.steps} steps, {args.num_requests} requests, CFG rows x{args.cfg_scale:g}")
    print("| mix | req/min | SLO scale | " + " | ".join(labels) + " | gain | CFG-layout share of busy time |")
    print("|---|---|---|" + "---|" * (len(labels) + 2))
    misses = []
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["mix"], row["rate_per_min"], row["slo_scale"]), []).append(row)
    for (mix, rate, scale), group in cells.items():
        mean = {label: statistics.mean(r[label] for r in group) for label in labels}
        gain = mean["tetri+layouts"] - mean["tetri"]
        share = statistics.mean(r["cfg_busy_share"] for r in group)
        print(f"| {mix} | {rate:g} | {scale:g} | " + " | ".join(f"{mean[label]:.3f}" for label in labels)
              + f" | {gain:+.3f} | {share:.0%} |")
        if gain < -1e-9:
            misses.append(f"{mix} {rate:g}/min x{scale:g}: {gain:+.3f}")
    gains = [statistics.mean(r["tetri+layouts"] - r["tetri"] for r in group) for group in cells.values()]
    print(f"\nmean gain {statistics.mean(gains):+.3f} SAR, min {min(gains):+.3f}, max {max(gains):+.3f}")
    print("target met: SAR with the layouts >= without in every cell" if not misses
          else "target missed in: " + "; ".join(misses))
    return 0 if not misses else 1


if __name__ == "__main__":
    sys.exit(main())
