#!/usr/bin/env python3
"""Is SD3's degree-2 output right? sd3-medium's transformer (random weights, N layers) at degree 2 and in
the CFG-parallel layout against degree 1, per guidance branch before the guidance, and the guided
output against its tolerance scaled by the guidance's amplification (issue 16; bench/runtime_check.py's
`degree_check`, on any devices: the full-size preset is built here, so it also runs on a CPU).

    # the CPU dev box: 24 layers, 1024^2, bf16 (~5 min on 2 cores), then float32
    .venv/bin/python bench/sd3_branches.py --layers 24 --size 1024 --dtype bf16 --devices cpu:0,cpu:1
    .venv/bin/python bench/sd3_branches.py --layers 24 --size 1024 --dtype fp32 --devices cpu:0,cpu:1
    # also: the sd3-medium VAE's patch-parallel decode against one device
    .venv/bin/python bench/sd3_branches.py --layers 1 --size 512 --dtype fp32 --decode
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from runtime_check import bf16_tolerance, degree_check  # noqa: E402

from tetri_engine import ops  # noqa: E402
from tetri_engine.model import PRESETS, patch_vae, verify  # noqa: E402
from tetri_engine.model.presets import build_random_pipeline  # noqa: E402
from tetri_engine.model.runtime import ADAPTERS, ModelRuntime, torch_device  # noqa: E402


def medium_runtime(layers: int, devices: list[str], dtype: torch.dtype) -> ModelRuntime:
    preset = dataclasses.replace(PRESETS["sd3-medium"],
                                 transformer={**PRESETS["sd3-medium"].transformer, "num_layers": layers})
    first = torch_device(devices[0])
    pipe = build_random_pipeline(preset, first, dtype)
    adapter = ADAPTERS[preset.pipeline_class](pipe, text_tokens=preset.text_tokens, random_text=preset.random_text)
    transformers, vaes = {}, {}
    for name in devices:  # (GPUs: one replica each, as load_runtime makes them)
        device = torch_device(name)
        if str(device) not in transformers:
            from tetri_engine.model.runtime import replicate

            same = device == first
            transformers[str(device)] = pipe.transformer if same else replicate(pipe.transformer, device)
            vaes[str(device)] = pipe.vae if same else replicate(pipe.vae, device)
            adapter.install_attention(transformers[str(device)])
            patch_vae.install(vaes[str(device)])
    return ModelRuntime(name=f"sd3-medium-{layers}-layers", pipeline=pipe, adapter=adapter, devices=devices,
                        dtype=dtype, default_steps=28, default_guidance=7.0, transformers=transformers, vaes=vaes,
                        encode_device=first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--devices", default="cpu:0,cpu:1")
    parser.add_argument("--decode", action="store_true", help="also the patch-parallel decode against one device")
    parser.add_argument("--output", default=None, help="JSON lines (appended)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    devices = args.devices.split(",")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    runtime = medium_runtime(args.layers, devices, dtype)
    prepared = runtime.prepare(prompt="a lighthouse at dusk", width=args.size, height=args.size, seed=3,
                               guidance_scale=args.guidance)
    cache = ops.CommCache(timeout_s=3600.0)
    start = time.perf_counter()
    record = {"kind": "sd3_branches", "layers": args.layers, "size": args.size, "dtype": args.dtype,
              "guidance": args.guidance, "devices": devices, **degree_check(runtime, prepared, devices, cache)}
    record["seconds"] = time.perf_counter() - start
    print(json.dumps(record))
    if args.decode:
        latent = torch.randn(prepared.noise.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        one = verify.patch_decode(runtime, prepared, latent, devices[:1])
        two = verify.patch_decode(runtime, prepared, latent, devices[:2], cache)
        decode = {"kind": "patch_decode", "size": args.size, "dtype": args.dtype, "max_abs_diff":
                  (two - one).abs().max().item(), "max_abs_ref": one.abs().max().item(),
                  "tolerance": bf16_tolerance(runtime, 1.0)}
        print(json.dumps(decode))
        record = [record, decode]
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            for r in record if isinstance(record, list) else [record]:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
