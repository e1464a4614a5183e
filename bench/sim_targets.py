"""Does `tetri` beat the paper's policy where it matters? (issue 14 targets, in simulation)

Replays 300-request traces through every policy and the LP upper bound (sched/bound.py) on the
measured 2xH200 profile (2 GPUs at 1.5/3/4.5/6 req/min) and the modelled 8-GPU profile (6/12/18
req/min), for four workloads: the paper's Uniform and Skewed mixes (Poisson), a bursty one (Skewed,
Gamma inter-arrival times with CV 2) and a mixed one (non-square sizes, 20/28/50 steps, Poisson);
SLO scales 1.0/1.1/1.2/1.5; several seeds. Every SAR, percentile and slowdown comes from
sched/metrics.py. Checks, on the mean over seeds of each (profile, load, workload, scale) cell:

  T1  tetri >= tetri-paper and >= every baseline, at every scale (ties: within 0.01)
  T2  mean gain over tetri-paper >= +5 SAR points at scales >= 1.2 and loads >= 4.5 req/min per 2 GPUs
  T3  tetri SAR >= 0.9 x the bound at scales >= 1.2
  T4  tetri p99 slowdown <= 5x at <= 3 req/min per 2 GPUs and <= 10x at 4.5, at scale 1.2

    .venv/bin/python bench/sim_targets.py --seeds 0,1,2 --workers 2 --out bench/results/sim_targets.jsonl

Writes one JSON line per (profile, load, workload, seed, scale) to --out and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tetri_engine.sched import CostModel, make_policy  # noqa: E402
from tetri_engine.sched.bound import sar_bound  # noqa: E402
from tetri_engine.sched.metrics import percentile  # noqa: E402
from tetri_engine.sched.simulator import simulate  # noqa: E402
from tetri_engine.sched.trace import generate_trace  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SETUPS = {  # name -> (profile, gpus, rates per minute)
    "2xH200": (os.path.join(HERE, "profiles", "flux-dev-2xH200.json"), 2, (1.5, 3.0, 4.5, 6.0)),
    "8-GPU modelled": (os.path.join(HERE, "profiles", "flux-dev-h200-modelled.json"), 8, (6.0, 12.0, 18.0)),
}
WORKLOADS = {  # name -> generate_trace keywords
    "uniform": dict(mix="uniform"),
    "skewed": dict(mix="skewed"),
    "bursty": dict(mix="skewed", arrival="gamma", burstiness_cv=2.0),
    "mixed": dict(mix="mixed"),
}
POLICIES = ("tetri", "tetri-paper", "fixed1", "fixed2", "fixed4", "fixed8", "rssp", "edf1", "edf2", "edf4", "edf8",
            "srpt")
REFERENCES = ("srpt",)  # tail reference, not a contender for SAR (left out of T1)


def run_cell(task: tuple) -> list[dict]:
    """One trace (setup, rate, workload, seed) at every scale: SAR and slowdowns of each policy, the bound."""
    setup, rate, workload, seed, scales, num_requests = task
    profile, gpus, _ = SETUPS[setup]
    cost = CostModel.from_json(profile)
    trace = generate_trace(num_requests, rate, seed=seed, cost=cost, max_degree=gpus, **WORKLOADS[workload])
    rows = []
    for scale in scales:
        row = {"bench": "sim_targets", "setup": setup, "profile": os.path.basename(profile), "gpus": gpus,
               "rate_per_min": rate, "workload": workload, "seed": seed, "slo_scale": scale,
               "num_requests": num_requests, "sar": {}, "slowdown": {}, "given_up": {}, "decision_p99_ms": {}}
        t0 = time.perf_counter()
        row["bound"] = sar_bound(trace, cost, gpus, scale).sar
        row["bound_s"] = time.perf_counter() - t0
        for name in POLICIES:
            try:
                policy = make_policy(name, gpus, cost)
            except ValueError:
                continue  # e.g. fixed8 on 2 GPUs
            result = simulate(trace, policy, slo_scale=scale)
            row["sar"][name] = result.sar
            row["slowdown"][name] = result.slowdowns()
            row["given_up"][name] = sum(r.given_up_s is not None for r in result.requests)
            p99 = percentile(result.decision_s, 99)
            row["decision_p99_ms"][name] = None if p99 is None else 1e3 * p99
        rows.append(row)
    return rows


def mean_cells(rows: list[dict]) -> dict:
    """(setup, rate, workload, scale) -> {"sar": {policy: mean}, "bound": mean, "p99": {policy: mean p99 slowdown}}."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setup"], r["rate_per_min"], r["workload"], r["slo_scale"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        names = list(rs[0]["sar"])
        out[key] = {
            "seeds": len(rs),
            "sar": {n: statistics.mean(r["sar"][n] for r in rs) for n in names},
            "bound": statistics.mean(r["bound"] for r in rs),
            "p50": {n: statistics.mean(r["slowdown"][n]["p50"] for r in rs) for n in names},
            "p90": {n: statistics.mean(r["slowdown"][n]["p90"] for r in rs) for n in names},
            "p99": {n: statistics.mean(r["slowdown"][n]["p99"] for r in rs) for n in names},
        }
    return out


def per_two_gpus(setup: str, rate: float) -> float:
    return rate * 2 / SETUPS[setup][1]


def check_targets(cells: dict) -> list[str]:
    lines = []
    t1_fail, t1_margin = [], None
    t2 = {}
    t3_fail, t3_min = [], None
    t4_fail = []
    for (setup, rate, workload, scale), c in sorted(cells.items()):
        sar = c["sar"]
        others = [n for n in sar if n != "tetri" and n not in REFERENCES]
        best_other = max(others, key=lambda n: sar[n])
        margin = sar["tetri"] - sar[best_other]
        t1_margin = margin if t1_margin is None else min(t1_margin, margin)
        if margin < -0.01:
            t1_fail.append(f"{setup} {rate:g}/min {workload} x{scale:g}: tetri {sar['tetri']:.3f} < {best_other} "
                           f"{sar[best_other]:.3f}")
        load = per_two_gpus(setup, rate)
        if scale >= 1.2 - 1e-9 and load >= 4.5 - 1e-9:
            t2.setdefault((setup, rate), []).append(sar["tetri"] - sar["tetri-paper"])
        if scale >= 1.2 - 1e-9:
            ratio = sar["tetri"] / c["bound"] if c["bound"] > 0 else 1.0
            t3_min = ratio if t3_min is None else min(t3_min, ratio)
            if ratio < 0.9:
                t3_fail.append(f"{setup} {rate:g}/min {workload} x{scale:g}: {sar['tetri']:.3f} / bound "
                               f"{c['bound']:.3f} = {ratio:.3f}")
        if abs(scale - 1.2) < 1e-9:
            limit = 5.0 if load <= 3.0 + 1e-9 else 10.0 if load <= 4.5 + 1e-9 else None
            if limit is not None and c["p99"]["tetri"] > limit:
                t4_fail.append(f"{setup} {rate:g}/min {workload}: p99 {c['p99']['tetri']:.1f}x > {limit:g}x "
                               f"(srpt {c['p99']['srpt']:.1f}x, tetri-paper {c['p99']['tetri-paper']:.1f}x)")
    lines.append(f"T1 tetri >= every other policy - 0.01 in every cell: {'MET' if not t1_fail else 'MISSED'} "
                 f"(smallest margin {t1_margin:+.3f})")
    lines += ["    " + f for f in t1_fail]
    all_gains = [g for gs in t2.values() for g in gs]
    mean_gain = statistics.mean(all_gains) if all_gains else float("nan")
    lines.append(f"T2 mean gain over tetri-paper at x>=1.2, >=4.5 req/min per 2 GPUs: {100 * mean_gain:+.1f} points "
                 f"({'MET' if mean_gain >= 0.05 else 'MISSED'}); per load: "
                 + ", ".join(f"{s} {r:g}/min {100 * statistics.mean(g):+.1f}" for (s, r), g in sorted(t2.items())))
    lines.append(f"T3 SAR >= 0.9 x bound at x>=1.2: {'MET' if not t3_fail else 'MISSED'} (lowest ratio {t3_min:.3f})")
    lines += ["    " + f for f in t3_fail]
    lines.append(f"T4 p99 slowdown at x1.2 (<=5x at <=3/min per 2 GPUs, <=10x at 4.5): "
                 f"{'MET' if not t4_fail else 'MISSED'}")
    lines += ["    " + f for f in t4_fail]
    return lines


def tables(cells: dict) -> list[str]:
    lines = []
    names = ["tetri", "tetri-paper", "srpt"]
    for setup in SETUPS:
        for workload in WORKLOADS:
            keys = sorted(k for k in cells if k[0] == setup and k[2] == workload)
            if not keys:
                continue
            rates = sorted({k[1] for k in keys})
            scales = sorted({k[3] for k in keys})
            lines.append(f"\n{setup}, {workload}: SAR (mean of {cells[keys[0]]['seeds']} seeds), best baseline = best of "
                         f"fixedK/edfK/rssp")
            lines.append("| req/min | policy | " + " | ".join(f"x{s:g}" for s in scales) + " | p50/p90/p99 slowdown at x1.2 |")
            lines.append("|---" * (len(scales) + 3) + "|")
            for rate in rates:
                row_cells = [cells[(setup, rate, workload, s)] for s in scales]
                base = [n for n in row_cells[0]["sar"] if n not in names]
                at12 = cells.get((setup, rate, workload, 1.2))
                lines.append(f"| {rate:g} | bound | " + " | ".join(f"{c['bound']:.3f}" for c in row_cells) + " | |")
                for n in names + ["best baseline"]:
                    if n == "best baseline":
                        vals = [max(c["sar"][b] for b in base) for c in row_cells]
                        tail = ""
                    else:
                        vals = [c["sar"][n] for c in row_cells]
                        tail = (f"{at12['p50'][n]:.1f} / {at12['p90'][n]:.1f} / {at12['p99'][n]:.1f}" if at12 else "")
                    label = f"**{n}**" if n == "tetri" else n
                    lines.append(f"| | {label} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {tail} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--scales", default="1.0,1.1,1.2,1.5")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2, help="processes (the dev box has 2 cores, shared)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--from-jsonl", default=None, help="only print the tables of an earlier --out file")
    args = parser.parse_args()
    if args.from_jsonl:
        with open(args.from_jsonl, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        scales = [float(x) for x in args.scales.split(",")]
        tasks = [(setup, rate, workload, int(seed), scales, args.num_requests)
                 for setup in args.setups.split(",") for rate in SETUPS[setup][2]
                 for workload in args.workloads.split(",") for seed in args.seeds.split(",")]
        t0 = time.perf_counter()
        with multiprocessing.Pool(max(1, args.workers)) as pool:
            rows = [row for rows in pool.imap_unordered(run_cell, tasks) for row in rows]
        print(f"{len(tasks)} traces x {len(scales)} scales in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
    cells = mean_cells(rows)
    print("\n".join(tables(cells)))
    print()
    print("\n".join(check_targets(cells)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
