#!/usr/bin/env python3
"""End-to-end SLO attainment: one trace, replayed in real time through the live engine under each
policy, next to the simulator's prediction for the same trace (issue 7).

One engine serves every run: the model, communicators and CUDA graphs are loaded and warmed once
(a few steps of every size on every group), and `AsyncEngine.switch_policy` changes the policy
between runs. Each run replays the trace at its arrival times (each request = the model's full
pipeline: encode, `steps` denoising steps, VAE decode, PNG) and records per request whether it
finished by arrival + slo_ms x scale. Requests are admitted best effort (nobody is rejected), so SAR
counts every request of the trace. Then the simulator replays the same trace through the same policy
on the same profile: the simulator is trusted only as far as the two agree.

Two things keep device time down without changing any outcome:
  - idle gaps are skipped (`replay`, on unless --no-compress-idle): while no request is outstanding
    the replay jumps to the next arrival instead of sleeping; deadlines are relative to arrival and
    an empty engine holds no state, so latencies are those of the real-time replay. Busy fractions
    are reported on the uncompressed timeline.
  - a policy that never reads deadlines (`Policy.uses_deadlines` False: fixedK, rssp) runs once per
    mix and is scored at every SLO scale from the same latencies (rows marked shared_run).

Writes to --output DIR: trace-<mix>.jsonl, requests.jsonl (one line per request per run),
runs.jsonl (one line per run: live and simulated SAR, latency, busy fraction, regroups),
summary.md (the tables for bench/RESULTS.md) and gantt-<mix>-<scale>-tetri.png.

  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    python bench/e2e_slo.py --model flux-dev --devices cuda:0,cuda:1 \\
      --profile bench/profiles/flux-dev-2xH200.json --mix skewed,uniform --num-requests 8,6 \\
      --slo-scales 1.0,1.1,1.2,1.5 --policies tetri,fixed1,fixed2,rssp --output out/e2e

  # the same code on this CPU: the tiny model, 4 virtual devices, a short fast trace
  python bench/e2e_slo.py --model tiny --sides 64,128,256 --steps 8 --rate-per-min-per-8-gpus 240 \\
      --num-requests 10 --output out/e2e-cpu
"""
from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest  # noqa: E402
from tetri_engine.engine.async_engine import resolve_devices  # noqa: E402
from tetri_engine.sched import CostModel, make_policy  # noqa: E402
from tetri_engine.sched.metrics import distribution, percentile, sar, slowdown  # noqa: E402
from tetri_engine.sched.simulator import BusyInterval, RequestRecord, SimResult, simulate  # noqa: E402
from tetri_engine.sched.trace import TraceRequest, generate_trace, read_trace, write_trace  # noqa: E402


async def replay(engine: AsyncEngine, trace: list[TraceRequest], scale: float, compress_idle: bool = True
                 ) -> tuple[list[dict], float]:
    """Send each request at its arrival time; wait for every final output -> (records, skipped_s).

    compress_idle: while no request is outstanding (every earlier one has its final output, so the
    devices are idle and the engine holds nothing), jump straight to the next arrival instead of
    sleeping. Nothing in the engine depends on how long it sat empty (deadlines are relative to
    arrival), so every latency is what the uncompressed replay would give; only the wall time shrinks.
    """
    start = time.monotonic()
    skipped_s = 0.0
    outstanding = 0
    drained = asyncio.Event()
    drained.set()

    async def one(i: int, tr: TraceRequest) -> dict:
        nonlocal outstanding
        sent = time.monotonic()
        deadline_s = scale * tr.slo_ms / 1000.0
        req = GenerationRequest(prompt=f"e2e request {i}", width=tr.width, height=tr.height,
                                num_inference_steps=tr.steps, seed=i, deadline_s=deadline_s,
                                request_id=f"{tr.request_id}")
        final = None
        error = None
        try:
            async for out in engine.generate(req):
                if out.finished:
                    final = out
        except Exception as exc:  # rejected: counts as missed
            error = f"{type(exc).__name__}: {exc}"
        finally:
            outstanding -= 1
            if outstanding == 0:
                drained.set()
        latency = time.monotonic() - sent
        m = final.metrics if final is not None else None
        cost = engine.cost_model
        return {
            "request_id": tr.request_id, "width": tr.width, "height": tr.height, "steps": tr.steps,
            "arrival_s": tr.arrival_s, "slo_s": tr.slo_ms / 1000.0, "deadline_s": deadline_s,
            "latency_s": latency, "sent_engine_s": sent - engine.started_s,
            "state": final.state.value if final is not None else "rejected",
            "met": bool(final is not None and final.state.value == "completed" and latency <= deadline_s),
            "engine_deadline_met": m.deadline_met if m else None,
            "steps_at_degree": dict(m.steps_at_degree) if m else {},
            "regroups": m.regroups if m else 0,
            "late": bool(m.late) if m else False,  # the scheduler gave it up (a "late" output said so)
            # fastest alone on the whole machine (encode not included, as the engine's latency starts after it)
            "isolated_s": cost.isolated_s(tr.width, tr.height, tr.steps, len(engine.devices)),
            "queue_s": m.queue_s if m else None, "decode_s": m.decode_s if m else None,
            "error": error or (final.error if final is not None else None),
        }

    tasks = []
    for i, tr in enumerate(trace):
        while True:
            wait_s = start + tr.arrival_s - skipped_s - time.monotonic()
            if wait_s <= 0:
                break
            if compress_idle and outstanding == 0:
                skipped_s += wait_s
                break
            try:  # wake at the arrival, or as soon as the engine empties (to skip the rest of the gap)
                await asyncio.wait_for(drained.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        outstanding += 1
        drained.clear()
        tasks.append(asyncio.ensure_future(one(i, tr)))
    return list(await asyncio.gather(*tasks)), skipped_s


def rescore(records: list[dict], scale: float) -> list[dict]:
    """The same requests judged against the deadlines of another SLO scale."""
    out = []
    for r in records:
        deadline_s = scale * r["slo_s"]
        out.append({**r, "deadline_s": deadline_s,
                    "met": r["state"] == "completed" and r["latency_s"] <= deadline_s})
    return out


def live_gantt(engine: AsyncEngine, policy: str, scale: float, records: list[dict]) -> SimResult:
    """The live run's round records in the simulator's result shape, for the same Gantt plot. Times are
    the engine's (seconds since the policy switch), so with idle gaps compressed the plot is too."""
    busy = []
    for rnd in engine.round_records():
        for g in rnd.groups:
            for d in g.device_ids:
                busy.append(BusyInterval(d, g.start_s, g.start_s + g.executor_s, g.request_ids, g.degree,
                                         g.planned_steps, False))
    reqs = [RequestRecord(r["request_id"], r["width"], r["height"], r["steps"], r["sent_engine_s"],
                          r["sent_engine_s"] + r["deadline_s"], r["sent_engine_s"] + r["latency_s"], r["state"], {},
                          r["regroups"], 0) for r in records]
    return SimResult(policy, len(engine.devices), scale, reqs, busy, len(engine.round_records()), [])


async def warm_up(engine: AsyncEngine, sizes: list[tuple[int, int]], steps: int) -> float:
    """First-use costs out of the measured runs: a few steps and a decode of every size on every
    aligned group of every profiled degree (allocator, communicators, one CUDA graph per size, group
    and rank; the graphs are kept for every later run on this engine). Returns the seconds it took."""
    from tetri_engine.sched.placement import aligned_blocks

    executor = engine.executor
    n = len(engine.devices)
    groups = [b for d in engine.cost_model.degrees_upto(n) for b in aligned_blocks(n, d)]

    def run() -> None:
        for w, h in sizes:
            for group in groups:
                rid = f"warm-up-{w}x{h}-{'-'.join(map(str, group))}"
                req = GenerationRequest(prompt="warm-up", width=w, height=h, num_inference_steps=steps, seed=0)
                executor.submit_encode(rid, req).result()
                result = executor.submit_steps([rid], group, steps, decode_after=True).result()
                executor.release(rid)
                error = result.requests[rid].error
                if error:
                    raise RuntimeError(f"warm-up {w}x{h} on {group} failed: {error}")

    start = time.monotonic()
    await asyncio.to_thread(run)
    return time.monotonic() - start


async def run_all(args, devices: list[str], traces: dict[str, list[TraceRequest]], policies: list[str],
                  scales: list[float], cost, on_run) -> None:
    """One engine for every run (model, communicators and CUDA graphs loaded and warmed once);
    `switch_policy` between runs. A policy that never reads deadlines (`uses_deadlines` False) runs
    once per mix and is scored at every scale; the others run once per (mix, scale)."""
    config = EngineConfig(model=args.model, devices=devices, policy=policies[0], profile=args.profile,
                          max_queue=max(256, 2 * max(len(t) for t in traces.values())), admission="best_effort",
                          round_steps=args.round_steps)
    started = time.monotonic()
    async with AsyncEngine(config) as engine:
        print(f"engine started in {time.monotonic() - started:.1f} s", flush=True)
        if args.warmup:
            sizes = sorted({(t.width, t.height) for trace in traces.values() for t in trace})
            print(f"warm-up of {len(sizes)} sizes took {await warm_up(engine, sizes, args.warmup_steps):.1f} s",
                  flush=True)
        for mix, trace in traces.items():
            for policy in policies:
                probe = make_policy(policy, len(devices), engine.cost_model, round_steps=args.round_steps)
                run_scales = scales if probe.uses_deadlines else [scales[0]]
                for scale in run_scales:
                    await engine.switch_policy(policy)
                    t0 = time.monotonic()
                    records, skipped_s = await replay(engine, trace, scale, args.compress_idle)
                    wall_s = time.monotonic() - t0
                    stats = engine.stats()
                    elapsed_s = time.monotonic() - engine.started_s
                    if policy == "tetri":
                        from tetri_engine.sched.report import plot_gantt

                        gantt = os.path.join(args.output, f"gantt-{mix}-{scale:g}-tetri.png")
                        res = live_gantt(engine, policy, scale, records)
                        lo = min((r.arrival_s for r in res.requests), default=0.0)
                        plot_gantt(gantt, res, (lo, lo + wall_s))
                    for s in (scales if not probe.uses_deadlines else [scale]):
                        on_run(mix, s, policy, trace, rescore(records, s), wall_s, skipped_s, elapsed_s, stats,
                               shared=not probe.uses_deadlines)


def summarize(records: list[dict], wall_s: float, skipped_s: float, elapsed_s: float, stats: dict) -> dict:
    """One run's figures. busy: the devices' mean busy fraction on the trace's own timeline (busy
    seconds over the engine's elapsed time plus the idle seconds that the replay skipped)."""
    done = [r for r in records if r["state"] == "completed"]
    lat = [r["latency_s"] for r in done]
    slow = distribution([slowdown(r["latency_s"], r["isolated_s"]) for r in done])
    busy = stats.get("device_busy_fraction") or {}
    busy_s = statistics.fmean(busy.values()) * elapsed_s if busy else None
    return {
        "sar": sar(r["met"] for r in records),  # met / every request of the trace (sched/metrics.py)
        "completed": len(done),
        "given_up": sum(r.get("late", False) for r in records),
        "mean_latency_s": statistics.fmean(lat) if lat else None,
        "p99_latency_s": percentile(lat, 99),
        "slowdown_p50": slow["p50"], "slowdown_p90": slow["p90"], "slowdown_p99": slow["p99"],
        "busy_fraction": None if busy_s is None else busy_s / (elapsed_s + skipped_s),
        "regroups_per_request": sum(r["regroups"] for r in records) / max(1, len(records)),
        # engine overhead per round: round wall time minus the busiest group's executor time
        "round_overhead_p50_ms": _ms(percentile(stats.get("round_overhead_s") or [], 50)),
        "round_overhead_p99_ms": _ms(percentile(stats.get("round_overhead_s") or [], 99)),
        "plan_p99_ms": _ms(percentile(stats.get("plan_latency_s") or [], 99)),
        "wall_s": wall_s,
        "skipped_idle_s": skipped_s,
    }


def _ms(v: float | None) -> float | None:
    return None if v is None else 1000.0 * v


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--devices", default=None, help="comma-separated (default: every GPU, else cpu:0..cpu:3)")
    p.add_argument("--profile", default=None, help="step-time profile JSON (default: measured at engine start)")
    p.add_argument("--mix", default="skewed", help="comma-separated: uniform, skewed")
    p.add_argument("--slo-scales", default="1.0,1.1,1.2,1.5")
    p.add_argument("--policies", default="tetri,fixed1,fixed2,rssp")
    p.add_argument("--num-requests", default="8",
                   help="requests per trace; a comma-separated list gives one count per mix, in --mix order")
    p.add_argument("--rate-per-min-per-8-gpus", type=float, default=12.0,
                   help="the paper's rate on 8 GPUs; scaled by devices/8 (default 12 -> 3/min on 2 GPUs)")
    p.add_argument("--sides", default="256,512,1024,2048")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--round-steps", type=int, default=5)
    p.add_argument("--trace", default=None, help="replay this JSON-lines trace instead of generating one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1,
                   help="1: a few steps of every size on every group once, before the first run")
    p.add_argument("--no-compress-idle", dest="compress_idle", action="store_false",
                   help="sleep through the gaps where the engine is empty (default: skip them; same outcomes)")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--no-simulate", action="store_true")
    p.add_argument("--traces-only", action="store_true",
                   help="write trace-<mix>.jsonl and stop (e.g. to replay them through xDiT first)")
    p.add_argument("--output", default="out/e2e")
    args = p.parse_args()

    os.makedirs(args.output, exist_ok=True)
    devices = resolve_devices(EngineConfig(model=args.model,
                                           devices=args.devices.split(",") if args.devices else None))
    cost = CostModel.from_json(args.profile) if args.profile else None
    rate = args.rate_per_min_per_8_gpus * len(devices) / 8.0
    sides = tuple(int(s) for s in args.sides.split(","))
    policies = [s for s in args.policies.split(",") if s]
    scales = [float(s) for s in args.slo_scales.split(",")]
    machine = f"{len(devices)}x {_device_name(devices)}"
    print(f"e2e: model {args.model} on {machine}; policies {policies}; scales {scales}; rate {rate:.2f}/min")

    mixes = args.mix.split(",")
    counts = [int(n) for n in args.num_requests.split(",")]
    if len(counts) not in (1, len(mixes)):
        p.error(f"--num-requests: give one count, or one per mix ({len(mixes)})")
    traces = {}
    for mix, count in zip(mixes, counts * len(mixes) if len(counts) == 1 else counts):
        if args.trace:
            trace = read_trace(args.trace)
        else:
            trace = generate_trace(count, rate, mix, args.seed, steps=args.steps, sides_px=sides,
                                   cost=cost, max_degree=len(devices))
        traces[mix] = sorted(trace, key=lambda t: t.arrival_s)
        write_trace(os.path.join(args.output, f"trace-{mix}.jsonl"), traces[mix])
    if args.traces_only:
        print(f"traces written to {args.output}: " + ", ".join(f"{m} ({len(t)} requests)" for m, t in traces.items()))
        return 0

    runs = []
    with open(os.path.join(args.output, "requests.jsonl"), "w") as freq, \
            open(os.path.join(args.output, "runs.jsonl"), "w") as fruns:
        def on_run(mix, scale, policy, trace, records, wall_s, skipped_s, elapsed_s, stats, shared):
            row = {"mix": mix, "slo_scale": scale, "policy": policy, "n": len(trace), "machine": machine,
                   "model": args.model, "shared_run": shared,
                   **summarize(records, wall_s, skipped_s, elapsed_s, stats)}
            if cost is not None and not args.no_simulate:
                sim = simulate(trace, make_policy(policy, len(devices), cost, round_steps=args.round_steps),
                               slo_scale=scale)
                row["sim_sar"] = sim.sar
                row["sim_mean_latency_s"] = sim.summary().get("mean_latency_s")
            runs.append(row)
            fruns.write(json.dumps(row) + "\n")
            fruns.flush()
            for r in records:
                freq.write(json.dumps({"mix": mix, "slo_scale": scale, "policy": policy, **r}) + "\n")
            freq.flush()
            print(f"  {mix:8s} x{scale:<4g} {policy:7s} SAR {row['sar']:.3f}"
                  + (f" (sim {row['sim_sar']:.3f})" if "sim_sar" in row else "")
                  + f"  mean {_fmt(row['mean_latency_s'])} s  p99 {_fmt(row['p99_latency_s'])} s"
                  + f"  slowdown p50/p99 {_fmt(row['slowdown_p50'])}/{_fmt(row['slowdown_p99'])}"
                  + f"  given up {row['given_up']}/{row['n']}"
                  + f"  busy {_fmt(row['busy_fraction'])}  regroups/req {row['regroups_per_request']:.2f}"
                  + f"  wall {wall_s:.0f} s (+{skipped_s:.0f} s idle skipped)" + ("  [shared run]" if shared else ""),
                  flush=True)

        asyncio.run(run_all(args, devices, traces, policies, scales, cost, on_run))
    table = render(runs, machine, args)
    with open(os.path.join(args.output, "summary.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


def render(runs: list[dict], machine: str, args) -> str:
    counts = ", ".join(f"{mix} {n}" for mix, n in dict((r["mix"], r["n"]) for r in runs).items())
    source = f"trace {args.trace}" if args.trace else f"{args.steps} steps, rate {args.rate_per_min_per_8_gpus:g}/min per 8 GPUs"
    lines = [f"model {args.model}, {machine}, requests per run: {counts}; {source} (python {platform.python_version()})",
             "SAR = met / every request of the trace; percentiles interpolate linearly; slowdown = latency / "
             "fastest isolated time (tetri_engine/sched/metrics.py)",
             "", "| mix | SLO scale | policy | SAR live | SAR sim | mean latency s | p99 latency s "
             "| slowdown p50/p90/p99 | given up | busy | regroups/req | round overhead p50/p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['mix']} | {r['slo_scale']:g} | {r['policy']} | {r['sar']:.3f} | "
                     f"{_fmt(r.get('sim_sar'))} | {_fmt(r['mean_latency_s'])} | {_fmt(r['p99_latency_s'])} | "
                     f"{_fmt(r['slowdown_p50'])} / {_fmt(r['slowdown_p90'])} / {_fmt(r['slowdown_p99'])} | "
                     f"{r['given_up']} | "
                     f"{_fmt(r['busy_fraction'])} | {r['regroups_per_request']:.2f} | "
                     f"{_fmt(r['round_overhead_p50_ms'])} / {_fmt(r['round_overhead_p99_ms'])} |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _device_name(devices: list[str]) -> str:
    if devices and devices[0].startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU virtual devices ({platform.processor() or platform.machine()})"


if __name__ == "__main__":
    raise SystemExit(main())
