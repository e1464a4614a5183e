"""Load a running tetri-engine server (or any OpenAI-compatible images server) and report
throughput, latency percentiles and SLO attainment (SAR).

    python bench/serve_load.py --base-url http://127.0.0.1:8000 --request-rate 4 --num-prompts 100
    python bench/serve_load.py --trace trace.jsonl --slo-scale 1.2 --output-file out.jsonl

Arrivals are Poisson at --request-rate (inf: all at once), or the `arrival_s` of each line of
--trace (JSON lines: arrival_s, width, height, steps, slo_ms). Without a trace every request is
--size at --steps steps and its deadline is the server's SLO table x --slo-scale; with a trace it is
slo_ms x --slo-scale, sent as deadline_ms.

SAR = requests that finished by their deadline / all requests sent (a refusal: 429 queue_full or
400 deadline_impossible, an error or a late image counts against it), as in the TetriServe paper. "Met" is the server's own verdict (the
`metrics[].deadline_met` field of tetri-engine's answer, measured from arrival in the engine); the
client-side latency is reported beside it.

--output-file: one JSON line per request, then one line {"summary": {...}}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass

import aiohttp


@dataclass
class Job:
    index: int
    arrival_s: float
    width: int
    height: int
    steps: int | None
    slo_ms: float | None  # None: the server's SLO table


@dataclass
class Outcome:
    index: int
    arrival_s: float
    width: int
    height: int
    steps: int | None
    status: int  # HTTP status; 0: no answer (connection error)
    latency_s: float
    deadline_met: bool = False
    deadline_s: float | None = None
    server_total_s: float | None = None
    steps_at_degree: dict | None = None
    error: str | None = None


def make_jobs(args: argparse.Namespace) -> list[Job]:
    if args.trace:
        jobs = []
        with open(args.trace) as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                jobs.append(Job(len(jobs), float(row["arrival_s"]), int(row["width"]),
                                int(row["height"]), row.get("steps"), row.get("slo_ms")))
        jobs.sort(key=lambda j: j.arrival_s)
        return jobs[:args.num_prompts] if args.num_prompts else jobs
    width, height = (int(v) for v in args.size.lower().split("x"))
    rng = random.Random(args.seed)
    t, jobs = 0.0, []
    for i in range(args.num_prompts):
        jobs.append(Job(i, t, width, height, args.steps, None))
        if math.isfinite(args.request_rate):
            t += rng.expovariate(args.request_rate)
    return jobs


def request_body(job: Job, args: argparse.Namespace) -> dict:
    body = {"prompt": f"{args.prompt} #{job.index}", "size": f"{job.width}x{job.height}",
            "seed": args.seed + job.index}
    if args.model:
        body["model"] = args.model
    if job.steps is not None:
        body["num_inference_steps"] = job.steps
    if job.slo_ms is not None:
        body["deadline_ms"] = job.slo_ms * args.slo_scale
    elif args.slo_scale != 1.0:
        body["slo_scale"] = args.slo_scale
    return body


async def send(session: aiohttp.ClientSession, job: Job, args: argparse.Namespace,
               start: float, limit: asyncio.Semaphore) -> Outcome:
    await asyncio.sleep(max(0.0, start + job.arrival_s - time.perf_counter()))
    async with limit:
        sent = time.perf_counter()
        outcome = Outcome(job.index, sent - start, job.width, job.height, job.steps, 0, 0.0)
        try:
            async with session.post("/v1/images/generations", json=request_body(job, args)) as resp:
                body = await resp.json(content_type=None)
                outcome.status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
            body = None
        outcome.latency_s = time.perf_counter() - sent
    if outcome.status == 200 and body:
        metrics = (body.get("metrics") or [{}])[0]
        outcome.deadline_met = bool(metrics.get("deadline_met"))
        outcome.deadline_s = metrics.get("deadline_s")
        outcome.server_total_s = metrics.get("total_s")
        outcome.steps_at_degree = metrics.get("steps_at_degree")
    elif body and "error" in body:
        outcome.error = body["error"].get("code") or body["error"].get("message")
    return outcome


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def refused(o: Outcome) -> bool:
    """Admission said no: the queue is full (429), or the deadline cannot be met (400 deadline_impossible)."""
    return o.status == 429 or (o.status == 400 and o.error == "deadline_impossible")


def summarize(outcomes: list[Outcome], wall_s: float) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    latencies = [o.latency_s for o in ok]
    degrees: dict[str, int] = {}
    for o in ok:
        for degree, steps in (o.steps_at_degree or {}).items():
            degrees[degree] = degrees.get(degree, 0) + steps
    return {
        "requests": len(outcomes),
        "completed": len(ok),
        "rejected": sum(refused(o) for o in outcomes),
        "errors": sum(o.status != 200 and not refused(o) for o in outcomes),
        "wall_s": wall_s,
        "throughput_img_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "latency_s": {f"p{q}": percentile(latencies, q) for q in (50, 90, 95, 99)}
        | {"mean": sum(latencies) / len(latencies) if latencies else None},
        "sar": sum(o.deadline_met for o in outcomes) / len(outcomes) if outcomes else None,
        "steps_at_degree": dict(sorted(degrees.items(), key=lambda kv: int(kv[0]))),
    }


def print_table(summary: dict, args: argparse.Namespace) -> None:
    lat = summary["latency_s"]

    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"

    rate = "trace" if args.trace else f"{args.request_rate:g}/s"
    print(f"requests {summary['requests']}  rate {rate}  max-concurrency "
          f"{args.max_concurrency or '-'}  slo-scale {args.slo_scale:g}")
    print(f"completed {summary['completed']}  rejected {summary['rejected']}  "
          f"errors {summary['errors']}  wall {summary['wall_s']:.1f} s")
    thr = summary["throughput_img_per_s"]
    print(f"throughput {thr:.2f} img/s" if thr is not None else "throughput -")
    print(f"latency ms  p50 {ms(lat['p50'])}  p90 {ms(lat['p90'])}  p99 {ms(lat['p99'])}  "
          f"mean {ms(lat['mean'])}")
    sar = summary["sar"]
    print(f"SAR {sar:.3f}" if sar is not None else "SAR -")
    if summary["steps_at_degree"]:
        print("steps at degree " + "  ".join(f"{k}:{v}" for k, v in summary["steps_at_degree"].items()))


async def main_async(args: argparse.Namespace) -> int:
    jobs = make_jobs(args)
    if not jobs:
        print("no requests to send", file=sys.stderr)
        return 1
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(args.max_concurrency or len(jobs))
    # No per-request timeout beyond --timeout-s: a slow answer is a data point, not an error.
    timeout = aiohttp.ClientTimeout(total=args.timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(args.base_url, headers=headers, timeout=timeout,
                                     connector=connector) as session:
        async with session.get("/health") as resp:
            if resp.status != 200:
                print(f"server not ready: /health {resp.status} {await resp.text()}", file=sys.stderr)
                return 1
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(send(session, j, args, start, limit) for j in jobs))
        wall_s = time.perf_counter() - start
    summary = summarize(outcomes, wall_s)
    print_table(summary, args)
    if args.output_file:
        with open(args.output_file, "w") as f:
            for o in outcomes:
                f.write(json.dumps(asdict(o)) + "\n")
            f.write(json.dumps({"summary": summary, "args": vars(args)}) + "\n")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--model", default=None, help="`model` field to send (default: none)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate, requests/s (inf: all at once)")
    p.add_argument("--num-prompts", type=int, default=50, help="requests to send "
                   "(with --trace: at most this many of its lines; 0: all)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight (default: no limit)")
    p.add_argument("--trace", default=None,
                   help="JSON lines: arrival_s, width, height, steps, slo_ms (overrides rate/size)")
    p.add_argument("--slo-scale", type=float, default=1.0, help="deadline = SLO x this scale")
    p.add_argument("--size", default="64x64", help="WxH of every request without --trace")
    p.add_argument("--steps", type=int, default=None,
                   help="num_inference_steps without --trace (default: the model's)")
    p.add_argument("--prompt", default="a lighthouse on a cliff at dawn")
    p.add_argument("--seed", type=int, default=0, help="arrival and image seeds")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-request client timeout")
    p.add_argument("--output-file", default=None, help="JSON lines: one per request, then a summary")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
