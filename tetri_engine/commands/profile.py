"""`tetri-engine profile`: measure the step-time profile T(resolution, degree, batch) of a model on these
devices and write the profile JSON the scheduler plans with (docs/ARCHITECTURE.md, "Profile JSON").

    tetri-engine profile --model flux-dev --devices cuda:0,cuda:1 --resolutions 256,512,1024,2048 \
        --degrees 1,2 --batches 1,2,4 --steps 20 --output bench/profiles/flux-dev-2xH200.json

Where the model offers them (`--methods`, issue 16), each even degree is measured again in the
CFG-parallel layout (SD3: "cfg": 2 entries) and the decode at each degree > 1 (patch-parallel VAE).

The model runs as the engine runs it (compiled, the chosen attention kernel, CUDA graphs: the same
flags and defaults as `serve`). On one GPU, refresh the degree-1 rows of a 2-GPU profile with
`--devices cuda:0 --degrees 1 --merge-into bench/profiles/flux-dev-2xH200.json --output <same file>`.

The measurement itself is tetri_engine/engine/profiling.py (shared with the engine's start-up
measurement and bench/profile_steps.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="preset or local diffusers directory (default: tiny)")
    parser.add_argument("--devices", default=None,
                        help="comma-separated, e.g. cuda:0,cuda:1 (default: every GPU, else cpu:0..cpu:3)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32", "fp8"),
                        help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32, fp8 (float8 GEMMs in the blocks)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the transformer blocks, as the engine does (GPU only; default: on)")
    parser.add_argument("--attention", default="auto", choices=("auto", "sdpa", "cudnn", "flash", "efficient", "math"),
                        help="attention kernel, as the engine's --attention (default: auto)")
    parser.add_argument("--ulysses-chunks", type=int, default=1,
                        help="head chunks per sequence-parallel exchange, as the engine's --ulysses-chunks")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="replay steps as CUDA graphs, as the engine does (default: on)")
    parser.add_argument("--cache-dir", default=None, help="inductor cache under DIR/inductor (default: the "
                        "engine's, ~/.cache/tetri-engine)")
    parser.add_argument("--merge-into", default=None, metavar="PROFILE",
                        help="refresh the entries this run measures in an existing profile JSON (e.g. the "
                             "degree-1 rows of a 2-GPU profile, from one GPU) and write the result to --output")
    parser.add_argument("--resolutions", default="256,512,1024,2048",
                        help="square sides or WxH, comma-separated (default: 256,512,1024,2048)")
    parser.add_argument("--degrees", default="1,2", help="sequence-parallel degrees (default: 1,2)")
    parser.add_argument("--batches", default="1,2,4",
                        help="batch sizes; > 1 measured at degree 1 for sizes up to --batch-max-px (default: 1,2,4)")
    parser.add_argument("--batch-max-px", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per entry (median; default: 20)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--chunk-steps", type=int, default=5,
                        help="steps per executor call, as the engine runs rounds (default: 5)")
    parser.add_argument("--decode-repeats", type=int, default=3)
    parser.add_argument("--methods", default="ulysses,cfg,patch_vae",
                        help="parallel methods to measure where the model offers them: cfg (the guidance "
                             "branches side by side, at each even degree; a model with true CFG, e.g. SD3), "
                             "patch_vae (the decode at each degree > 1); ulysses is always measured")
    parser.add_argument("--extend", default="64,2048",
                        help="MIN,MAX side: add extrapolated entries so the profile covers every size from "
                             "MIN^2 to MAX^2 (marked 'extrapolated'); 'none' to keep only measured entries")
    parser.add_argument("--output", default=None, help="profile JSON path (default: print only)")
    parser.add_argument("--table", default=None, help="also write the markdown table to this file")


def settings_from_args(args, num_devices: int):
    from tetri_engine.engine.profiling import ProfileSettings, parse_ints, parse_resolutions

    anchors = ()
    if args.extend and args.extend.lower() != "none":
        lo, hi = parse_ints(args.extend)
        anchors = ((lo, lo), (hi, hi))
    return ProfileSettings(resolutions=parse_resolutions(args.resolutions), degrees=parse_ints(args.degrees),
                           batches=parse_ints(args.batches), steps=args.steps, warmup_steps=args.warmup_steps,
                           chunk_steps=args.chunk_steps, decode_repeats=args.decode_repeats,
                           batch_max_px=args.batch_max_px, anchors=anchors, methods=parse_methods(args.methods))


def parse_methods(text: str) -> tuple[str, ...]:
    from tetri_engine.engine.profiling import METHODS

    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    return methods


def model_options(args) -> dict:
    """The engine's model options from the command line (profile_model's keyword arguments)."""
    from tetri_engine.config import default_cache_dir

    return {"compile": args.compile, "attention": args.attention, "ulysses_chunks": args.ulysses_chunks,
            "cuda_graphs": args.cuda_graphs, "cache_dir": args.cache_dir or default_cache_dir()}


def merge_into(path: str, profile: dict) -> dict:
    """The profile at `path` with this run's entries in place of its own (engine/profiling.py)."""
    from tetri_engine.engine.profiling import merge_profiles

    with open(path, encoding="utf-8") as f:
        base = json.load(f)
    if base.get("model") != profile.get("model"):
        raise SystemExit(f"--merge-into {path}: it profiles {base.get('model')!r}, this run {profile.get('model')!r}")
    print(f"merged into {path}: {len(profile['step_ms'])} step entries refreshed", flush=True)
    return merge_profiles(base, profile)


def resolve_devices(devices: str | None) -> list[str]:
    from tetri_engine.config import EngineConfig
    from tetri_engine.engine.async_engine import resolve_devices as engine_devices

    return engine_devices(EngineConfig(devices=[d for d in devices.split(",") if d] if devices else None))


def run(args) -> int:
    from tetri_engine.engine.profiling import format_table, profile_model

    devices = resolve_devices(args.devices)
    settings = settings_from_args(args, len(devices))
    print(f"profiling {args.model} on {','.join(devices)}: {len(settings.resolutions)} sizes, degrees "
          f"{list(settings.degrees)}, batches {list(settings.batches)}, {settings.steps} steps each", flush=True)
    profile = profile_model(args.model, devices, settings, dtype=args.dtype,
                            progress=lambda message: print("  " + message, flush=True), **model_options(args))
    if args.merge_into:
        profile = merge_into(args.merge_into, profile)
    table = format_table(profile)
    print()
    print(table)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(profile, f, indent=1)
            f.write("\n")
        print(f"\nwrote {args.output}")
    else:
        json.dump(profile, sys.stdout, indent=1)
        print()
    if args.table:
        with open(args.table, "w", encoding="utf-8") as f:
            f.write(table + "\n")
        print(f"wrote {args.table}")
    return 0
