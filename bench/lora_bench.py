#!/usr/bin/env python3
"""What does per-request LoRA cost (issue 19)? Adapters are fused into each device's weights
(tetri_engine/model/lora.py), so a LoRA step should cost what a plain step costs, and the price is the switch
when a device's next group wants another adapter set.

1. load: reading an adapter file (diffusers format, made here at random: rank --ranks on every attention
   projection) onto a device, per rank: seconds and MiB (the file is in the page cache: it was just written).
2. switch: `LoraDevices.activate` on the first device, adapters already loaded: plain -> A, A -> B, B -> plain,
   --repeats times each (median), per rank; and `measure_switch_s` (what the engine puts in its cost model).
3. step: one request at --size, --steps steps, on 1 device and on all (a power of two), plain and with a rank-16
   adapter fused: ms per step (the executor's device-synced time / steps; median of --repeats runs).
4. mix: --requests requests at --size sent at once to an AsyncEngine on all devices (--profile: no start-up
   measurement), three waves: plain, all one adapter, a mix of 3 adapters (round robin): seconds for the wave,
   requests per minute, adapter switches and their seconds (the executor's counters).

Prints each measurement; appends one JSON object per measurement to --output.

  # on a CPU (the tiny model, virtual devices): seconds, only to check the script
  python bench/lora_bench.py --model tiny --devices cpu:0,cpu:1 --size 128x128 --steps 4 --requests 6

  # on 2xH200, FLUX.1-dev architecture, random weights
  python bench/lora_bench.py --model flux-dev --devices cuda:0,cuda:1 --size 1024x1024 --steps 28 \\
    --profile bench/profiles/flux-dev-2xH200.json --output bench/results/lora-2xH200.jsonl
"""
from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest  # noqa: E402
from tetri_engine.executor import Executor  # noqa: E402
from tetri_engine.model.lora import read_adapter, target_layers  # noqa: E402
from tetri_engine.request import LoraRef  # noqa: E402

PROMPT = "a lighthouse on a cliff at sunset, oil painting"


def save_random_adapter(directory: str, name: str, transformer, pipeline_class_name: str, rank: int, seed: int) -> str:
    """A random adapter of `rank` on every attention projection, saved as diffusers saves one -> its file."""
    import diffusers

    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for layer, module in target_layers(transformer).items():
        if ".attn." in f".{layer}":
            factors[f"{layer}.lora_A.weight"] = (torch.randn(rank, module.in_features, generator=gen)
                                                 / module.in_features ** 0.5).to(torch.bfloat16)
            factors[f"{layer}.lora_B.weight"] = (torch.randn(module.out_features, rank, generator=gen) * 0.01
                                                 ).to(torch.bfloat16)
    getattr(diffusers, pipeline_class_name).save_lora_weights(os.path.join(directory, name),
                                                              transformer_lora_layers=factors)
    return os.path.join(directory, name, "pytorch_lora_weights.safetensors")


def synced(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_load_and_switch(ex: Executor, directory: str, ranks: list[int], repeats: int, emit) -> None:
    """1 and 2, on the first device."""
    loras, runtime = ex.loras, ex.runtime
    dev = loras.devices[0]
    for rank in ranks:
        names = [f"r{rank}-{i}" for i in range(2)]
        paths = [save_random_adapter(directory, n, runtime.transformer_on(ex.devices[0]),
                                     runtime.adapter.pipeline_class_name, rank, seed=i) for i, n in enumerate(names)]
        loads = []
        for _ in range(repeats):
            start = time.perf_counter()
            weights = read_adapter(paths[0], runtime.adapter.pipeline_class_name, dev.fused.layers, dev.device,
                                   dev.dtype, names[0])
            synced(dev.device)
            loads.append(time.perf_counter() - start)
        emit({"measure": "load", "rank": rank, "layers": len(weights.layers), "mib": weights.nbytes / 2**20,
              "load_ms": 1e3 * statistics.median(loads)})
        switches = {"plain->A": [], "A->B": [], "B->plain": []}
        for key in (((names[0], 1.0),), ((names[1], 1.0),), ()):  # both loaded: what is left to time is the
            loras.activate(0, key)                                  # switch (plain->A copies the originals too)
        originals_mib = 0.0
        for _ in range(repeats):
            for label, key in (("plain->A", ((names[0], 1.0),)), ("A->B", ((names[1], 1.0),)), ("B->plain", ())):
                switches[label].append(loras.activate(0, key))
                originals_mib = max(originals_mib, dev.fused.originals_nbytes / 2**20)
        emit({"measure": "switch", "rank": rank, **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in switches.items()},
              "originals_mib": originals_mib, "originals_mib_plain": dev.fused.originals_nbytes / 2**20})
    emit({"measure": "measure_switch_s", "rank": 16, "ms": 1e3 * loras.measure_switch_s()})


def measure_steps(ex: Executor, lora_name: str, width: int, height: int, steps: int, repeats: int, emit) -> None:
    """3: ms per step, plain and with an adapter fused, at degree 1 and at every device."""
    degrees = sorted({1, 1 << (len(ex.devices).bit_length() - 1)})
    count = 0
    for degree in degrees:
        for label, lora in (("plain", None), ("lora", (LoraRef(lora_name, 1.0),))):
            times = []
            for r in range(repeats + 1):  # the first: warm-up (kernels, graphs, communicators, the switch)
                count += 1
                rid = f"step-{count}"
                ex.submit_encode(rid, GenerationRequest(PROMPT, width, height, num_inference_steps=steps, seed=r,
                                                        lora=lora)).result()
                result = ex.submit_steps([rid], tuple(range(degree)), steps).result()
                if result[rid].error:
                    raise RuntimeError(result[rid].error)
                ex.release(rid)
                if r:
                    times.append(1e3 * result.seconds / steps)
            emit({"measure": "step", "degree": degree, "width": width, "height": height, "mode": label,
                  "step_ms": statistics.median(times), "runs": times})


async def measure_mix(config: EngineConfig, names: list[str], width: int, height: int, steps: int,
                      num_requests: int, emit) -> None:
    """4: three waves of requests sent at once: plain, one adapter, three adapters in turn."""
    waves = {"plain": [None], "one": [names[0]], "mix3": names[:3]}
    async with AsyncEngine(config) as engine:
        for label, choice in waves.items():
            before = engine.executor.loras.stats()
            requests = [GenerationRequest(PROMPT, width, height, num_inference_steps=steps, seed=i,
                                          lora=None if choice[i % len(choice)] is None
                                          else [LoraRef(choice[i % len(choice)], 1.0)]) for i in range(num_requests)]
            start = time.perf_counter()
            finals = await asyncio.gather(*(_final(engine, r) for r in requests))
            seconds = time.perf_counter() - start
            after = engine.executor.loras.stats()
            failed = [f.error for f in finals if f.state != "completed"]
            emit({"measure": "mix", "wave": label, "requests": num_requests, "adapters": len(set(choice)),
                  "seconds": seconds, "requests_per_min": 60 * num_requests / seconds, "failed": len(failed),
                  "switches": sum(after[d]["switches"] - before[d]["switches"] for d in after),
                  "switch_s": sum(after[d]["switch_s"] - before[d]["switch_s"] for d in after),
                  "loads": sum(after[d]["loads"] - before[d]["loads"] for d in after)})


async def _final(engine: AsyncEngine, request: GenerationRequest):
    final = None
    async for out in engine.generate(request):
        final = out
    return final


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--devices", default="cpu:0,cpu:1")
    parser.add_argument("--size", default="128x128", help="WIDTHxHEIGHT")
    parser.add_argument("--steps", type=int, default=4, help="steps per request (step and mix measurements)")
    parser.add_argument("--ranks", default="16,64", help="adapter ranks of the load and switch measurements")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=12, help="requests per wave of the mix measurement")
    parser.add_argument("--profile", default=None, help="step-time profile for the engine (default: measured)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks (GPU; slow start)")
    parser.add_argument("--output", default=None, help="JSON lines file (appended)")
    args = parser.parse_args()
    devices = args.devices.split(",")
    width, height = (int(v) for v in args.size.lower().split("x"))
    out = open(args.output, "a", encoding="utf-8") if args.output else None
    stamp = {"model": args.model, "devices": devices, "torch": torch.__version__,
             "gpu": torch.cuda.get_device_name(0) if devices[0].startswith("cuda") else "cpu",
             "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)}

    def emit(record: dict) -> None:
        print(json.dumps(record))
        if out is not None:
            out.write(json.dumps({**stamp, **record}) + "\n")
            out.flush()

    with tempfile.TemporaryDirectory() as directory:
        ex = Executor.load(args.model, devices, lora_dir=directory, compile=args.compile)
        try:
            with ex.compiling():
                measure_load_and_switch(ex, directory, [int(r) for r in args.ranks.split(",")], args.repeats, emit)
                measure_steps(ex, "r16-0", width, height, args.steps, args.repeats, emit)
            transformer, pipeline_class = ex.runtime.transformer_on(devices[0]), ex.runtime.adapter.pipeline_class_name
            names = [f"mix-{i}" for i in range(3)]
            for i, name in enumerate(names):
                save_random_adapter(directory, name, transformer, pipeline_class, 16, seed=10 + i)
        finally:
            ex.shutdown()
        del ex
        gc.collect()  # the engine loads the model again: free the first copy's GPU memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        config = EngineConfig(model=args.model, devices=devices, lora_dir=directory, profile=args.profile,
                              compile=args.compile, admission="best_effort", slo_scale=100.0,
                              max_queue=max(64, args.requests))
        asyncio.run(measure_mix(config, names, width, height, args.steps, args.requests, emit))
    if out is not None:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
