"""`tetri-engine simulate`: replay traces through scheduling policies on simulated devices.

    tetri-engine simulate --profile bench/profiles/flux-dev-h200-modelled.json --gpus 8 \\
        --mix uniform,skewed,mixed --rate 12 --num-requests 300 --slo-scale 1.0,1.1,1.2,1.5 \\
        --policies tetri,tetri-paper,fixed1,fixed2,fixed4,fixed8,rssp,edf2,srpt --output sim-out

Prints per trace a SAR table (policy x SLO scale) with a `bound` row (an LP relaxation no schedule
can beat, sched/bound.py; `--bound mip` for the tighter 0/1 bound, `--bound none` to skip) and the
slowdown percentiles (latency / fastest time alone) of every policy, and writes, under --output:
results.json, the traces replayed (trace-<label>.jsonl), sar.png (SAR vs scale) and
gantt-<label>.png (per-device timeline of one run). Never imports torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

DEFAULT_PROFILE = os.path.join("bench", "profiles", "flux-dev-h200-modelled.json")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="step-time profile JSON (default: %(default)s)")
    parser.add_argument("--gpus", type=int, default=8, help="simulated devices (default: %(default)s)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--trace", help="JSON-lines trace file (arrival_s, width, height, steps, slo_ms)")
    src.add_argument("--mix", type=_names, default=["uniform"],
                     help="generated workload mix(es), comma-separated: uniform, skewed (the paper's), mixed "
                          "(non-square sizes, 20/28/50 steps) (default: uniform)")
    parser.add_argument("--rate", type=float, default=12.0, help="arrivals per minute (default: %(default)s)")
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--steps", type=int, default=50,
                        help="denoising steps per request, uniform/skewed mixes (default: %(default)s)")
    parser.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson",
                        help="arrival process; gamma is bursty (default: %(default)s)")
    parser.add_argument("--burstiness-cv", type=float, default=2.0, help="gamma inter-arrival CV (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-scale", type=_floats, default=[1.0, 1.1, 1.2, 1.5],
                        help="comma-separated SLO scales (default: 1.0,1.1,1.2,1.5)")
    default_policies = ["tetri", "tetri-paper", "fixed1", "fixed2", "fixed4", "fixed8", "rssp", "edf2", "srpt"]
    parser.add_argument("--policies", type=_names, default=default_policies,
                        help=f"comma-separated policies (default: {','.join(default_policies)})")
    parser.add_argument("--bound", choices=("lp", "mip", "none"), default="lp",
                        help="upper bound on SAR per scale: LP relaxation (fast), MIP dual bound (tighter, "
                             "slower), none (default: %(default)s)")
    parser.add_argument("--round-steps", type=int, default=5, help="TetriServe round: steps of a typical request")
    parser.add_argument("--round-s", type=float, default=None, help="TetriServe round length in seconds (overrides)")
    parser.add_argument("--jitter-cv", type=float, default=0.0, help="Gaussian jitter of simulated group times")
    parser.add_argument("--cfg", action="store_true",
                        help="every request has true classifier-free guidance (an SD3 workload at guidance > 1): "
                             "policies that offer CFG parallel (tetri) may run it where the profile has cfg rows")
    parser.add_argument("--no-layouts", action="store_true",
                        help="ignore the profile's CFG-parallel step and patch-parallel decode rows: "
                             "sequence parallelism only (to compare with and without them)")
    parser.add_argument("--gantt-policy", default="tetri", help="policy whose first run is drawn as a Gantt chart")
    parser.add_argument("--gantt-window-s", type=float, default=60.0, help="seconds of timeline in the Gantt chart")
    parser.add_argument("--output", default="sim-out", help="directory for results.json, traces and plots")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _progress(total: int, quiet: bool):
    """A callable advancing a progress bar (tqdm when installed, else a plain counter on stderr)."""
    if quiet:
        return (lambda msg: None), (lambda: None)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, unit="run", file=sys.stderr, leave=False)

        def step(msg: str) -> None:
            bar.set_postfix_str(msg[-60:])
            bar.update(1)

        return step, bar.close
    count = [0]

    def plain(msg: str) -> None:
        count[0] += 1
        print(f"[{count[0]}/{total}] {msg}", file=sys.stderr)

    return plain, (lambda: None)


def run(args: argparse.Namespace) -> int:
    from tetri_engine.sched import CostModel
    from tetri_engine.sched.report import run_sweep

    if args.gpus < 1:
        print("error: --gpus must be >= 1", file=sys.stderr)
        return 2
    try:
        cost = CostModel.from_json(args.profile)
    except (OSError, ValueError) as exc:
        print(f"error: cannot load profile {args.profile}: {exc}", file=sys.stderr)
        return 2
    if args.no_layouts:
        cost = cost.without_layouts()
    policies = _usable_policies(args, cost)
    if not policies:
        return 2
    os.makedirs(args.output, exist_ok=True)
    try:
        traces = _traces(args, cost)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.cfg:
        traces = [(label, [dataclasses.replace(r, cfg=True) for r in trace]) for label, trace in traces]

    step, close = _progress(len(traces) * len(policies) * len(args.slo_scale), args.quiet)
    t0 = time.perf_counter()
    sweeps = []
    try:
        for label, trace in traces:
            sweeps.append(run_sweep(trace, cost, args.gpus, policies, args.slo_scale, label=label,
                                    round_steps=args.round_steps, round_s=args.round_s, jitter_cv=args.jitter_cv,
                                    seed=args.seed, gantt_policy=args.gantt_policy, progress=step,
                                    bound=None if args.bound == "none" else args.bound))
    finally:
        close()
    elapsed = time.perf_counter() - t0
    for sweep in sweeps:
        print(sweep.table())
        print()
    written = _write(args, cost, policies, sweeps, elapsed)
    print(f"wrote {', '.join(written)} to {args.output} ({elapsed:.1f} s of simulation)")
    return 0


def _usable_policies(args: argparse.Namespace, cost) -> list[str]:
    """The requested policies that exist for this many devices (others skipped with a note)."""
    from tetri_engine.sched import POLICY_NAMES, make_policy

    policies = []
    for name in args.policies:
        try:
            make_policy(name, args.gpus, cost)
        except ValueError as exc:
            print(f"note: skipping policy {name}: {exc}", file=sys.stderr)
            continue
        policies.append(name)
    if not policies:
        print(f"error: no usable policy (known: {', '.join(POLICY_NAMES)})", file=sys.stderr)
    return policies


def _traces(args: argparse.Namespace, cost) -> list[tuple[str, list]]:
    """(label, trace) per trace file or generated mix; generated ones are written under --output.
    ValueError when a request's size is outside the profile."""
    from tetri_engine.sched.trace import generate_trace, read_trace, write_trace

    traces = []
    if args.trace:
        traces.append((os.path.splitext(os.path.basename(args.trace))[0], read_trace(args.trace)))
    else:
        for mix in args.mix:
            trace = generate_trace(args.num_requests, args.rate, mix, args.seed, steps=args.steps,
                                   arrival=args.arrival, burstiness_cv=args.burstiness_cv, cost=cost,
                                   max_degree=args.gpus)
            label = f"{mix}-{args.rate:g}rpm"
            write_trace(os.path.join(args.output, f"trace-{label}.jsonl"), trace)
            traces.append((label, trace))
    for _, trace in traces:
        for r in trace:
            cost.check(r.width, r.height)
    return traces


def _write(args: argparse.Namespace, cost, policies: list[str], sweeps: list, elapsed: float) -> list[str]:
    """results.json and (unless --no-plots) sar.png and the Gantt charts; returns the names written."""
    from tetri_engine.sched.report import plot_gantt, plot_sar

    results = {
        "profile": args.profile,
        "profile_source": cost.meta.get("source"),
        "gpus": args.gpus,
        "policies": policies,
        "slo_scales": args.slo_scale,
        "bound": args.bound,
        "round_steps": args.round_steps,
        "round_s": args.round_s,
        "jitter_cv": args.jitter_cv,
        "seed": args.seed,
        "workload": {"trace": args.trace} if args.trace else
        {"mix": args.mix, "rate_per_min": args.rate, "num_requests": args.num_requests, "steps": args.steps,
         "arrival": args.arrival, "burstiness_cv": args.burstiness_cv if args.arrival == "gamma" else None},
        "sweeps": [s.to_dict() for s in sweeps],
        "elapsed_s": elapsed,
    }
    with open(os.path.join(args.output, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    written = ["results.json"]
    if not args.no_plots:
        plot_sar(os.path.join(args.output, "sar.png"), sweeps)
        written.append("sar.png")
        for sweep in sweeps:
            if sweep.gantt is not None:
                name = f"gantt-{sweep.label}.png"
                start = min((b.start_s for b in sweep.gantt.busy), default=0.0)
                plot_gantt(os.path.join(args.output, name), sweep.gantt, (start, start + args.gantt_window_s))
                written.append(name)
    return written
