"""What do the latent moves and the communicators cost? (issue 2 targets on 2xH200: a regroup
< 0.05% of one 1024x1024 FLUX step, a cache hit < 20 us, copies within 1.5x of the bound.)

Times, for FLUX latents (packed: L = (H/16) * (W/16) tokens, C = 64, bf16, batch 1) at 256^2, 512^2,
1024^2 and 2048^2:
  * shard (x on one device -> k shards on it), gather (k shards on k devices -> one device) and
    regroup (k1 -> k2 devices, and k -> k on other devices) for degrees 1, 2, 4, ... up to the
    devices at hand;
  * all_to_all of one attention layer's q, k and v in Ulysses layout (FLUX-dev: 24 heads x 128 head
    dim, the full sequence incl. 512 text tokens: [3 * 24, (L + 512) / k, 128] bf16 per rank), one
    thread per device, as the executor does it;
  * communicator creation: cold (a new cache: thread communicator or ncclCommInitAll) and warm
    (a cache hit).
Each copy is compared with its bound = bytes moved / bandwidth, both bandwidths measured here with a
large plain copy (same device, and device to device for GPUs). Per-operation times are the median
over repeats of (n back-to-back calls, then a device sync) / n. "% step" relates a time to one
FLUX.1-dev step on one H200 at that resolution (DESIGN.md's measured facts), the paper's measure.

Devices: GPUs when the extension is a CUDA build and GPUs are visible (all of them, or
--num-devices), else 4 virtual CPU devices (cpu:0..cpu:3, all the host CPU).

    .venv/bin/python bench/regroup.py --output bench/regroup-cpu.jsonl
    python bench/regroup.py --device cuda --output bench/regroup-2xh200.jsonl
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tetri_engine import ops  # noqa: E402
from tetri_engine.sched.metrics import percentile  # noqa: E402

RESOLUTIONS = (256, 512, 1024, 2048)
CHANNELS = 64  # FLUX packed latent: 16 latent channels x 2 x 2 patch
TEXT_TOKENS = 512
HEADS, HEAD_DIM = 24, 128  # FLUX.1-dev attention
# One FLUX.1-dev step (forward) on one H200, bf16, 512 text tokens (DESIGN.md, measured).
H200_STEP_MS = {256: 89.0, 512: 58.5, 1024: 175.6, 2048: 855.7}


def tokens(side: int) -> int:
    return (side // 16) * (side // 16)


class Bench:
    def __init__(self, devices: list[str], min_time_s: float):
        self.devices = devices
        self.is_cuda = devices[0].startswith("cuda")
        self.min_time_s = min_time_s
        self.rows: list[dict] = []

    # -- timing -------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.is_cuda:
            for d in self.devices:
                torch.cuda.synchronize(d)

    def time_us(self, fn, repeats: int = 5) -> float:
        """Median over `repeats` of the mean time of n back-to-back calls (n sized to min_time_s)."""
        fn()
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        one_s = max(time.perf_counter() - start, 1e-7)
        n = max(1, min(1000, int(self.min_time_s / repeats / one_s)))
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            self.sync()
            samples.append((time.perf_counter() - start) / n * 1e6)
        return statistics.median(samples)

    def copy_bandwidth(self, src_dev: str, dst_dev: str, nbytes: int = 256 << 20) -> float:
        """Bytes per second of one large plain copy src_dev -> dst_dev."""
        src = torch.empty(nbytes, dtype=torch.uint8, device=torch_device(src_dev)).fill_(1)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=torch_device(dst_dev))
        us = self.time_us(lambda: dst.copy_(src))
        return nbytes / (us * 1e-6)

    def record(self, row: dict) -> None:
        row.setdefault("device", "cuda" if self.is_cuda else "cpu")
        self.rows.append(row)


def torch_device(name: str) -> torch.device:
    return torch.device("cpu") if name.startswith("cpu") else torch.device(name)


def degrees(num_devices: int) -> list[int]:
    out, k = [], 1
    while k <= num_devices:
        out.append(k)
        k *= 2
    return out


def bench_latents(b: Bench, resolutions, local_bw: float, peer_bw: float) -> None:
    n = len(b.devices)
    for side in resolutions:
        length = tokens(side)
        x = torch.randn(1, length, CHANNELS).to(torch.bfloat16).to(torch_device(b.devices[0]))
        latent_bytes = x.numel() * x.element_size()
        step_us = H200_STEP_MS[side] * 1e3
        for k in degrees(n):
            group = b.devices[:k]
            shard_bytes = k * ops.shard_length(length, k) * CHANNELS * 2
            us = b.time_us(lambda: ops.shard(x, k))
            bound = shard_bytes / local_bw * 1e6
            b.record(dict(op="shard", res=side, k_from=1, k_to=k, bytes=shard_bytes, us=us, bound_us=bound,
                          pct_step=100 * us / step_us))
            shards = ops.shard(x, k, group)
            # Gather onto the first device: the shards of the other devices cross the link.
            remote = latent_bytes - ops.shard_length(length, k) * CHANNELS * 2 if b.is_cuda else latent_bytes
            us = b.time_us(lambda: ops.gather(shards, length, group[0]))
            bound = (remote / peer_bw + (latent_bytes - remote) / local_bw) * 1e6
            b.record(dict(op="gather", res=side, k_from=k, k_to=1, bytes=latent_bytes, us=us, bound_us=bound,
                          pct_step=100 * us / step_us))
        # Regroups: every change of degree, plus the same degree on other devices.
        cases = [(k1, k2) for k1 in degrees(n) for k2 in degrees(n) if k1 != k2]
        cases += [(k, k) for k in degrees(n) if k < n or (b.is_cuda and n > 1)]
        for k1, k2 in cases:
            old_group = b.devices[:k1]
            # Same degree: move to the next devices (on one host: rotate), so every shard moves.
            new_group = b.devices[n - k2:] if k1 != k2 else [b.devices[(i + 1) % n] for i in range(k2)]
            old = ops.shard(x, k1, old_group)
            moved = ops.regroup_bytes_moved(old, length, new_group)
            us = b.time_us(lambda: ops.regroup(old, length, new_group))
            bw = peer_bw if b.is_cuda else local_bw
            bound = moved / bw * 1e6
            b.record(dict(op="regroup", res=side, k_from=k1, k_to=k2, bytes=moved, us=us, bound_us=bound,
                          pct_step=100 * us / step_us, new_group=new_group))


def bench_comm_creation(b: Bench) -> None:
    for k in degrees(len(b.devices)):
        group = tuple(b.devices[:k])
        cache = ops.CommCache(capacity=8)
        start = time.perf_counter()
        cache.get(group)
        cold_us = (time.perf_counter() - start) * 1e6
        b.record(dict(op="comm_create_cold", k_from=k, k_to=k, us=cold_us, group=list(group)))
        hits = []
        for _ in range(2000):
            start = time.perf_counter()
            cache.get(group)
            hits.append((time.perf_counter() - start) * 1e6)
        hits.sort()
        b.record(dict(op="comm_cache_hit", k_from=k, k_to=k, us=statistics.median(hits),
                      p99_us=percentile(hits, 99), group=list(group)))


def bench_all_to_all(b: Bench, resolutions, local_bw: float, peer_bw: float) -> None:
    cache = ops.CommCache(capacity=8)
    for side in resolutions:
        seq = tokens(side) + TEXT_TOKENS
        step_us = H200_STEP_MS[side] * 1e3
        for k in degrees(len(b.devices)):
            if k == 1:
                continue
            group = b.devices[:k]
            comm = cache.get(tuple(group))
            per_rank = [torch.randn(3 * HEADS, seq // k, HEAD_DIM).to(torch.bfloat16).to(torch_device(d))
                        for d in group]
            nbytes = per_rank[0].numel() * per_rank[0].element_size()
            us = time_collective(b, comm, per_rank)
            # GPU: each rank sends (k-1)/k of its tensor over the links (all ranks at once, full duplex);
            # thread backend: each rank copies its whole output, the ranks share the host's memory.
            if b.is_cuda:
                bound = nbytes * (k - 1) / k / peer_bw * 1e6
            else:
                bound = nbytes * k / local_bw * 1e6
            b.record(dict(op="all_to_all", res=side, k_from=k, k_to=k, bytes=nbytes, us=us, bound_us=bound,
                          pct_step=100 * us / step_us, shape=list(per_rank[0].shape)))


def time_collective(b: Bench, comm, per_rank: list[torch.Tensor], repeats: int = 5) -> float:
    """Median over repeats of the mean time per all_to_all, one thread per rank, n calls back to back."""
    k = comm.size
    results: list[float] = []
    errors: list[BaseException] = []

    def run(n: int) -> float:
        start_line = threading.Barrier(k)
        elapsed = [0.0]

        def body(rank):
            try:
                start_line.wait()
                t0 = time.perf_counter()
                for _ in range(n):
                    comm.all_to_all(rank, per_rank[rank])
                if b.is_cuda:
                    torch.cuda.synchronize(b.devices[rank])
                comm.barrier(rank)
                if rank == 0:
                    elapsed[0] = time.perf_counter() - t0
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=body, args=(r,)) for r in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return elapsed[0] / n

    one_s = max(run(1), run(1), 1e-6)
    n = max(1, min(200, int(b.min_time_s / repeats / one_s)))
    for _ in range(repeats):
        results.append(run(n) * 1e6)
    return statistics.median(results)


def machine_description(devices: list[str]) -> str:
    if devices[0].startswith("cuda"):
        names = {torch.cuda.get_device_name(torch.device(d)) for d in devices}
        return f"{len(devices)}x {', '.join(sorted(names))}"
    return f"{platform.machine()} {os.cpu_count()} cores ({platform.processor() or 'cpu'}), {len(devices)} virtual devices"


def print_table(rows: list[dict]) -> None:
    print(f"{'op':<17} {'res':>5} {'k':>6} {'MB':>8} {'time us':>10} {'bound us':>9} {'x bound':>8} {'% step':>8}")
    for r in rows:
        res = str(r.get("res", "-"))
        ks = f"{r['k_from']}->{r['k_to']}" if r["k_from"] != r["k_to"] or r["op"] == "regroup" else str(r["k_to"])
        mb = f"{r['bytes'] / 1e6:.3f}" if "bytes" in r else "-"
        bound = f"{r['bound_us']:.1f}" if r.get("bound_us") else "-"
        ratio = f"{r['us'] / r['bound_us']:.2f}" if r.get("bound_us") else "-"
        pct = f"{r['pct_step']:.4f}" if "pct_step" in r else "-"
        extra = f"  p99 {r['p99_us']:.1f} us" if "p99_us" in r else ""
        print(f"{r['op']:<17} {res:>5} {ks:>6} {mb:>8} {r['us']:>10.1f} {bound:>9} {ratio:>8} {pct:>8}{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--num-devices", type=int, default=None, help="GPUs to use (default all), or virtual CPU devices (default 4)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=list(RESOLUTIONS), choices=RESOLUTIONS)
    parser.add_argument("--min-time-s", type=float, default=0.25, help="time spent per measurement")
    parser.add_argument("--output", help="write one JSON line per measurement here")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch intra-op threads on CPU (default 1: one executor thread per virtual device; "
                             "more threads per copy mostly measure contention on a shared host)")
    args = parser.parse_args()

    use_cuda = args.device == "cuda" or (
        args.device == "auto" and ops.backend_info()["build"] == "cuda" and torch.cuda.is_available()
    )
    if use_cuda:
        count = args.num_devices or torch.cuda.device_count()
        devices = [f"cuda:{i}" for i in range(count)]
    else:
        devices = [f"cpu:{i}" for i in range(args.num_devices or 4)]
        torch.set_num_threads(args.cpu_threads)
    b = Bench(devices, args.min_time_s)

    local_bw = b.copy_bandwidth(devices[0], devices[0])
    peer_bw = b.copy_bandwidth(devices[0], devices[1]) if use_cuda and len(devices) > 1 else local_bw
    b.record(dict(op="copy_bandwidth", kind="same_device", gb_per_s=local_bw / 1e9, us=0.0, k_from=1, k_to=1))
    if use_cuda and len(devices) > 1:
        b.record(dict(op="copy_bandwidth", kind="peer", gb_per_s=peer_bw / 1e9, us=0.0, k_from=1, k_to=1))

    bench_comm_creation(b)
    bench_latents(b, args.resolutions, local_bw, peer_bw)
    bench_all_to_all(b, args.resolutions, local_bw, peer_bw)

    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    header = dict(machine=machine_description(devices), torch=torch.__version__, build=ops.backend_info(),
                  devices=devices, created=created, argv=sys.argv[1:])
    if not use_cuda:
        header["cpu_threads"] = args.cpu_threads
    print(f"# {header['machine']} | torch {header['torch']} | build {header['build']['build']}"
          f" | copy bandwidth: same device {local_bw / 1e9:.1f} GB/s"
          + (f", peer {peer_bw / 1e9:.1f} GB/s" if use_cuda and len(devices) > 1 else ""))
    print_table([r for r in b.rows if r["op"] != "copy_bandwidth"])
    if args.output:
        with open(args.output, "w") as f:
            for row in b.rows:
                f.write(json.dumps({"bench": "regroup", **header, **row}) + "\n")
        print(f"wrote {len(b.rows)} lines to {args.output}")


if __name__ == "__main__":
    main()
