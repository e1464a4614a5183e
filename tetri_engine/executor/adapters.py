"""Per-request LoRA on the devices (issue 19): which adapters each device holds loaded (an LRU capped in
bytes), which set is fused into its transformer replica now, and the switch from one set to another, run
by each rank of a steps job on its own thread before the job's first meeting (executor/steps.py).

    loras = LoraDevices(runtime, devices, lora_dir, cache_bytes)
    loras.check("style")                 # admission: ValueError for an adapter not in lora_dir, or one that
                                         # failed to read before (the reason is remembered per file version)
    loras.validate(["style"])            # encode thread: read each new file version once on the CPU
    loras.activate(0, (("style", 0.8),)) # device 0's thread: load what its LRU lacks, fuse the set -> seconds

A job's adapter set is its requests' (`DenoiseState.lora`, one set per job: the scheduler never batches
requests with different sets). A device keeps its set fused after the job (no undo when the next job wants the
same set); a job that wants another set writes it over the weights, and one with no adapters puts the
originals back. Each device has its own replica (CPU virtual devices too: `load_runtime(replica_per_device=
True)`), and only its thread runs jobs on it, so a switch never races a forward: on a GPU the switch is
queued on the thread's stream before the job's steps, which the CUDA graphs replay on the same weights.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Sequence

import torch

from tetri_engine.config import lora_files
from tetri_engine.model.lora import FusedLoras, LoraWeights, layer_shape, read_adapter
from tetri_engine.model.runtime import torch_device

MEASURE_RANK = 16  # the adapter measure_switch_s switches: rank 16 on every attention projection


class DeviceLoras:
    """One device: its adapters loaded (LRU, at most `cache_bytes`) and the set fused into its replica."""

    def __init__(self, name: str, transformer: torch.nn.Module, dtype: torch.dtype, cache_bytes: int):
        self.name, self.device, self.dtype, self.cache_bytes = name, torch_device(name), dtype, cache_bytes
        self.fused = FusedLoras(transformer)
        self.loaded: OrderedDict[str, LoraWeights] = OrderedDict()  # name -> weights, least recently used first
        self.loads = self.evictions = self.switches = 0
        self.switch_s = 0.0

    @property
    def loaded_bytes(self) -> int:
        return sum(w.nbytes for w in self.loaded.values())

    def get(self, name: str, path: str, pipeline_class_name: str) -> LoraWeights:
        weights = self.loaded.pop(name, None)
        if weights is None:
            weights = read_adapter(path, pipeline_class_name, self.fused.layers, self.device, self.dtype, name)
            self.loads += 1
        self.loaded[name] = weights  # most recently used
        return weights

    def evict(self, keep: set[str]) -> None:
        """Least recently used first, until under the cap (never an adapter of `keep`, the set being fused)."""
        for name in list(self.loaded):
            if self.loaded_bytes <= self.cache_bytes:
                return
            if name not in keep:
                del self.loaded[name]
                self.evictions += 1


class LoraDevices:
    """The LoRA side of an executor (see the module docstring). `lora_dir`: where adapters live
    (config.lora_files); `cache_bytes`: loaded adapters kept per device."""

    def __init__(self, runtime: Any, devices: Sequence[str], lora_dir: str, cache_bytes: int):
        self.lora_dir = lora_dir
        self.pipeline_class_name = runtime.adapter.pipeline_class_name
        replicas = [runtime.transformer_on(name) for name in devices]
        if len({id(r) for r in replicas}) != len(replicas):
            raise ValueError("LoRA needs a transformer replica per device: load the runtime with "
                             "replica_per_device=True")
        first = replicas[0]
        dtype = next(p.dtype for p in first.parameters() if p.is_floating_point() and p.element_size() > 1)
        self.devices = [DeviceLoras(name, r, dtype, cache_bytes) for name, r in zip(devices, replicas)]
        self._shapes = {name: layer_shape(m) for name, m in self.devices[0].fused.layers.items()}
        self._checked: dict[tuple, str | None] = {}  # (path, mtime, size) -> why it cannot be used, None: it can
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The adapters of lora_dir, less those known not to fit the model."""
        with self._lock:
            bad = {key[0] for key, error in self._checked.items() if error is not None}
        return [name for name, path in lora_files(self.lora_dir).items() if path not in bad]

    def check(self, name: str) -> str:
        """The file of adapter `name` -> ValueError when there is none, or when it was read before and could not
        be used. Cheap (a directory listing): admission calls it for every request."""
        files = lora_files(self.lora_dir)
        path = files.get(name)
        if path is None:
            listed = ", ".join(list(files)[:20]) + (f" and {len(files) - 20} more" if len(files) > 20 else "")
            listed = listed or "none"
            raise ValueError(f"unknown LoRA adapter {name!r}: the adapters here are {listed}")
        try:
            version = _version(path)
        except OSError as exc:
            raise ValueError(f"LoRA adapter {name!r} cannot be read: {exc}") from None
        with self._lock:
            error = self._checked.get(version)
        if error is not None:
            raise ValueError(f"LoRA adapter {name!r} cannot be used with this model: {error}")
        return path

    def validate(self, names: Sequence[str]) -> None:
        """Read (on the CPU) each adapter whose file version was never read -> ValueError for one that does not fit
        the model. Runs on the encode thread, so a request learns of a bad file before its steps."""
        for name in names:
            path = self.check(name)
            key = _version(path)
            with self._lock:
                if key in self._checked:
                    continue
            try:
                read_adapter(path, self.pipeline_class_name, self._shapes, torch.device("cpu"), torch.float32, name)
                error = None
            except ValueError as exc:
                error = str(exc)
            with self._lock:
                self._checked[key] = error
            if error is not None:
                raise ValueError(f"LoRA adapter {name!r} cannot be used with this model: {error}")

    def activate(self, device_index: int, key: tuple) -> float:
        """On device `device_index`'s thread: fuse the adapter set `key` ((name, scale), ... sorted by name) into
        its replica, loading what its LRU lacks -> seconds spent (0.0: it already held that set)."""
        dev = self.devices[device_index]
        if dev.fused.key == key:
            for name, _ in key:  # still in use: most recently used
                if name in dev.loaded:
                    dev.loaded.move_to_end(name)
            return 0.0
        start = time.perf_counter()
        files = lora_files(self.lora_dir) if key else {}
        adapters = []
        for name, scale in key:
            if name not in files:
                raise ValueError(f"LoRA adapter {name!r} is no longer in {self.lora_dir}")
            adapters.append((dev.get(name, files[name], self.pipeline_class_name), scale))
        needed = sum(w.nbytes for w, _ in adapters)
        if needed > dev.cache_bytes:
            dev.evict(keep=set())
            raise ValueError(f"LoRA adapters {', '.join(n for n, _ in key)} need {needed / 2**20:.3g} MiB, more than "
                             f"the {dev.cache_bytes / 2**20:.3g} MiB of --lora-cache-mb")
        dev.fused.apply(key, adapters)
        dev.evict({name for name, _ in key})
        if dev.device.type == "cuda":  # the time the device took, not the launches
            torch.cuda.current_stream(dev.device).synchronize()
        seconds = time.perf_counter() - start
        dev.switches += 1
        dev.switch_s += seconds
        return seconds

    def measure_switch_s(self, repeats: int = 3) -> float:
        """Seconds a switch from one adapter set to another costs on the first device, its adapters already
        loaded: two random rank-16 adapters on every attention projection, switched `repeats` times (median).
        The cost model's `lora_switch_s`. Leaves the device with no adapter fused."""
        dev = self.devices[0]
        made = [random_adapter(f"measure-{seed}", dev.fused.layers, MEASURE_RANK, dev.device, dev.dtype, seed)
                for seed in (0, 1)]
        times = []
        on_gpu = dev.device.type == "cuda"
        with torch.cuda.device(dev.device) if on_gpu else contextlib.nullcontext():
            for i in range(repeats + 1):
                weights = made[i % 2]
                start = time.perf_counter()
                dev.fused.apply(((weights.name, 1.0),), [(weights, 1.0)])
                if on_gpu:
                    torch.cuda.synchronize(dev.device)
                times.append(time.perf_counter() - start)
            dev.fused.apply((), [])
        times = sorted(times[1:])  # (the first one also copies the originals)
        return times[len(times) // 2]

    def stats(self) -> dict[str, Any]:
        """Per device: adapters loaded (names, MiB), loads, evictions, switches and their seconds, the set fused,
        MiB of original weights kept for undoing."""
        return {d.name: {
            "loaded": list(d.loaded), "loaded_mib": d.loaded_bytes / 2**20, "loads": d.loads,
            "evictions": d.evictions, "switches": d.switches, "switch_s": d.switch_s,
            "fused": [list(pair) for pair in (d.fused.key or ())], "originals_mib": d.fused.originals_nbytes / 2**20,
        } for d in self.devices}


def _version(path: str) -> tuple:
    """A file version: (path, modification time, size). A file replaced in place is read again."""
    st = os.stat(path)
    return path, st.st_mtime_ns, st.st_size


def random_adapter(name: str, layers: dict[str, torch.nn.Module], rank: int, device: torch.device,
                   dtype: torch.dtype, seed: int = 0) -> LoraWeights:
    """A random adapter of `rank` on every attention projection of `layers` (all of them if none is named
    `.attn.`): what measure_switch_s and bench/lora_bench.py switch."""
    gen = torch.Generator().manual_seed(seed)
    chosen = {n: m for n, m in layers.items() if ".attn." in f".{n}"} or layers
    out = {}
    for layer, module in chosen.items():
        down = torch.randn(rank, module.in_features, generator=gen) / module.in_features ** 0.5
        up = torch.randn(module.out_features, rank, generator=gen) * 0.01
        out[layer] = (down.to(device, dtype), up.to(device, dtype))
    return LoraWeights(name, out)
