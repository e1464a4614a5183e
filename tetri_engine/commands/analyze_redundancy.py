"""`tetri-engine analyze-redundancy`: how much a model's attention changes from one denoising step to the
next, and the step-cache plan derived from it (model/redundancy.py says what is measured and how the
plan is derived).

    tetri-engine analyze-redundancy --model tiny                       # seconds on a CPU
    tetri-engine analyze-redundancy --model flux-dev --device cuda:0 --size 1024x1024 --steps 50
    tetri-engine analyze-redundancy --model /models/FLUX.1-dev --prompts prompts.txt

Writes to --output (default: the model's analysis directory, ~/.cache/tetri-engine/redundancy/<model>/):
redundancy.npz (the arrays), summary.json (cross-prompt CV, stability), cache_plan.json, heatmap.png,
layers.png. The plan is also installed where `cache: auto` looks for it (unless --no-install), so the
executor uses it from then on.
"""
from __future__ import annotations

import argparse
import os
import sys


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 512x512, got {text!r}") from None
    return width, height


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="preset name or local diffusers directory (default: tiny)")
    parser.add_argument("--prompts", help="text file, one prompt per line (default: 4 built-in prompts)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--size", type=_size, default=(512, 512), help="WIDTHxHEIGHT (default: 512x512)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed shared by the prompts (default: 0)")
    parser.add_argument("--device", default=None, help="device to run on (default: cuda:0 when present, else cpu:0)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    parser.add_argument("--output", default=None, help="output directory (default: the model's analysis directory)")
    parser.add_argument("--cache-dir", default=None, help="tetri-engine cache directory (default: ~/.cache/tetri-engine)")
    parser.add_argument("--max-output-error", type=float, default=0.05,
                        help="plan: bound on the relative error reusing puts into the last hidden states "
                             "(default: %(default)s)")
    parser.add_argument("--min-psnr", type=float, default=30.0,
                        help="plan: displacement PSNR vs uncached every prompt must keep, dB (default: %(default)s)")
    parser.add_argument("--no-plan", action="store_true", help="measure only; derive no cache plan")
    parser.add_argument("--no-install", action="store_true",
                        help="do not install the plan where `cache: auto` finds it")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")


def run(args: argparse.Namespace) -> int:
    import torch

    from tetri_engine.model import load_runtime
    from tetri_engine.model import redundancy
    from tetri_engine.model.step_cache import analysis_dir, plan_path

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    prompts = list(redundancy.DEFAULT_PROMPTS)
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            log(f"error: {args.prompts} holds no prompt")
            return 2
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu:0")
    width, height = args.size
    runtime = load_runtime(args.model, [device], dtype=args.dtype)
    output = args.output or analysis_dir(runtime.name, args.cache_dir)
    log(f"analysing {runtime.name} on {device}: {len(prompts)} prompts, {width}x{height}, "
        f"{args.steps or runtime.default_steps} steps")
    profile = redundancy.analyze(runtime, prompts, width=width, height=height, num_steps=args.steps,
                                 seed=args.seed, log=log)
    plan = None
    if not args.no_plan:
        plan = redundancy.derive_plan(runtime, profile, max_output_error=args.max_output_error,
                                      min_psnr_db=args.min_psnr, log=log)
    paths = redundancy.save(profile, plan, output, plots=not args.no_plots)

    summary = profile.summary()
    print(f"model {runtime.name}, {width}x{height}, {profile.num_steps} steps, {len(prompts)} prompts, "
          f"{profile.seconds:.1f} s; distance: relative L2 to the previous step")
    print(f"{'tensor':<12} {'mean distance':>14} {'median CV':>10}")
    for key in summary["mean_distance"]:
        print(f"{key:<12} {summary['mean_distance'][key]:>14.4f} {summary['cv_median'][key]:>10.3f}")
    verdict = {True: "stable", False: "NOT stable", None: "unknown (one prompt)"}[summary["stable"]]
    print(f"cross-prompt CV (median) {summary['cv_median_overall']:.3f}: pattern {verdict} "
          f"({summary['stable_rule']})")
    if plan is not None:
        print(f"cache plan: threshold {plan.threshold:.4g}, warm-up {plan.warmup_steps} steps, skips at least "
              f"{plan.expected_skip_fraction:.0%} of steps, estimated step-time factor {plan.expected_step_factor:.2f}")
        installed = plan_path(runtime.name, args.cache_dir)
        if not args.no_install and os.path.abspath(paths["plan"]) != os.path.abspath(installed):
            plan.save(installed)
            print(f"installed the plan for cache=auto: {installed}")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
