#!/usr/bin/env python3
"""What does per-request LoRA (issue 19) cost: the switch of a device's adapter set, the step with an adapter
fused, and the throughput of a burst that mixes 3 adapters?

Adapters are made here at random, rank --ranks, on every attention projection of the model (FLUX: to_q/k/v,
to_out.0, add_q/k/v_proj, to_add_out of the double blocks, to_q/k/v of the single blocks), saved in bf16 as
diffusers saves them (`<Pipeline>.save_lora_weights`) into a temporary --lora-dir, and served by one
AsyncEngine started as `serve` starts it (`--lora-dir`, CUDA graphs, compile by default on GPUs).

  switch      per rank, on the first device, the engine idle (executor/adapters.py `LoraDevices.activate`, what a
              group's ranks run before its steps): "first" (the first fuse ever also copies the original
              weights of every adapted layer), "load+apply" (an adapter not in the device's LRU: read from its
              file, page cache warm, moved to the device, fused), "apply" (adapter already loaded: one GEMM per
              layer written over the weight), "restore" (back to the plain model: a copy per layer). Medians.
  step        per rank and degree (1 and the number of devices): seconds per step of one --size request,
              `submit_steps` of --steps steps (device-synced), plain and with an adapter fused, alternating;
              median of --repeats after a warm-up call. Fused adapters change no kernel: the two should agree.
              Each LoRA call also switches the devices (plain -> adapter, loaded): `switch_in_call_s`.
  throughput  --requests requests of --size, --steps steps, sent at once through engine.generate (no deadline
              pressure: deadline 1 h), plain, then each with one of 3 adapters (round robin) of the largest
              rank: images/min, the switches the devices made and their seconds, the cost model's
              lora_switch_ms (measured at engine start-up).

Appends one JSON object per measurement to --output and prints them.

  # on a CPU (the tiny model), to check the script: ~1 min
  python bench/lora_bench.py --model tiny --devices cpu:0

  # one H200, FLUX.1-dev architecture with random weights, 1024^2
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    python bench/lora_bench.py --model flux-dev --devices cuda:0 --size 1024 --ranks 16,64 --steps 28 \\
      --requests 12 --profile bench/profiles/flux-dev-2xH200.json --output bench/results/lora-1xH200.jsonl
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
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest  # noqa: E402
from tetri_engine.request import LoraRef  # noqa: E402

ADAPTERS_PER_RANK = 3


def emit(args, record: dict) -> None:
    record = {"bench": "lora", "model": args.model, "devices": args.devices, "size": args.size,
              "machine": platform.node(), "torch": torch.__version__, **record}
    line = json.dumps(record)
    print(line, flush=True)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def save_adapters(engine: AsyncEngine, lora_dir: str, ranks: list[int]) -> dict[int, list[str]]:
    """ADAPTERS_PER_RANK random adapters per rank on every attention projection, saved as diffusers saves them."""
    import diffusers

    loras = engine.executor.loras
    layers = {name: m for name, m in loras.devices[0].fused.layers.items() if ".attn." in f".{name}"}
    pipeline = getattr(diffusers, loras.pipeline_class_name)
    names: dict[int, list[str]] = {}
    for rank in ranks:
        for i in range(ADAPTERS_PER_RANK):
            gen = torch.Generator().manual_seed(1000 * rank + i)
            factors = {}
            for layer, module in layers.items():
                factors[f"{layer}.lora_A.weight"] = (torch.randn(rank, module.in_features, generator=gen)
                                                     / module.in_features ** 0.5).to(torch.bfloat16)
                factors[f"{layer}.lora_B.weight"] = (torch.randn(module.out_features, rank, generator=gen)
                                                     * 0.01).to(torch.bfloat16)
            name = f"r{rank}-{i}"
            pipeline.save_lora_weights(os.path.join(lora_dir, name), transformer_lora_layers=factors)
            names.setdefault(rank, []).append(name)
    return names


def measure_switches(args, engine: AsyncEngine, names: dict[int, list[str]]) -> None:
    loras = engine.executor.loras
    first = True
    for rank, adapters in names.items():
        times: dict[str, list[float]] = {"load+apply": [], "apply": [], "restore": []}
        for name in adapters:  # not loaded yet: read + move + fuse
            seconds = loras.activate(0, ((name, 1.0),))
            if first:  # also copied every adapted layer's original weight
                emit(args, {"phase": "switch", "rank": rank, "kind": "first", "seconds": seconds})
                first = False
            else:
                times["load+apply"].append(seconds)
        for _ in range(args.repeats):
            for name in adapters:  # loaded: fuse only
                times["apply"].append(loras.activate(0, ((name, 1.0),)))
            times["restore"].append(loras.activate(0, ()))
        stats = loras.stats()[engine.devices[0]]
        for kind, values in times.items():
            if values:
                emit(args, {"phase": "switch", "rank": rank, "kind": kind, "median_s": statistics.median(values),
                            "samples": len(values), "loaded_mib": stats["loaded_mib"],
                            "originals_mib": stats["originals_mib"]})


def step_seconds(engine: AsyncEngine, degree: int, lora: tuple, args) -> dict[str, float]:
    """Median seconds per step of --steps-step calls at `degree`, plain and with `lora`, the calls alternating
    (so drift hits both alike; each LoRA call switches the devices to the adapter and each plain call back):
    {"plain_step_s", "lora_step_s", "switch_in_call_s" (StepsResult.lora_s of the LoRA calls)}."""
    ex = engine.executor
    ids = {"plain": f"bench-plain-{degree}", "lora": f"bench-lora-{degree}"}
    for kind, rid in ids.items():
        ex.submit_encode(rid, GenerationRequest(prompt="a lighthouse", width=args.size, height=args.size, seed=1,
                                                num_inference_steps=args.steps * (args.repeats + 1),
                                                lora=lora if kind == "lora" else None)).result()
    samples: dict[str, list[float]] = {"plain_step_s": [], "lora_step_s": [], "switch_in_call_s": []}
    try:
        for i in range(args.repeats + 1):
            for kind, rid in ids.items():
                result = ex.submit_steps([rid], tuple(range(degree)), args.steps).result()
                if result[rid].error:
                    raise RuntimeError(result[rid].error)
                if i:  # (the first call of each is the warm-up)
                    samples[f"{kind}_step_s"].append(result.seconds / result[rid].steps_done)
                    if kind == "lora":
                        samples["switch_in_call_s"].append(result.lora_s)
    finally:
        for rid in ids.values():
            ex.release(rid)
    return {key: statistics.median(values) for key, values in samples.items()}


def measure_steps(args, engine: AsyncEngine, names: dict[int, list[str]]) -> None:
    for degree in sorted({1, len(engine.devices)}):
        for rank, adapters in names.items():
            times = step_seconds(engine, degree, (LoraRef(adapters[0], 1.0),), args)
            emit(args, {"phase": "step", "rank": rank, "degree": degree, **times,
                        "ratio": times["lora_step_s"] / times["plain_step_s"]})
    for i in range(len(engine.devices)):  # the scheduler's view: every device back on the plain model
        engine.executor.loras.activate(i, ())


async def run_burst(engine: AsyncEngine, args, adapters: list[str]) -> float:
    async def one(i: int) -> None:
        lora = [{"name": adapters[i % len(adapters)], "scale": 1.0}] if adapters else None
        request = GenerationRequest(prompt=f"request {i}", width=args.size, height=args.size, seed=i,
                                    num_inference_steps=args.steps, deadline_s=3600.0, lora=lora)
        async for out in engine.generate(request):
            if out.finished and out.state != "completed":
                raise RuntimeError(f"request {i}: {out.state} {out.error}")

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.requests)))
    return time.perf_counter() - start


async def measure_throughput(args, engine: AsyncEngine, names: dict[int, list[str]]) -> None:
    rank = max(names)
    for label, adapters in (("plain", []), (f"3 adapters rank {rank}", names[rank])):
        before = engine.executor.loras.stats()
        wall = await run_burst(engine, args, adapters)
        after = engine.executor.loras.stats()
        switches = sum(after[d]["switches"] - before[d]["switches"] for d in after)
        switch_s = sum(after[d]["switch_s"] - before[d]["switch_s"] for d in after)
        emit(args, {"phase": "throughput", "mix": label, "requests": args.requests, "steps": args.steps,
                    "wall_s": wall, "images_per_min": 60.0 * args.requests / wall, "switches": switches,
                    "switch_s": switch_s, "policy": args.policy,
                    "cost_lora_switch_ms": engine.cost_model.lora_switch_s * 1e3})


async def main_async(args) -> None:
    with tempfile.TemporaryDirectory(prefix="tetri-lora-bench-") as lora_dir:
        config = EngineConfig(model=args.model, devices=args.devices, policy=args.policy, profile=args.profile,
                              lora_dir=lora_dir, max_queue=max(64, args.requests), max_width=args.size,
                              max_height=args.size, compile=args.compile, admission="best_effort")
        start = time.perf_counter()
        async with AsyncEngine(config) as engine:
            emit(args, {"phase": "start", "seconds": time.perf_counter() - start,
                        "cost_lora_switch_ms": engine.cost_model.lora_switch_s * 1e3})
            names = await asyncio.to_thread(save_adapters, engine, lora_dir, args.ranks)
            await asyncio.to_thread(measure_switches, args, engine, names)
            await asyncio.to_thread(measure_steps, args, engine, names)
            await measure_throughput(args, engine, names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux-dev")
    parser.add_argument("--devices", default="cuda:0", help="comma-separated (default: cuda:0)")
    parser.add_argument("--size", type=int, default=1024, help="square side in pixels (default: 1024)")
    parser.add_argument("--ranks", default="16,64", help="LoRA ranks (default: 16,64)")
    parser.add_argument("--steps", type=int, default=8, help="steps per call / request (default: 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=12, help="requests per throughput burst (default: 12)")
    parser.add_argument("--policy", default="tetri")
    parser.add_argument("--profile", default=None, help="profile JSON (default: measured at start-up, cached)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--output", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    args.devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    args.ranks = sorted({int(r) for r in args.ranks.split(",")})
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
