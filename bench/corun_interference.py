#!/usr/bin/env python3
"""Co-running interference: how much one group's work slows another's in the one engine process.

The simulator costs every group at its profiled time alone; in the live engine, groups on different
devices share one process (one GIL, one prompt encoder). This measures, on the executor directly:

  1. prompt encode time with the devices idle, and while a long step-bound group runs on the
     encoder's device, with the encode stream at normal priority (the executor's) and at high
     priority (tried on 2xH200: no difference, so the delay is not GPU scheduling);
  2. a small request's steps on another device, alone and next to that long group (host-side
     contention: both executor threads launch their graphs and Euler updates under one GIL).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
      python bench/corun_interference.py --model flux-dev --devices cuda:0,cuda:1 --output out/corun.jsonl

On CPU (the tiny model) it runs the same code; the figures there say nothing about GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tetri_engine import GenerationRequest  # noqa: E402
from tetri_engine.executor import Executor  # noqa: E402
from tetri_engine.model import load_runtime  # noqa: E402

_ids = iter(range(1_000_000))


def encode(executor: Executor, side: int, steps: int) -> str:
    rid = f"r{next(_ids)}"
    req = GenerationRequest(prompt=f"interference {rid}", width=side, height=side, num_inference_steps=steps, seed=1)
    executor.submit_encode(rid, req).result()
    return rid


def timed_encodes(executor: Executor, side: int, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        rid = encode(executor, side, 2)
        out.append(time.perf_counter() - start)
        executor.release(rid)
    return out


def timed_steps(executor: Executor, device: int, side: int, steps: int) -> float:
    rid = encode(executor, side, steps)
    start = time.perf_counter()
    result = executor.submit_steps([rid], (device,), steps).result()
    seconds = time.perf_counter() - start
    executor.release(rid)
    assert result.requests[rid].error is None, result.requests[rid].error
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--devices", default="cpu:0,cpu:1")
    p.add_argument("--big", type=int, default=2048, help="side of the long request on device 0")
    p.add_argument("--big-steps", type=int, default=12)
    p.add_argument("--small", type=int, default=512, help="side of the small request on device 1")
    p.add_argument("--small-steps", type=int, default=20)
    p.add_argument("--encodes", type=int, default=5)
    p.add_argument("--output", default=None, help="JSON lines")
    args = p.parse_args()

    devices = args.devices.split(",")
    runtime = load_runtime(args.model, devices=devices, dtype=torch.bfloat16 if devices[0].startswith("cuda")
                           else torch.float32)
    executor = Executor(runtime, devices)
    rows = []

    def record(name: str, values: list[float], **extra) -> None:
        row = {"case": name, "median_s": statistics.median(values), "max_s": max(values), "n": len(values),
               "model": args.model, "devices": devices, **extra}
        rows.append(row)
        print(f"{name:44s} median {1000 * row['median_s']:9.1f} ms  max {1000 * row['max_s']:9.1f} ms  (n={len(values)})",
              flush=True)

    def with_big_running(fn):
        """Run fn() while a long degree-1 request steps on device 0; returns fn's result."""
        rid = encode(executor, args.big, args.big_steps)
        future = executor.submit_steps([rid], (0,), args.big_steps)
        time.sleep(0.5)  # let it get going (first steps queued on the device)
        try:
            return fn()
        finally:
            result = future.result()
            executor.release(rid)
            assert not future.running() and result.requests[rid].error is None

    # Warm-up: graphs and first-use costs of both sizes on both devices.
    timed_steps(executor, 0, args.big, 2)
    timed_steps(executor, 1, args.small, 2)
    timed_encodes(executor, args.small, 2)

    record("encode, devices idle", timed_encodes(executor, args.small, args.encodes))
    if devices[0].startswith("cuda"):
        for priority in (0, -1):
            executor._encode_stream = torch.cuda.Stream(runtime.encode_device, priority=priority)  # bench override
            record(f"encode, {args.big}^2 running, stream priority {priority}",
                   with_big_running(lambda: timed_encodes(executor, args.small, args.encodes)), priority=priority)
        executor._encode_stream = None  # back to the executor's own choice
    else:
        record(f"encode, {args.big}^2 running", with_big_running(lambda: timed_encodes(executor, args.small, args.encodes)))

    alone = [timed_steps(executor, 1, args.small, args.small_steps) for _ in range(3)]
    record(f"{args.small}^2 x{args.small_steps} steps on device 1, alone", alone)
    beside = with_big_running(lambda: [timed_steps(executor, 1, args.small, args.small_steps) for _ in range(3)])
    record(f"{args.small}^2 x{args.small_steps} steps on device 1, {args.big}^2 beside", beside)
    print(f"slowdown of the small request's steps beside the big one: "
          f"{statistics.median(beside) / statistics.median(alone):.2f}x", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    executor.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
