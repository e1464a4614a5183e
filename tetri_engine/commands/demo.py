"""`tetri-engine demo` (and `make demo`): a short mixed trace through the embedded engine.

Replays a seeded trace (Poisson arrivals, mixed resolutions) through `AsyncEngine` on the default
model, prints each request's life, the per-round schedule (which request ran on which devices, at
which degree, for how many steps) and the SLO attainment ratio, and writes into --output:
the images (rNN-WxH.png), gantt.png (per-device timeline, sched.report.plot_gantt) and
schedule.json (rounds and per-request metrics).

Deadlines are the engine's defaults (the scheduler's SLO rule x --slo-scale, re-based on this
machine's measured profile), so the SAR means the same thing on a CPU as on GPUs. On a CPU the
"devices" are threads sharing its cores: wide groups rarely pay, and timings vary with other load.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass


@dataclass
class DemoRequest:
    request_id: str
    arrival_s: float  # after the first arrival
    width: int
    height: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="preset or local diffusers directory (default: tiny)")
    parser.add_argument("--devices", default=None,
                        help="comma-separated, e.g. cuda:0,cuda:1 (default: every GPU, else cpu:0..cpu:3)")
    parser.add_argument("--policy", default="tetri", help="tetri, fixed1, fixed2, fixed4, rssp, edf2, ...")
    parser.add_argument("--profile", default=None, help="step-time profile JSON (default: measured at start-up)")
    parser.add_argument("--requests", type=int, default=12, help="number of requests (default: 12)")
    parser.add_argument("--duration-s", type=float, default=12.0,
                        help="arrivals spread over about this long (Poisson; default: 12)")
    parser.add_argument("--sizes", default="256,512,768", help="square sides, mixed uniformly (default: 256,512,768)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per request (default: 20)")
    parser.add_argument("--slo-scale", type=float, default=1.2, help="deadline = SLO rule x this (default: 1.2)")
    parser.add_argument("--round-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="out/demo", help="directory for images and plots (default: out/demo)")
    parser.add_argument("--cache-dir", default=None, help="profile cache directory (default: ~/.cache/tetri-engine)")


def make_trace(num_requests: int, duration_s: float, sides: list[int], seed: int) -> list[DemoRequest]:
    rng = random.Random(seed)
    rate_per_s = num_requests / duration_s if duration_s > 0 else float("inf")
    t = 0.0
    trace = []
    for i in range(num_requests):
        side = sides[i % len(sides)] if i < len(sides) else rng.choice(sides)  # every size at least once
        trace.append(DemoRequest(f"r{i:02d}", t, side, side))
        if rate_per_s != float("inf"):
            t += rng.expovariate(rate_per_s)
    return trace


def run(args) -> int:
    try:
        import uvloop
    except ImportError:  # the engine runs on any loop
        return asyncio.run(demo(args))
    return uvloop.run(demo(args))


async def demo(args) -> int:
    from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest, RequestRejected

    sides = [int(s) for s in args.sizes.split(",") if s.strip()]
    trace = make_trace(args.requests, args.duration_s, sides, args.seed)
    config = EngineConfig(model=args.model, policy=args.policy, profile=args.profile, slo_scale=args.slo_scale,
                          round_steps=args.round_steps, max_queue=max(64, args.requests),
                          devices=[d for d in args.devices.split(",") if d] if args.devices else None)
    if args.cache_dir:
        config.cache_dir = args.cache_dir
    os.makedirs(args.output, exist_ok=True)
    finals: dict[str, object] = {}
    arrivals_s: dict[str, float] = {}  # engine-relative time of the "queued" output
    rejected: dict[str, str] = {}

    print(f"starting the engine: model {config.model}, policy {config.policy} ...", flush=True)
    async with AsyncEngine(config) as engine:
        t0 = engine.started_s
        print(f"ready: {len(engine.devices)} devices ({', '.join(engine.devices)}), round length "
              f"{engine.stats()['round_s_target'] * 1e3:.0f} ms; replaying {len(trace)} requests over "
              f"~{args.duration_s:g} s ({args.steps} steps each, sizes {args.sizes})\n", flush=True)
        replay_start = time.monotonic()

        async def client(item: DemoRequest) -> None:
            await asyncio.sleep(max(0.0, replay_start + item.arrival_s - time.monotonic()))
            request = GenerationRequest(prompt=f"demo request {item.request_id}", width=item.width,
                                        height=item.height, num_inference_steps=args.steps,
                                        seed=args.seed * 1000 + int(item.request_id[1:]),
                                        request_id=item.request_id)
            try:
                async for out in engine.generate(request):
                    now = time.monotonic() - t0
                    if out.kind == "queued":
                        arrivals_s[item.request_id] = now
                        print(f"{now:7.2f}s  {item.request_id} {item.width}x{item.height} arrives "
                              f"({out.queue_position} waiting ahead)", flush=True)
                    elif out.kind == "final":
                        finals[item.request_id] = out
                        report_final(args, item, out, now)
            except RequestRejected as exc:
                rejected[item.request_id] = f"{exc.reason}: {exc}"
                print(f"{time.monotonic() - t0:7.2f}s  {item.request_id} rejected ({exc.reason}): {exc}", flush=True)

        await asyncio.gather(*(client(item) for item in trace))
        rounds = engine.round_records()
        stats = engine.stats()

    print_schedule(rounds, {t.request_id: t for t in trace})
    print_summary(args, config, len(trace), finals, stats)
    write_outputs(args, config, trace, rounds, finals, arrivals_s, rejected, stats)
    return 0


def report_final(args, item: DemoRequest, out, now: float) -> None:
    """One line for a request's final output; its image into the output directory."""
    m = out.metrics
    verdict = "met" if m.deadline_met else "MISSED"
    degrees = " ".join(f"k{k}:{n}" for k, n in sorted(m.steps_at_degree.items()))
    print(f"{now:7.2f}s  {item.request_id} {out.state.value}: {m.total_s:.2f} s of "
          f"{m.deadline_s:.2f} s deadline ({verdict}); steps {degrees}; "
          f"{m.regroups} regroups{'; ' + out.error if out.error else ''}", flush=True)
    if out.png:
        with open(os.path.join(args.output, f"{item.request_id}-{item.width}x{item.height}.png"), "wb") as f:
            f.write(out.png)


def print_summary(args, config, total: int, finals: dict, stats: dict) -> None:
    met = sum(1 for out in finals.values() if out.metrics and out.metrics.deadline_met)
    print(f"\nSLO attainment (SAR): {met}/{total} = {met / total:.2f} "
          f"(policy {config.policy}, SLO scale {args.slo_scale:g}; rejected requests count as missed)")
    busy = ", ".join(f"{d} {f:.0%}" for d, f in stats["device_busy_fraction"].items())
    print(f"rounds {stats['rounds']}, regroups {stats['regroups']}, device busy: {busy}")


def print_schedule(rounds, items) -> None:
    print("\nper-round schedule (t = seconds since the engine started; k = degree):")
    for record in sorted(rounds, key=lambda r: r.index):
        groups = "  |  ".join(
            f"{'+'.join(g.request_ids)} {_size(items, g.request_ids[0])} -> {','.join(g.devices)} "
            f"(k={g.degree}, {sum(g.steps_done.values()) // max(1, len(g.request_ids))} steps)"
            + (" FAILED" if g.error else "")
            for g in record.groups)
        print(f"  round {record.index:3d}  t={record.start_s:7.2f}s  {record.wall_s * 1e3:7.1f} ms  {groups}")


def _size(items, request_id: str) -> str:
    item = items.get(request_id)
    return f"{item.width}x{item.height}" if item else ""


def write_outputs(args, config, trace, rounds, finals, arrivals_s, rejected, stats) -> None:
    from tetri_engine.sched.report import plot_gantt
    from tetri_engine.sched.simulator import BusyInterval, RequestRecord, SimResult

    # The engine's own record of what ran where, in the simulator's result type, so the Gantt is the
    # very plot `tetri-engine simulate` draws.
    steps_so_far: dict[str, int] = {}
    busy = []
    for record in rounds:
        for g in record.groups:
            ends = False
            for rid, n in g.steps_done.items():
                steps_so_far[rid] = steps_so_far.get(rid, 0) + n
                ends = ends or steps_so_far[rid] >= args.steps
            for device_id in g.device_ids:
                busy.append(BusyInterval(device_id, g.start_s, g.end_s, g.request_ids, g.degree,
                                         max(g.steps_done.values(), default=0), ends))
    requests = []
    for item in trace:
        out = finals.get(item.request_id)
        m = out.metrics if out is not None else None
        arrival_s = arrivals_s.get(item.request_id, item.arrival_s)
        completed = out is not None and out.state.value == "completed"
        # Offsets from the engine's own arrival, so that `met` is exactly the engine's verdict.
        requests.append(RequestRecord(
            request_id=item.request_id, width=item.width, height=item.height, steps=args.steps,
            arrival_s=arrival_s, deadline_s=arrival_s + (m.deadline_s if m else 0.0),
            finish_s=arrival_s + m.total_s if completed else None,
            state=out.state.value if out is not None else "rejected",
            steps_at_degree=dict(m.steps_at_degree) if m else {}, regroups=m.regroups if m else 0,
            rounds=sum(1 for r in rounds for g in r.groups if item.request_id in g.request_ids)))
    result = SimResult(policy=config.policy, num_devices=len(stats["devices"]), slo_scale=args.slo_scale,
                       requests=requests, busy=busy, rounds=len(rounds))
    end_s = max((b.end_s for b in busy), default=1.0)
    gantt = os.path.join(args.output, "gantt.png")
    plot_gantt(gantt, result, window_s=(0.0, end_s * 1.02))
    schedule = {
        "model": config.model, "policy": config.policy, "devices": stats["devices"], "slo_scale": args.slo_scale,
        "rounds": [{"index": r.index, "start_s": r.start_s, "end_s": r.end_s, "plan_s": r.plan_s,
                    "groups": [{"requests": list(g.request_ids), "devices": list(g.devices), "degree": g.degree,
                                "planned_steps": g.planned_steps, "steps_done": g.steps_done,
                                "executor_s": g.executor_s, "start_s": g.start_s, "end_s": g.end_s,
                                "error": g.error} for g in r.groups]} for r in rounds],
        "requests": {rid: {"state": out.state.value, "error": out.error, "seed": out.seed,
                           "metrics": out.metrics.to_dict() if out.metrics else None}
                     for rid, out in sorted(finals.items())},
        "rejected": rejected,
        "stats": {k: v for k, v in stats.items() if not k.endswith("_latency_s") and k != "round_overhead_s"},
    }
    with open(os.path.join(args.output, "schedule.json"), "w", encoding="utf-8") as f:
        json.dump(schedule, f, indent=1, default=str)
    print(f"wrote {len([o for o in finals.values() if o.png])} images, {gantt} and "
          f"{os.path.join(args.output, 'schedule.json')}")
