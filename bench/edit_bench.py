"""Image-edit latency vs text-to-image at the same size (issue 19): what an img2img or inpainting request
costs through the embedded engine, next to a text-to-image request of the same size and schedule.

For each degree (1, and 2 when two devices are given) an AsyncEngine runs on that many devices with the
fixed-degree policy, and each mode (text-to-image, img2img, inpainting) runs `--repeats` requests one
at a time (after one warm-up request per mode). An edit of N steps at strength s runs edit_steps(N, s)
steps (diffusers' rule: 28 at 0.6 run 17) and adds a VAE encode of the input (in encode_s); inpainting
adds a blend per step. JSON lines to --output: one per request ("kind": "request": total, queue, encode,
denoise, decode seconds, steps, ms per step), one per (degree, mode) ("kind": "summary": medians, and
`vs_text_to_image`: the median total over text-to-image's). Prints a table.

    # the 2-core CPU dev box (a check that it runs; the tiny model's timings mean little):
    python bench/edit_bench.py --model tiny --devices cpu:0 --size 128 --steps 8 --repeats 2 --output /tmp/edit.jsonl
    # GPUs (flux-dev random weights, 1024², 28 steps, strength 0.6; degree 2 too when two GPUs are given):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 python bench/edit_bench.py \\
        --model flux-dev --devices cuda:0,cuda:1 --size 1024 --steps 28 --strength 0.6 --repeats 5 \\
        --output bench/results/edit-2xH200.jsonl
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest, RequestState  # noqa: E402
from tetri_engine.request import edit_steps  # noqa: E402

MODES = ("text-to-image", "img2img", "inpaint")


def inputs(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth picture (uint8 [size, size, 3]) and a mask editing its centre square (bool, True = edit)."""
    y, x = np.mgrid[0:size, 0:size]
    picture = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    mask = np.zeros((size, size), dtype=bool)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = True
    return picture, mask


def request(mode: str, args, seed: int) -> GenerationRequest:
    picture, mask = inputs(args.size)
    edit = {} if mode == "text-to-image" else {"image": picture, "strength": args.strength,
                                                 "mask": mask if mode == "inpaint" else None}
    return GenerationRequest(prompt=f"edit bench {seed}", width=args.size, height=args.size,
                             num_inference_steps=args.steps, seed=seed, deadline_s=3600.0, **edit)


async def one(engine: AsyncEngine, req: GenerationRequest) -> dict:
    start = time.perf_counter()
    final = None
    async for out in engine.generate(req):
        final = out
    wall_s = time.perf_counter() - start
    if final.state != RequestState.COMPLETED:
        raise RuntimeError(f"request {req.request_id} {final.state}: {final.error}")
    m = final.metrics
    steps = sum(m.steps_at_degree.values())
    return {"wall_s": wall_s, "total_s": m.total_s, "queue_s": m.queue_s, "encode_s": m.encode_s,
            "denoise_s": m.denoise_s, "decode_s": m.decode_s, "steps": steps,
            "step_ms": 1e3 * m.denoise_s / steps if steps else None}


async def bench_degree(args, devices: list[str], degree: int, out) -> list[dict]:
    config = EngineConfig(model=args.model, devices=devices[:degree], policy=f"fixed{degree}",
                          profile=args.profile, max_queue=8, admission="best_effort")
    summaries = []
    async with AsyncEngine(config) as engine:
        for mode in MODES:  # warm-up: first-use costs (allocator, graphs, compiled shapes)
            await one(engine, request(mode, args, seed=10_000))
        for mode in MODES:
            rows = []
            for i in range(args.repeats):
                row = {"kind": "request", "model": args.model, "degree": degree, "mode": mode, "size": args.size,
                       "num_inference_steps": args.steps, "strength": None if mode == "text-to-image" else args.strength,
                       **await one(engine, request(mode, args, seed=i))}
                rows.append(row)
                out.write(json.dumps(row) + "\n")
            summaries.append({"kind": "summary", "model": args.model, "degree": degree, "mode": mode,
                              "size": args.size, "num_inference_steps": args.steps, "repeats": args.repeats,
                              "devices": list(engine.devices), "steps": rows[0]["steps"],
                              **{f"{k}_median": statistics.median(r[k] for r in rows)
                                 for k in ("wall_s", "total_s", "encode_s", "denoise_s", "decode_s", "step_ms")}})
    base = summaries[0]["total_s_median"]
    for s in summaries:
        s["vs_text_to_image"] = s["total_s_median"] / base if base else None
        out.write(json.dumps(s) + "\n")
    return summaries


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="flux-dev")
    parser.add_argument("--devices", default=None, help="comma-separated (default: every visible GPU, else cpu:0)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--degrees", default=None, help="e.g. 1,2 (default: 1, and 2 when two devices are given)")
    parser.add_argument("--profile", default=None, help="a step-time profile JSON (default: measured at start-up)")
    parser.add_argument("--output", required=True, help="JSON lines file")
    args = parser.parse_args(argv)
    if args.devices:
        devices = [d for d in args.devices.split(",") if d]
    else:
        import torch

        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu:0"]
    degrees = [int(d) for d in args.degrees.split(",")] if args.degrees else [1] + ([2] if len(devices) >= 2 else [])
    print(f"edit bench: {args.model} {args.size}x{args.size}, {args.steps} steps (edits run "
          f"{edit_steps(args.steps, args.strength)} at strength {args.strength}), degrees {degrees} on {devices}")
    with open(args.output, "w") as out:
        summaries = [s for k in degrees for s in asyncio.run(bench_degree(args, devices, k, out))]
    print(f"{'degree':>6} {'mode':>14} {'steps':>5} {'total s':>8} {'encode s':>8} {'denoise s':>9} "
          f"{'decode s':>8} {'ms/step':>8} {'vs t2i':>6}")
    for s in summaries:
        print(f"{s['degree']:>6} {s['mode']:>14} {s['steps']:>5} {s['total_s_median']:>8.3f} {s['encode_s_median']:>8.3f} "
              f"{s['denoise_s_median']:>9.3f} {s['decode_s_median']:>8.3f} {s['step_ms_median']:>8.1f} "
              f"{s['vs_text_to_image']:>6.2f}")


if __name__ == "__main__":
    main()
