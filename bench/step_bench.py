#!/usr/bin/env python3
"""The engine's denoising step with each speed option, what FP8 costs in quality, and (optionally) the
refreshed step-time profile (issue 17).

Every variant is loaded the way the engine loads it (`Executor.load` with the engine's options: CUDA
graphs on, the attention kernel chosen at load), warmed up as the engine warms up at start-up
(`Executor.warm_up_shapes`: compile + CUDA graph capture of every timed shape; its time is the
start-up cost), then:

  step     per (size, degree): median seconds per step of `submit_steps` calls of --steps steps, as the
           scheduler's profile measures them; TFLOP/s per GPU = FLOPs of one forward (torch's
           FlopCounterMode on the meta device) / (degree x step time), and its share of the measured
           bf16 matmul peak (8192^3). Degree k > 1 also gives its speed-up over degree 1.
  quality  (--quality) one request of --quality-size, --quality-steps steps, seed 0, at degree 1,
           decoded; at the end every variant's final latent, displacement (latent - initial noise: what
           the model contributed; the latent's PSNR also credits the noise all runs share) and image
           (8-bit, peak 255) against the first bf16 variant's. Random weights: the image means nothing,
           the distance is still an honest measure of how far the arithmetic moved the result.
  profile  (--profile-out, for --profile-variant) the step-time profile of that variant, measured on
           the loaded executor (tetri_engine/engine/profiling.py), merged into --profile-merge-into when
           given (the degree-1 rows of a 2-GPU profile from one GPU; other rows kept, each dated).

Variants: eager (bf16, not compiled: the engine before issue 17), compiled (bf16: the default now),
fp8 (compiled, float8 GEMMs), fp8-eager; a suffix +cN splits Ulysses exchanges into N head chunks
(model/ulysses.py; degree > 1 only). Each variant runs in try/except; results are appended to --output
as JSON lines as they come; a variant that would start after --budget-s is skipped, saying so.

  # one H200 (~3 min): compiled and fp8 against eager, 1024^2 and 2048^2, quality, degree-1 profile rows
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    python bench/step_bench.py --devices cuda:0 --variants compiled,fp8,eager --sizes 1024,2048 --quality \\
      --profile-out $OUT/flux-dev-2xH200.json --profile-merge-into bench/profiles/flux-dev-2xH200.json \\
      --output $OUT/step-bench.jsonl --budget-s 240
  # two H200s: degree 2 and the exchange overlap
  python bench/step_bench.py --devices cuda:0,cuda:1 --degrees 1,2 --variants compiled,compiled+c2,compiled+c4,eager \\
      --sizes 1024,2048 --output $OUT/step-bench-2gpu.jsonl
"""
from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from cache_bench import image_psnr_db  # noqa: E402
from step_variants import flux_inputs, forward_flops, matmul_peak_tflops, sd3_inputs  # noqa: E402

from tetri_engine.engine import profiling  # noqa: E402
from tetri_engine.executor import Executor  # noqa: E402
from tetri_engine.executor.warmup import WarmupShape  # noqa: E402
from tetri_engine.model.presets import PRESETS  # noqa: E402
from tetri_engine.model.redundancy import displacement_psnr_db, psnr_db  # noqa: E402
from tetri_engine.request import GenerationRequest  # noqa: E402

VARIANTS = {"eager": dict(compile=False, dtype="bf16"), "compiled": dict(compile=True, dtype="bf16"),
            "fp8": dict(compile=True, dtype="fp8"), "fp8-eager": dict(compile=False, dtype="fp8")}
TARGETS_MS = {("compiled", 1024, 1): 140.0, ("fp8", 1024, 1): 115.0}
TARGET_SPEEDUP = {2048: 1.85, 1024: 1.7}


def variant_options(name: str, args) -> dict:
    base, _, chunks = name.partition("+c")
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)} (+cN for N head chunks)")
    return {**VARIANTS[base], "ulysses_chunks": int(chunks or 1), "attention": args.attention,
            "cache_dir": args.cache_dir}


def step_ms(ex: Executor, size: int, degree: int, steps: int, repeats: int) -> list[float]:
    """Per-step milliseconds of `repeats` calls of `steps` steps (after one untimed call)."""
    rid = f"bench-{size}-{degree}-{time.monotonic_ns()}"
    ex.submit_encode(rid, GenerationRequest("a lighthouse", size, size, steps * (repeats + 1), seed=0)).result()
    samples = []
    try:
        for call in range(repeats + 1):
            result = ex.submit_steps([rid], tuple(range(degree)), steps).result()
            if result[rid].error:
                raise RuntimeError(result[rid].error)
            if call:
                samples.append(result.seconds / steps * 1e3)
    finally:
        ex.release(rid)
    return samples


def quality_run(ex: Executor, size: int, steps: int) -> dict:
    """One request, all steps at degree 1, decoded: its final latent, noise and image (CPU)."""
    rid = f"quality-{time.monotonic_ns()}"
    ex.submit_encode(rid, GenerationRequest("a lighthouse on a cliff", size, size, steps, seed=0)).result()
    try:
        result = ex.submit_steps([rid], (0,), steps, decode_after=True).result()
        if result[rid].error:
            raise RuntimeError(result[rid].error)
        return {"latent": ex.latent(rid).float(), "noise": ex.prepared(rid).noise.float(), "image": result[rid].image,
                "step_ms": result.seconds / steps * 1e3}
    finally:
        ex.release(rid)


def run_variant(name: str, args, devices, degrees, flops, peak, emit) -> dict | None:
    """Load, warm up, time, optionally the quality run and the profile. Returns the quality run."""
    options = variant_options(name, args)
    start = time.perf_counter()
    ex = Executor.load(args.model, devices, **options)
    load_s = time.perf_counter() - start
    model = ex.model
    emit({"kind": "load", "variant": name, "options": {k: v for k, v in options.items() if k != "cache_dir"},
          "seconds": load_s, "dtype": model.dtype, "compiled": model.compiled, "attention": model.attention,
          "attention_probe": ex.runtime.attention.describe(), "fp8_linears": ex.runtime.fp8_linears})
    try:
        shapes = [WarmupShape(s, s, tuple(range(d))) for d in degrees for s in args.sizes]
        if args.quality and args.quality_size not in args.sizes:
            shapes.append(WarmupShape(args.quality_size, args.quality_size, (0,)))
        report = ex.warm_up_shapes(shapes, log=lambda m: print(f"  {name}: {m}", flush=True))
        emit({"kind": "warmup", "variant": name, "seconds": report.seconds, "compiled_graphs": report.compiled_graphs,
              "compile_backend_s": report.compile_backend_s, "cache_dir": report.cache_dir,
              "graphs_captured": report.graphs_captured, "failures": report.failures})
        compiled_before = ex.runtime.compiled.stats()["graphs"] if ex.runtime.compiled else 0
        for size in args.sizes:
            for degree in degrees:
                samples = step_ms(ex, size, degree, args.steps, args.repeats if size < 2048 else max(2, args.repeats - 1))
                ms = statistics.median(samples)
                tflops = flops[size] / (degree * ms * 1e-3) / 1e12 if flops[size] else None
                emit({"kind": "step", "variant": name, "width": size, "height": size, "degree": degree, "ms": ms,
                      "samples_ms": samples, "tflops_per_gpu": tflops,
                      "of_bf16_peak": tflops / peak if tflops and peak else None, "flops_per_forward": flops[size]})
        if ex.runtime.compiled:  # the timed steps are requests: they must not have compiled anything
            emit({"kind": "compiles_after_warmup", "variant": name,
                  "graphs": ex.runtime.compiled.stats()["graphs"] - compiled_before})
        quality = None
        if args.quality:
            quality = quality_run(ex, args.quality_size, args.quality_steps)
            emit({"kind": "quality_run", "variant": name, "size": args.quality_size, "steps": args.quality_steps,
                  "step_ms": quality["step_ms"]})
        if args.profile_out and name == args.profile_variant:
            write_profile(ex, args, emit)
        return quality
    finally:
        ex.shutdown()


def write_profile(ex: Executor, args, emit) -> None:
    settings = profiling.ProfileSettings(
        resolutions=tuple((s, s) for s in args.profile_sizes), degrees=tuple(range(1, len(ex.devices) + 1)),
        batches=(1, 2, 4), steps=args.profile_steps, warmup_steps=2, chunk_steps=5, decode_repeats=1,
        anchors=((64, 64), (2048, 2048)))
    with ex.compiling():
        profile = profiling.measure_profile(ex, settings, model_name=args.model,
                                            progress=lambda m: print(f"  profile: {m}", flush=True))
    profile["ulysses_chunks"] = ex.runtime.adapter.attention.chunks
    if args.profile_merge_into:
        with open(args.profile_merge_into, encoding="utf-8") as f:
            base = json.load(f)
        if base.get("model") != profile["model"]:
            raise ValueError(f"{args.profile_merge_into} profiles {base.get('model')!r}, not {profile['model']!r}")
        profile = profiling.merge_profiles(base, profile)
    with open(args.profile_out, "w", encoding="utf-8") as f:
        json.dump(profile, f, indent=1)
        f.write("\n")
    emit({"kind": "profile", "path": args.profile_out, "merged_into": args.profile_merge_into,
          "table": profiling.format_table(profile)})
    print(profiling.format_table(profile), flush=True)


def quality_rows(runs: dict[str, dict]) -> list[dict]:
    """Every variant's final latent, displacement and image against each bf16 reference that ran."""
    rows = []
    for ref_name in [n for n in runs if n.split("+")[0] in ("eager", "compiled")]:
        ref = runs[ref_name]
        for name, run in runs.items():
            if name == ref_name:
                continue
            rows.append({"kind": "quality", "variant": name, "reference": ref_name,
                         "latent_psnr_db": psnr_db(run["latent"], ref["latent"]),
                         "displacement_psnr_db": displacement_psnr_db(run["latent"], ref["latent"], ref["noise"]),
                         "image_psnr_db": image_psnr_db(run["image"], ref["image"]),
                         "latent_rel_l2": ((run["latent"] - ref["latent"]).norm() / ref["latent"].norm()).item()})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux-dev", choices=["flux-dev", "flux-schnell", "sd3-medium", "tiny"])
    parser.add_argument("--devices", default="cuda:0")
    parser.add_argument("--degrees", default="1")
    parser.add_argument("--variants", default="compiled,fp8,eager")
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per entry (2048: one fewer, >= 2)")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--quality-size", type=int, default=1024)
    parser.add_argument("--quality-steps", type=int, default=28)
    parser.add_argument("--profile-out", default=None)
    parser.add_argument("--profile-variant", default="compiled")
    parser.add_argument("--profile-merge-into", default=None)
    parser.add_argument("--profile-sizes", default="256,512,1024,2048")
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "tetri-engine"))
    parser.add_argument("--budget-s", type=float, default=None, help="start no variant after this many seconds")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.profile_sizes = [int(s) for s in args.profile_sizes.split(",")]
    devices = args.devices.split(",")
    degrees = [int(d) for d in args.degrees.split(",")]
    began = time.perf_counter()
    out = open(args.output, "a") if args.output else None
    rows: list[dict] = []

    on_gpu = devices[0].startswith("cuda")
    machine = torch.cuda.get_device_name(0) if on_gpu else "cpu"

    def emit(record: dict) -> None:
        record = {"model": args.model, "gpu": machine, "torch": torch.__version__,
                  "devices": devices, "t_s": round(time.perf_counter() - began, 1), **record}
        rows.append(record)
        print(json.dumps({k: v for k, v in record.items() if k not in ("table", "samples_ms")}), flush=True)
        if out:
            out.write(json.dumps(record) + "\n")
            out.flush()

    # (CPU, the tiny model: a dry run of this script's own code paths; no peaks, no FLOP counts)
    peak = matmul_peak_tflops(torch.device("cuda:0"), fp8=False) if on_gpu else None
    peak_fp8 = matmul_peak_tflops(torch.device("cuda:0"), fp8=True) if on_gpu else None
    preset = PRESETS[args.model]
    make = flux_inputs if preset.pipeline_class == "FluxPipeline" else sd3_inputs
    flops = {s: forward_flops(preset, s, torch.bfloat16, make) if preset.random_text else None for s in args.sizes}
    emit({"kind": "machine", "peak_bf16_tflops": peak, "peak_fp8_tflops": peak_fp8, "flops": flops})
    quality: dict[str, dict] = {}
    for name in args.variants.split(","):
        if args.budget_s is not None and time.perf_counter() - began > args.budget_s:
            emit({"kind": "skipped", "variant": name, "reason": f"past the {args.budget_s:.0f} s budget"})
            continue
        try:
            run = run_variant(name, args, devices, degrees, flops, peak, emit)
            if run is not None:
                quality[name] = run
        except Exception as exc:  # a variant that fails must not cost the others
            traceback.print_exc()
            emit({"kind": "error", "variant": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    for row in quality_rows(quality):
        emit(row)
    print_summary(rows, peak)
    return 0


def print_summary(rows: list[dict], peak: float) -> None:
    steps = [r for r in rows if r["kind"] == "step"]
    one = {(r["variant"], r["width"]): r["ms"] for r in steps if r["degree"] == 1}
    print(f"\nmatmul peak bf16 {peak or 0:.0f} TFLOP/s")
    print(f"{'variant':<14} {'size':>5} {'deg':>3} {'ms/step':>8} {'TFLOP/s/GPU':>11} {'%peak':>6} {'speed-up':>8}")
    for r in steps:
        base = one.get((r["variant"], r["width"]))
        speedup = f"{base / r['ms']:.2f}x" if base and r["degree"] > 1 else ""
        tflops = f"{r['tflops_per_gpu']:.0f}" if r["tflops_per_gpu"] else "-"
        share = f"{100 * r['of_bf16_peak']:.0f}%" if r["of_bf16_peak"] else "-"
        print(f"{r['variant']:<14} {r['width']:>5} {r['degree']:>3} {r['ms']:>8.1f} {tflops:>11} {share:>6} {speedup:>8}")
    for r in rows:
        if r["kind"] == "warmup":
            print(f"warm-up {r['variant']}: {r['seconds']:.1f} s, {r['compiled_graphs']} graphs compiled, "
                  f"{r['graphs_captured']} captured, cache {r['cache_dir']}, failures {r['failures']}")
        elif r["kind"] == "quality":
            print(f"quality {r['variant']} vs {r['reference']}: latent {r['latent_psnr_db']:.1f} dB, displacement "
                  f"{r['displacement_psnr_db']:.1f} dB, image {r['image_psnr_db']:.1f} dB")
        elif r["kind"] == "compiles_after_warmup":
            print(f"compilations during the timed steps ({r['variant']}): {r['graphs']} (expected 0)")
        elif r["kind"] in ("error", "skipped"):
            print(f"{r['kind']} {r['variant']}: {r.get('error') or r.get('reason')}")
    for (variant, size, degree), limit in TARGETS_MS.items():
        ms = one.get((variant, size)) if degree == 1 else None
        if ms is not None:
            print(f"target {variant} {size}^2 degree 1 <= {limit:.0f} ms: {ms:.1f} ms {'MET' if ms <= limit else 'MISSED'}")
    for r in steps:
        target = TARGET_SPEEDUP.get(r["width"])
        base = one.get((r["variant"], r["width"]))
        if r["degree"] == 2 and target and base:
            print(f"target {r['variant']} {r['width']}^2 degree 2 >= {target}x: {base / r['ms']:.2f}x "
                  f"{'MET' if base / r['ms'] >= target else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
