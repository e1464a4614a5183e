#!/usr/bin/env python3
"""Co-running interference: does a big group slow a small group of the same process, and where does the
small group's time go? (issue 21; bench/RESULTS.md "Co-running").

For each VARIANT (the executor with one piece switched, `StepOptions`), and each small size, it times
--repeats calls of --small-steps steps of a small request ALONE and BESIDE a big request (--big, degree
1) that keeps stepping the whole time, with the executor's trace on (StepOptions.trace), and writes per
call: wall time, and from the small group's rank the per-phase GPU times (CUDA events: the batch's
input copies before its first step, each step) and host times (waiting for queue room, launching the
step, meeting the group, commit + progress, preparing the batch). Variants:

  fixed        the executor as it is (native loop, host conditioning, private reads, 2 steps queued)
  coupled      prompt embeddings kept on the encode device and cross-device reads on the shared
               stream: the behaviour before the fix (a 512^2 group on GPU 1 waited ~1.2 s for a 2048^2
               group's queued steps on GPU 0: the 2.12x)
  cond-on-encoder / shared-reads   one of the two halves of "coupled" each (the prompt embeddings on
               the encode device / cross-device reads on the shared stream)
  python-loop  the step loop in Python (one GIL round per step) instead of the native loop
  unbounded    no bound on the steps a rank queues on its GPU
  no-graphs    every step eager (no CUDA graphs)

Two devices (default): the big request runs through the same executor on devices[0], the small one on
devices[1]. That is the case of issue 21.

--same-device (one GPU): both on devices[0]. The big load is then the big request's step captured as a
CUDA graph and replayed by a thread of this script on a stream of its own (two groups of one executor
cannot share a GPU), so the small group competes with it for the GPU's SMs as well as for the host:
the slowdown there is GPU sharing plus host effects, not the cross-device coupling, which needs two
devices. It adds a PROBE of the mechanism on one GPU: the latency of a preview (a device-to-host read
by an executor thread) while the big load queues steps on the device's default stream, the stream
the executor's threads use: with private reads it does not wait for them, with shared reads (coupled)
it does.

  # 2xH200 (the issue's case), ~4 min:
  NCCL_NVLS_ENABLE=0 python bench/corun_interference.py --model flux-dev --devices cuda:0,cuda:1 \\
      --small 256,512,1024 --variants fixed,coupled,python-loop --output out/corun.jsonl
  # 1xH200:
  python bench/corun_interference.py --model flux-dev --devices cuda:0 --same-device --small 512 --output out/corun.jsonl
  # CPU (the tiny model, 2 virtual devices): the same code; the figures say nothing about GPUs
  python bench/corun_interference.py --small 128 --big 256 --small-steps 4 --repeats 1

Prints one table row per (variant, size) and the probe; --output gets one JSON line per call and per row.
"""
from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tetri_engine import GenerationRequest  # noqa: E402
from tetri_engine.executor import Executor  # noqa: E402
from tetri_engine.executor.options import StepOptions  # noqa: E402
from tetri_engine.model import load_runtime  # noqa: E402

# name -> (StepOptions fields, cuda_graphs)
VARIANTS = {
    "fixed": ({}, None),
    "coupled": ({"host_conditioning": False, "private_reads": False}, None),
    "cond-on-encoder": ({"host_conditioning": False}, None),
    "shared-reads": ({"private_reads": False}, None),
    "python-loop": ({"loop": "python"}, None),
    "unbounded": ({"max_steps_queued": 0}, None),
    "no-graphs": ({}, False),
}
_ids = iter(range(10**9))


def encode(executor: Executor, side: int, steps: int) -> str:
    rid = f"r{next(_ids)}"
    executor.submit_encode(rid, GenerationRequest(prompt=f"corun {rid}", width=side, height=side,
                                                  num_inference_steps=steps, seed=1)).result()
    return rid


def summarize(result, rid: str) -> dict:
    """The small group's rank-0 trace -> per-phase figures (ms; host per step in microseconds)."""
    if result.trace is None or result.trace["ranks"][0] is None:  # the call failed before its steps
        raise RuntimeError(f"the small request's call failed: {result.requests[rid].error}")
    rank = result.trace["ranks"][0]
    marks, inputs_ms, step_ms = rank["gpu_ms"], 0.0, []
    for i, (label, ms) in enumerate(marks):
        if label == "batch":
            inputs_ms += ms  # GPU time from the call's start to its first step: the batch's input copies
        elif label in ("step", "end") and i > 0 and marks[i - 1][0] == "step":
            step_ms.append(ms)  # the previous step on the GPU
    phases = [p for seg in rank["segments"] for p in seg["phases_s"]]
    steps = max(1, len(phases))
    room, launch, meet, commit = (sum(p[j] for p in phases) for j in range(4))
    return {"wall_ms": None, "steps_ms": 1000 * result.seconds, "inputs_gpu_ms": inputs_ms if marks else None,
            "step_gpu_ms": statistics.median(step_ms) if step_ms else None, "steps": len(phases),
            "host_prepare_ms": 1000 * rank["prepare_s"], "host_room_wait_ms": 1000 * room,
            "host_us_per_step": 1e6 * (launch + meet + commit) / steps,
            "host_launch_us": 1e6 * launch / steps, "host_meet_us": 1e6 * meet / steps,
            "host_commit_us": 1e6 * commit / steps, "error": result.requests[rid].error}


def timed_call(executor: Executor, device: int, side: int, steps: int) -> dict:
    rid = encode(executor, side, steps)
    start = time.perf_counter()
    result = executor.submit_steps([rid], (device,), steps).result()
    wall = time.perf_counter() - start
    row = summarize(result, rid)
    row["wall_ms"] = 1000 * wall
    executor.release(rid)
    return row


class BigInExecutor:
    """The big request stepping on device 0 through the executor, call after call, until stopped."""

    def __init__(self, executor: Executor, side: int, steps: int):
        self.executor, self.side, self.steps = executor, side, steps
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.calls = 0

    def _run(self) -> None:
        rid, left = None, 0
        while not self.stop.is_set():
            if left < self.steps:  # (1000 steps: a schedule CUDA graphs hold)
                if rid is not None:
                    self.executor.release(rid)
                rid, left = encode(self.executor, self.side, 1000), 1000
            result = self.executor.submit_steps([rid], (0,), self.steps).result()
            assert result.errors == {}, result.errors
            left -= self.steps
            self.calls += 1
        self.executor.release(rid)

    def __enter__(self):
        self.thread.start()
        time.sleep(0.5)  # let it get going (steps queued on the device)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class BigOnOwnThread:
    """One GPU: the big request's step (forward) captured as a CUDA graph and replayed by a thread of this
    script, two launches queued at most, on `stream` ("own": a stream of its own; "default": the
    device's default stream, where the executor's threads queue their work)."""

    def __init__(self, runtime, device: torch.device, side: int):
        self.device = device
        prepared = runtime.prepare(prompt="corun big", width=side, height=side, seed=7, num_steps=50)
        latent = prepared.noise.to(device)
        inputs = runtime.adapter.rank_inputs([prepared], device, 0, 1)
        transformer = runtime.transformer_on(device)
        self.graph = torch.cuda.CUDAGraph()
        side_stream = torch.cuda.Stream(device)
        with torch.no_grad(), torch.cuda.device(device):
            side_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side_stream):  # warm-up, then capture (the executor is idle now)
                runtime.adapter.velocity(transformer, [latent], [prepared], [0], inputs)
                self.graph.capture_begin(capture_error_mode="thread_local")
                self.out = runtime.adapter.velocity(transformer, [latent], [prepared], [0], inputs)
                self.graph.capture_end()
            torch.cuda.synchronize(device)
        self.keep = (latent, inputs, prepared)
        self.stream_kind = "own"
        self.steps = 0

    def running(self, stream_kind: str):
        self.stream_kind = stream_kind
        return self

    def _run(self) -> None:
        torch.cuda.set_device(self.device)
        stream = torch.cuda.Stream(self.device) if self.stream_kind == "own" else torch.cuda.default_stream(self.device)
        queued = collections.deque()
        with torch.cuda.stream(stream):
            while not self.stop.is_set():
                self.graph.replay()
                event = torch.cuda.Event(blocking=True)
                event.record(stream)
                queued.append(event)
                while len(queued) > 1:
                    queued.popleft().synchronize()
                self.steps += 1
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def probe(executor: Executor, big: BigOnOwnThread, side: int, n: int) -> dict:
    """One GPU: preview latency of a request on the device, idle and while the big load queues steps on
    the device's default stream."""
    rid = encode(executor, side, 4)
    assert executor.submit_steps([rid], (0,), 2).result().errors == {}
    executor.submit_preview(rid).result()  # first-use costs

    def previews() -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            executor.submit_preview(rid).result()
            out.append(1000 * (time.perf_counter() - start))
        return out

    idle = previews()
    with big.running("default"):
        busy = previews()
    executor.release(rid)
    return {"preview_idle_ms": statistics.median(idle), "preview_beside_ms": statistics.median(busy)}


def run_variant(name: str, runtime, devices: list[str], args, big_thread) -> list[dict]:
    fields, graphs = VARIANTS[name]
    options = StepOptions(trace=True, **fields)
    small_device = 0 if args.same_device else 1
    rows = []
    with Executor(runtime, devices, cuda_graphs=graphs, step_options=options) as executor:
        warm = [(small_device, side) for side in args.small] + ([] if args.same_device else [(0, args.big)])
        for device, side in warm:  # graphs and first-use costs of every size on its device
            timed_call(executor, device, side, 2)
        for side in args.small:
            calls = {"alone": [timed_call(executor, small_device, side, args.small_steps) for _ in range(args.repeats)]}
            with (big_thread.running("own") if args.same_device else BigInExecutor(executor, args.big, args.big_steps)):
                calls["beside"] = [timed_call(executor, small_device, side, args.small_steps)
                                   for _ in range(args.repeats)]
            for case, values in calls.items():
                for value in values:
                    rows.append({"kind": "call", "variant": name, "small": side, "case": case, **value})
            row = {"kind": "row", "variant": name, "small": side, "big": args.big, "steps": args.small_steps}
            for case, values in calls.items():
                for key in ("wall_ms", "inputs_gpu_ms", "step_gpu_ms", "host_us_per_step", "host_room_wait_ms"):
                    got = [v[key] for v in values if v[key] is not None]
                    row[f"{case}_{key}"] = statistics.median(got) if got else None
            row["slowdown"] = row["beside_wall_ms"] / row["alone_wall_ms"]
            rows.append(row)
            print_row(row)
        if args.same_device and device_is_cuda(devices):
            result = {"kind": "probe", "variant": name, **probe(executor, big_thread, args.small[0], args.repeats * 3)}
            print(f"  probe {name:15s} preview idle {result['preview_idle_ms']:8.1f} ms, beside big steps on the "
                  f"default stream {result['preview_beside_ms']:8.1f} ms", flush=True)
            rows.append(result)
    return rows


def device_is_cuda(devices: list[str]) -> bool:
    return devices[0].startswith("cuda")


HEADER = (f"{'variant':15s} {'small':>5s} {'alone ms':>9s} {'beside ms':>9s} {'slowdn':>6s} "
          f"{'inputs GPU ms a/b':>17s} {'step GPU ms a/b':>15s} {'host us/step a/b':>16s} {'room wait ms a/b':>16s}")


def _pair(row: dict, key: str, scale: str = "{:.1f}") -> str:
    a, b = row.get(f"alone_{key}"), row.get(f"beside_{key}")
    return "/".join("-" if v is None else scale.format(v) for v in (a, b))


def print_row(row: dict) -> None:
    print(f"{row['variant']:15s} {row['small']:5d} {row['alone_wall_ms']:9.1f} {row['beside_wall_ms']:9.1f} "
          f"{row['slowdown']:6.2f} {_pair(row, 'inputs_gpu_ms'):>17s} {_pair(row, 'step_gpu_ms'):>15s} "
          f"{_pair(row, 'host_us_per_step', '{:.0f}'):>16s} {_pair(row, 'host_room_wait_ms'):>16s}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--devices", default="cpu:0,cpu:1")
    p.add_argument("--same-device", action="store_true", help="both groups on devices[0] (one GPU)")
    p.add_argument("--big", type=int, default=2048, help="side of the big request")
    p.add_argument("--big-steps", type=int, default=8, help="steps per call of the big request")
    p.add_argument("--small", default="512", help="sides of the small request, comma separated")
    p.add_argument("--small-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default="fixed,coupled,python-loop,unbounded,no-graphs")
    p.add_argument("--output", default=None, help="JSON lines")
    args = p.parse_args()
    args.small = [int(s) for s in args.small.split(",")]
    devices = args.devices.split(",")
    if args.same_device:
        devices = devices[:1]
    elif len(devices) < 2:
        p.error("two devices, or --same-device")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}: {sorted(VARIANTS)}")
    if args.same_device and not device_is_cuda(devices):
        p.error("--same-device needs a GPU (the big load is a CUDA graph)")
    start = time.perf_counter()
    runtime = load_runtime(args.model, devices=devices, dtype="auto")
    big_thread = BigOnOwnThread(runtime, torch.device(devices[0]), args.big) if args.same_device else None
    print(f"{args.model} on {devices}{' (same device)' if args.same_device else ''}, big {args.big}^2, "
          f"small x{args.small_steps} steps, {args.repeats} calls each; loaded in {time.perf_counter() - start:.0f} s")
    print(HEADER, flush=True)
    rows = []
    for name in variants:
        rows += run_variant(name, runtime, devices, args, big_thread)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        meta = {"model": args.model, "devices": devices, "same_device": args.same_device, "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(0) if device_is_cuda(devices) else None}
        with open(args.output, "w") as f:
            for row in rows:
                f.write(json.dumps({**meta, **row}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
