#!/usr/bin/env python3
"""What does step caching (`cache: auto`, tetri_engine/model/step_cache.py) buy, and what does it cost?

1. The plan: --plan FILE, else derived here by the redundancy analysis (model/redundancy.py) on the
   first device, --analysis-prompts prompts at the bench size. --thresholds adds plans with other
   thresholds (same warm-up), e.g. a loose one to show what skipping more costs.
2. Step time: for each plan, degree (1 and the number of devices, powers of two) and seed, one request
   runs all its steps through the Executor (one `submit_steps` call, device-synced), uncached and
   cached, alternating, --repeats times. Per-step time = the call's seconds / steps, median over the
   repeats, after a warm-up call per degree and mode.
   factor = cached / uncached step time: what the cost model's "cache_step_factor" should be.
3. Quality, against the uncached run of the same seed at the same degree: PSNR of the final latent
   (peak = the uncached latent's value range), of the displacement (final latent - initial noise: what
   the model contributed; the latent PSNR also credits the noise both runs share, which flatters
   random-weight models), and of the decoded image (8-bit RGB, peak 255). Also: the cached run at
   degree k against degree 1 (max |difference|), which should be float noise.
4. SAR: the TetriServe policy in the simulator on --profile (default: the modelled FLUX.1-dev H200
   profile), the paper's workload at --rates and --slo-scales, without and with the cache, i.e. every
   step time x the plan's measured factor (the largest over degrees: what a scheduler can count on).
   The factor comes from *this* model and machine; with the tiny model on a CPU it is applied to the
   H200 profile only to exercise the path.

Prints tables; appends one JSON object per measurement to --output.

  # on a CPU (the tiny model, virtual devices): seconds
  python bench/cache_bench.py --model tiny --devices cpu:0,cpu:1 --size 256x256 --steps 20

  # on 2xH200, FLUX.1-dev architecture, random weights (~2 minutes)
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    python bench/cache_bench.py --model flux-dev --devices cuda:0,cuda:1 --size 1024x1024 --steps 28 \\
      --seeds 1 --repeats 1 --analysis-prompts 2 --output bench/results/cache-2xH200.jsonl
"""
from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tetri_engine import ops  # noqa: E402
from tetri_engine.executor import Executor  # noqa: E402
from tetri_engine.model import load_runtime, redundancy  # noqa: E402
from tetri_engine.model.step_cache import CachePlan  # noqa: E402
from tetri_engine.request import GenerationRequest  # noqa: E402

DEFAULT_PROFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles", "flux-dev-h200-modelled.json")
PROMPT = "a lighthouse on a cliff at sunset, oil painting"


def image_psnr_db(test, reference) -> float:
    a = np.asarray(test, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


class Runner:
    """One request at a time through the Executor: timed steps, final latent, decoded image."""

    def __init__(self, runtime, devices, plan: CachePlan):
        self.ex = Executor(runtime, devices, ops.CommCache(timeout_s=120.0), cache_plan=plan)
        self.count = 0

    def run(self, degree: int, cache: str, seed: int, width: int, height: int, steps: int, decode: bool = True):
        self.count += 1
        rid = f"bench-{self.count}"
        self.ex.submit_encode(rid, GenerationRequest(prompt=PROMPT, width=width, height=height, seed=seed,
                                                     num_inference_steps=steps, cache=cache)).result()
        result = self.ex.submit_steps([rid], tuple(range(degree)), steps).result()
        if result[rid].error:
            raise RuntimeError(result[rid].error)
        out = {"step_ms": 1000 * result.seconds / steps, "latent": self.ex.latent(rid),
               "noise": self.ex.prepared(rid).noise, "cache": self.ex.request_stats(rid)["cache"]}
        if decode:
            out["image"] = self.ex.submit_decode(rid, 0).result()[0]
        self.ex.release(rid)
        return out

    def close(self):
        self.ex.shutdown()


def measure(runtime, devices, plans: dict[str, CachePlan], degrees, seeds, width, height, steps, repeats,
            emit) -> dict:
    """Step time and quality per plan and degree. Returns {(plan, degree): summary row}."""
    rows = {}
    for label, plan in plans.items():
        runner = Runner(runtime, devices, plan)
        try:
            for degree in degrees:
                for cache in ("off", "auto"):  # warm-up: kernels, communicators, allocator
                    runner.run(degree, cache, 0, width, height, min(steps, 3), decode=False)
                per_seed = []
                cached_one = {}
                for seed in seeds:
                    # uncached and cached alternate, so that a slow spell of a shared machine hits both
                    runs = [(runner.run(degree, "off", seed, width, height, steps, decode=r == 0),
                             runner.run(degree, "auto", seed, width, height, steps, decode=r == 0))
                            for r in range(repeats)]
                    plain, cached = runs[0]
                    plain_ms = float(np.median([p["step_ms"] for p, _ in runs]))
                    cached_ms = float(np.median([c["step_ms"] for _, c in runs]))
                    record = {
                        "plan": label, "threshold": plan.threshold, "warmup_steps": plan.warmup_steps,
                        "degree": degree, "seed": seed, "width": width, "height": height, "steps": steps,
                        "repeats": repeats, "uncached_step_ms": plain_ms, "cached_step_ms": cached_ms,
                        "factor": cached_ms / plain_ms,
                        "skipped_steps": cached["cache"]["skipped_steps"],
                        "latent_psnr_db": redundancy.psnr_db(cached["latent"], plain["latent"]),
                        "displacement_psnr_db": redundancy.displacement_psnr_db(cached["latent"], plain["latent"],
                                                                                plain["noise"]),
                        "image_psnr_db": image_psnr_db(cached["image"], plain["image"]),
                    }
                    if degree == degrees[0]:
                        cached_one[seed] = cached["latent"]
                    elif seed in rows.get((label, degrees[0]), {}).get("_latents", {}):
                        reference = rows[(label, degrees[0])]["_latents"][seed]
                        record["max_abs_diff_vs_degree_1"] = float((cached["latent"] - reference).abs().max())
                    emit(record)
                    per_seed.append(record)
                row = summarize(per_seed)
                row["_latents"] = cached_one
                rows[(label, degree)] = row
        finally:
            runner.close()
    return rows


def summarize(records: list[dict]) -> dict:
    first = records[0]
    mean = lambda key: float(np.mean([r[key] for r in records]))  # noqa: E731
    return {
        "plan": first["plan"], "threshold": first["threshold"], "degree": first["degree"],
        "uncached_step_ms": mean("uncached_step_ms"), "cached_step_ms": mean("cached_step_ms"),
        "factor": mean("cached_step_ms") / mean("uncached_step_ms"),
        "skip_fraction": float(np.mean([r["skipped_steps"] / r["steps"] for r in records])),
        "latent_psnr_db": min(r["latent_psnr_db"] for r in records),
        "displacement_psnr_db": min(r["displacement_psnr_db"] for r in records),
        "image_psnr_db": min(r["image_psnr_db"] for r in records),
        "max_abs_diff_vs_degree_1": max((r["max_abs_diff_vs_degree_1"] for r in records
                                         if "max_abs_diff_vs_degree_1" in r), default=None),
    }


def simulate_sar(profile_path: str, factor: float, gpus: int, rates, scales, mixes, num_requests: int, emit) -> list:
    from tetri_engine.sched import CostModel, make_policy
    from tetri_engine.sched.simulator import simulate
    from tetri_engine.sched.trace import generate_trace

    cost = CostModel.from_json(profile_path)
    cached_cost = CostModel.from_dict({**cost.to_dict(), "cache_step_factor": factor}).with_cache()
    rows = []
    for mix in mixes:
        for rate in rates:
            # SLOs from the uncached machine: the same deadlines for both runs
            trace = generate_trace(num_requests, rate, mix, seed=0, cost=cost, max_degree=gpus)
            for scale in scales:
                plain = simulate(trace, make_policy("tetri", gpus, cost), slo_scale=scale).sar
                cached = simulate(trace, make_policy("tetri", gpus, cached_cost), slo_scale=scale).sar
                row = {"sim": True, "profile": os.path.basename(profile_path), "gpus": gpus, "mix": mix,
                       "rate_per_min": rate, "slo_scale": scale, "factor": factor, "sar_uncached": plain,
                       "sar_cached": cached}
                emit(row)
                rows.append(row)
    return rows


def fmt_db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--devices", default="cpu:0,cpu:1")
    parser.add_argument("--size", default="256x256", help="WIDTHxHEIGHT")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--seeds", type=int, default=2, help="requests (seeds) per plan and degree")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per seed and mode (median)")
    parser.add_argument("--plan", default=None, help="cache_plan.json to use (default: derive one here)")
    parser.add_argument("--analysis-prompts", type=int, default=2, help="prompts of the analysis deriving the plan")
    parser.add_argument("--thresholds", default="", help="extra plans: comma-separated thresholds (e.g. 1e9: skip all)")
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="step-time profile for the SAR simulation")
    parser.add_argument("--sim-gpus", type=int, default=8)
    parser.add_argument("--rates", default="12,18", help="arrivals per minute")
    parser.add_argument("--slo-scales", default="1.0,1.2,1.5")
    parser.add_argument("--mixes", default="uniform,skewed")
    parser.add_argument("--sim-requests", type=int, default=300)
    parser.add_argument("--output", default=None, help="JSON lines file (appended)")
    args = parser.parse_args()

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    width, height = (int(x) for x in args.size.lower().split("x"))
    degrees = [d for d in (1, 2, 4, 8) if d <= len(devices)]
    started = time.perf_counter()
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    out = open(args.output, "a", encoding="utf-8") if args.output else None
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs" if not devices[0].startswith("cuda") else \
        f"{len(devices)}x{torch.cuda.get_device_name(0)}"

    def emit(record: dict) -> None:
        if out is not None:
            record = {"bench": "cache", "model": args.model, "machine": machine, **record}
            out.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                  for k, v in record.items()}) + "\n")
            out.flush()

    runtime = load_runtime(args.model, devices)
    steps = args.steps or runtime.default_steps
    print(f"{args.model} on {','.join(devices)} ({machine}), {width}x{height}, {steps} steps; loaded in "
          f"{time.perf_counter() - started:.1f} s", flush=True)

    # 1. The plan
    if args.plan:
        plan = CachePlan.load(args.plan)
    else:
        prompts = list(redundancy.DEFAULT_PROMPTS[:args.analysis_prompts])
        profile = redundancy.analyze(runtime, prompts, width=width, height=height, num_steps=steps)
        plan = redundancy.derive_plan(runtime, profile, log=lambda m: print("  plan:", m, flush=True))
        summary = profile.summary()
        print(f"analysis: {len(prompts)} prompts in {profile.seconds:.1f} s; cross-prompt CV median "
              f"{summary['cv_median_overall']:.3f}; plan threshold {plan.threshold:.4g}, warm-up "
              f"{plan.warmup_steps}, expected skip fraction {plan.expected_skip_fraction:.2f}", flush=True)
        emit({"analysis": True, "plan": plan.to_dict(), "cv_median": summary["cv_median_overall"],
              "seconds": profile.seconds})
    plans = {"plan": plan}
    for text in filter(None, (t.strip() for t in args.thresholds.split(","))):
        plans[f"t={text}"] = dataclasses.replace(plan, threshold=float(text))

    # 2-3. Step time and quality
    rows = measure(runtime, devices, plans, degrees, list(range(1, args.seeds + 1)), width, height, steps,
                   args.repeats, emit)
    print()
    print("| plan | threshold | degree | uncached ms/step | cached ms/step | factor | steps skipped | "
          "latent PSNR dB | displacement PSNR dB | image PSNR dB | max diff vs degree 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (label, degree), row in rows.items():
        diff = "–" if row["max_abs_diff_vs_degree_1"] is None else f"{row['max_abs_diff_vs_degree_1']:.2e}"
        print(f"| {label} | {row['threshold']:.4g} | {degree} | {row['uncached_step_ms']:.2f} | "
              f"{row['cached_step_ms']:.2f} | {row['factor']:.3f} | {row['skip_fraction']:.0%} | "
              f"{fmt_db(row['latent_psnr_db'])} | {fmt_db(row['displacement_psnr_db'])} | "
              f"{fmt_db(row['image_psnr_db'])} | {diff} |")
    factor = max(row["factor"] for (label, _), row in rows.items() if label == "plan")
    print(f'\ncost model: "cache_step_factor": {factor:.3f} (the plan\'s largest factor over degrees)')

    # 4. SAR in the simulator
    sim = simulate_sar(args.profile, factor, args.sim_gpus, [float(x) for x in args.rates.split(",")],
                       [float(x) for x in args.slo_scales.split(",")], args.mixes.split(","), args.sim_requests,
                       emit)
    print(f"\nSAR, tetri policy, {os.path.basename(args.profile)}, {args.sim_gpus} GPUs, {args.sim_requests} "
          f"requests, step times x {factor:.3f} with the cache:")
    print("| mix | req/min | SLO scale | SAR uncached | SAR cached |")
    print("|---|---|---|---|---|")
    for row in sim:
        print(f"| {row['mix']} | {row['rate_per_min']:g} | {row['slo_scale']:g} | {row['sar_uncached']:.3f} | "
              f"{row['sar_cached']:.3f} |")
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    if out is not None:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
