"""CUDA graphs of one rank's denoising step, so that a step costs one graph launch instead of
thousands of kernel launches through Python.

Why: one process drives every GPU, one executor thread each. A FLUX forward launches ~57 blocks x
dozens of kernels through PyTorch's dispatcher, which holds the GIL, so the threads of a group
serialise their launch work; at 512x512 and below a step is launch-bound, and degree 2 paid about
twice the launch time. A replayed graph launches the whole forward, NCCL exchanges included
(NCCL >= 2.9 captures grouped ncclSend/ncclRecv; the extension issues them on torch's *current*
stream, which during capture is the capture stream), with the GIL released.

What is captured: one whole step of one batch on one rank: `adapter.velocity(...)` (the forward and
the model output of each request), the Euler update of each request's latent shard (its padding kept
zero), written back into the shard's static buffer, and each request's step index + 1. One graph per key

    (model, device, group devices, rank, degree, per request: shard shape, dtype, rows, CFG scale,
     width, height, text tokens, cfg layout)

with static inputs (the latent shards, every tensor of `rank_inputs`: prompt embeddings, pooled
projections, guidance, position ids / embeddings of the shard), and per request its schedule
(timesteps, sigmas: static buffers of SCHEDULE_CAPACITY entries) and its step index `position`
([i, i + 1], device data). A batch's steps copy the latents, schedules and step indices in once
(`Graph.begin`), launch the graph once per step (the executor's native loop launches it with the GIL
released: `Graph.exec_handle`), and copy the latents out once at the end (`Graph.end`): no Python,
allocation or host sync per step.

The timestep and sigmas are read inside the graph from the schedule at `position`, through stand-in
requests (`_StaticRequest`) whose `on(device)["timesteps"]` is that one-element slice, read by
`velocity` at step index 0; `rows` and, with two rows (true CFG), `guidance_scale` are Python numbers
`velocity` uses, so they are part of the key. The Euler update is `flow_match_euler_step` with the
sigma pair at `position`: the same arithmetic as the eager step.

Collectives: NCCL requires that a captured exchange is captured on both sides, and a launched graph
containing one is launched on both sides. So every decision here is taken by the whole group at once
(`segments.graph_for_batch` votes through the job's `RankAgreement`): all ranks replay, or all
capture, or all run eager. Capture, on each rank's device at the same time (thread-local capture mode, so the other threads' CUDA calls
are allowed): 1 eager warm-up step on a side stream (real exchanges: it connects NCCL peers,
allocates cuBLAS workspaces of that stream, builds attention plans and the key index of padded
shards), then the capture on that stream into the device's pool. A rank whose warm-up fails catches
up on the exchanges (`ulysses.catch_up`), and the group runs that batch eagerly. A capture that fails
(an op that cannot be captured, ...) is logged once, remembered, and that key runs eagerly from then
on: a bug here costs speed, not correctness. A rank whose input copy fails still replays (its
peers' exchanges need it) and then reports the failure at the batch's first step, so a failing request
fails alone as in eager mode. Requests whose schedule is longer than SCHEDULE_CAPACITY run eagerly.

An inpainting request's step also blends its kept tokens after the Euler update (model/image_input.py,
`inpaint_blend`) with its shard's image latents, noise and mask held in static buffers of its
`_StaticRequest` (loaded with its schedule) and the next sigma read at `position`; whether a request
inpaints is in the key.

Graphs are never used on CPU devices, nor for steps with the step cache (cache="auto": its forward
decides per step which blocks run).
"""
from __future__ import annotations

import os
import sys
import threading
import traceback
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch

from tetri_engine.model.adapter import flow_match_euler_step
from tetri_engine.model.image_input import inpaint_blend
from tetri_engine.model.ulysses import sequence_parallel

WARMUP_FORWARDS = 1  # eager steps on the capture stream before each capture
DEFAULT_MAX_GRAPHS = 32  # per device; least recently used beyond it are dropped
SCHEDULE_CAPACITY = 1024  # schedule entries (steps) a graph holds; longer schedules run eagerly


def graphs_wanted(cuda_graphs: bool | None, devices: list[torch.device]) -> bool:
    """cuda_graphs None: on for CUDA devices unless TETRI_CUDA_GRAPHS=0; never on CPU devices."""
    if not devices or any(d.type != "cuda" for d in devices):
        return False
    if cuda_graphs is None:
        return os.environ.get("TETRI_CUDA_GRAPHS", "1").lower() not in ("0", "false", "off", "no")
    return bool(cuda_graphs)


def fits(prepared: list[Any]) -> bool:
    """Whether these requests' schedules fit a graph's static buffers."""
    return all(len(p.sigmas) <= SCHEDULE_CAPACITY for p in prepared)


class _StaticRequest:
    """A request as the captured step sees it: its schedule in static device buffers, its step index as
    device data (`position` = [i, i + 1], advanced by the graph), and (while capturing only) the
    request's other attributes."""

    def __init__(self, prepared: Any, device: torch.device, shard_of: tuple[int, int] = (0, 1)):
        self._prepared = prepared
        self._device = str(device)
        self._shard_of = shard_of  # (rank, degree) of the shard in its sequence-parallel group
        # Inpainting (model/image_input.py): the input's latents, noise and mask of the shard, static too.
        edit = getattr(prepared, "edit", None)
        self.kept = tuple(t.clone() for t in edit.shard(device, *shard_of)) if edit is not None and edit.inpaints \
            else None
        schedule = prepared.on(device)
        self.timesteps = torch.zeros(SCHEDULE_CAPACITY, dtype=schedule["timesteps"].dtype, device=device)
        self.sigmas = torch.zeros(SCHEDULE_CAPACITY, dtype=schedule["sigmas"].dtype, device=device)
        self.position = torch.zeros(2, dtype=torch.long, device=device)
        self.rows = prepared.rows
        self.guidance_scale = prepared.guidance_scale
        self._source: weakref.ref | None = None  # the request whose schedule is loaded

    def load(self, prepared: Any, step_index: int) -> None:
        """The request's schedule (when it is another request's) and its step index, into the buffers."""
        if self._source is None or self._source() is not prepared:
            schedule = prepared.on(torch.device(self._device))
            self.timesteps[:len(schedule["timesteps"])].copy_(schedule["timesteps"])
            self.sigmas[:len(schedule["sigmas"])].copy_(schedule["sigmas"])
            if self.kept is not None:
                for static, source in zip(self.kept, prepared.edit.shard(torch.device(self._device), *self._shard_of)):
                    static.copy_(source)
            self._source = weakref.ref(prepared)
        self.position[0].fill_(step_index)  # (fills from host numbers: no sync)
        self.position[1].fill_(step_index + 1)

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if str(device) != self._device:
            raise RuntimeError(f"a graph of {self._device} asked for inputs on {device}")
        return {"timesteps": self.timesteps.index_select(0, self.position[:1])}  # read at index 0

    def sigma_pair(self) -> torch.Tensor:
        """[sigma_i, sigma_i+1]: `flow_match_euler_step(..., pair, 0)` is the update at step i."""
        return self.sigmas.index_select(0, self.position)

    def __getattr__(self, name: str) -> Any:  # other attributes (seed, sizes, ...) during capture only
        prepared = self.__dict__.get("_prepared")
        if prepared is None:
            raise AttributeError(name)
        return getattr(prepared, name)

    def release(self) -> None:
        self._prepared = None  # the graph outlives the request: keep none of its tensors


class Graph:
    """One captured step and its static buffers. `valid`: real (not padding) tokens of the shards."""

    def __init__(self, key: tuple, device: torch.device, latents: list[torch.Tensor],
                 requests: list[_StaticRequest], inputs: dict[str, torch.Tensor], valid: int):
        self.key = key
        self.device = device
        self.latents = latents
        self.requests = requests
        self.inputs = inputs
        self.valid = valid
        self.sources: dict[str, torch.Tensor] = {}  # the tensors last copied into `inputs`
        self.graph: torch.cuda.CUDAGraph | None = None
        self.exchanges: list = []  # the exchange log of one step (what a launch does)
        self.keepalive: list = []  # tensors and objects the graph's kernels point into
        self.exec_handle = 0  # the cudaGraphExec_t the native loop launches (0: replay from Python)
        self.replays = 0  # launches, from Python or from the native loop
        self.native_launches = 0

    def step(self, adapter: Any, transformer: torch.nn.Module, context: Any) -> None:
        """One whole step on the static buffers (warm-up and capture run exactly this)."""
        with sequence_parallel(context):
            velocities = adapter.velocity(transformer, self.latents, self.requests, [0] * len(self.requests),
                                          self.inputs)
        for latent, request, velocity in zip(self.latents, self.requests, velocities):
            sigma_pair = request.sigma_pair()
            new = flow_match_euler_step(latent, velocity, sigma_pair, 0)
            if request.kept is not None:  # inpainting: the kept tokens follow the input's noised latents
                new = inpaint_blend(new, *request.kept, sigma_pair[1])
            if self.valid < latent.shape[1]:
                new[:, self.valid:] = 0  # padding stays zero, as ops.shard made it
            latent.copy_(new)
            request.position.add_(1)

    def begin(self, shards: list[torch.Tensor], prepared: list[Any], step_indices: list[int],
              inputs: dict[str, torch.Tensor]) -> None:
        """Copy a batch's latents, schedules and step indices in (the `rank_inputs` tensors only when
        they are new objects). Once per batch; then `launch`/the native loop, then `end`."""
        for static, shard in zip(self.latents, shards):
            static.copy_(shard)
        for request, p, i in zip(self.requests, prepared, step_indices):
            request.load(p, i)
        for name, static in self.inputs.items():
            source = inputs[name]
            if self.sources.get(name) is not source:  # unchanged while the batch is (held: no id reuse)
                static.copy_(source)
                self.sources[name] = source

    def replay(self) -> None:
        """One step, launched from Python."""
        self.graph.replay()
        self.replays += 1

    def end(self) -> list[torch.Tensor]:
        """The latents after the steps launched since `begin` (new tensors)."""
        return [latent.clone() for latent in self.latents]


class _DeviceGraphs:
    """The graphs of one device: used only by that device's executor thread; changed under
    `CudaGraphs._lock` (stats() reads them from any thread)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(device):
            self.stream = torch.cuda.Stream(device)
        self.graphs: OrderedDict[tuple, Graph] = OrderedDict()
        self.failed: dict[tuple, str] = {}
        # Graph objects whose capture failed, kept: torch's allocator may still hold a callback that
        # points at one (when capture_end raised before releasing the pool), so it must stay valid.
        self.failed_graphs: list[torch.cuda.CUDAGraph] = []


class CudaGraphs:
    """The executor's graphs, per device (see the module docstring). Thread-safe across devices."""

    def __init__(self, max_graphs: int = DEFAULT_MAX_GRAPHS, warmup: int = WARMUP_FORWARDS,
                 log: Callable[[str], None] | None = None):
        self.max_graphs = max(1, int(max_graphs))
        self.warmup = max(1, int(warmup))
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._devices: dict[str, _DeviceGraphs] = {}
        self._lock = threading.Lock()
        self._stats = {"captures": 0, "replays": 0, "native_launches": 0, "evictions": 0, "warmup_failures": 0,
                       "capture_failures": 0, "capture_s": 0.0}
        self._failures: list[dict] = []  # {"key", "device", "error"}: capture failures, once per key

    # -- bookkeeping
    def _device(self, device: torch.device) -> _DeviceGraphs:
        with self._lock:
            if str(device) not in self._devices:
                self._devices[str(device)] = _DeviceGraphs(device)
            return self._devices[str(device)]

    def _count(self, name: str, n: float = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def stats(self) -> dict:
        """captures, replays (native_launches of them launched by the native loop), evictions,
        warmup_failures, capture_failures, capture_s, graphs (held now), failures: [{"key", "device",
        "error"}] of the captures that failed (those keys run eagerly)."""
        with self._lock:
            held = [g for d in self._devices.values() for g in list(d.graphs.values())]
            return {**self._stats, "replays": self._stats["replays"] + sum(g.replays for g in held),
                    "native_launches": self._stats["native_launches"] + sum(g.native_launches for g in held),
                    "graphs": sum(len(d.graphs) for d in self._devices.values()),
                    "failures": [dict(f) for f in self._failures]}

    @staticmethod
    def key(model: str, device: torch.device, group: tuple[str, ...], rank: int, shards: list[torch.Tensor],
            prepared: list[Any], cfg: int = 1) -> tuple:
        first = prepared[0]
        per_request = tuple((tuple(s.shape), str(s.dtype), p.rows, p.guidance_scale if p.rows > 1 else None,
                             getattr(p, "edit", None) is not None and p.edit.inpaints)
                            for s, p in zip(shards, prepared))
        return (model, str(device), tuple(group), rank, len(group), per_request, first.width, first.height,
                first.text_tokens, cfg)

    def status(self, device: torch.device, key: tuple, comms: tuple) -> str:
        """"ready" (a graph to replay), "failed" (its capture failed: eager) or "missing". comms: the
        communicators the step exchanges over (Ulysses, guidance twins; None where unused)."""
        dev = self._device(device)
        if key in dev.failed:
            return "failed"
        graph = dev.graphs.get(key)
        if graph is None or any(c is not None and c is not kept for c, kept in zip(comms, graph.keepalive[0])):
            return "missing"  # (a graph of an evicted communicator is recaptured on the new one)
        return "ready"

    def get(self, device: torch.device, key: tuple) -> Graph:
        dev = self._device(device)
        with self._lock:
            dev.graphs.move_to_end(key)
            return dev.graphs[key]

    # -- capture, in two halves with a group vote between them (segments.graph_for_batch)
    def prepare(self, device: torch.device, key: tuple, shards: list[torch.Tensor], prepared: list[Any],
                inputs: dict[str, torch.Tensor], valid: int, shard_of: tuple[int, int] = (0, 1)) -> Graph:
        """Static buffers for a new graph of `key` (any old one is dropped first, freeing its memory).
        valid: real tokens of each shard (the rest is padding); shard_of: (rank, degree) of the shards in
        their sequence-parallel group."""
        dev = self._device(device)
        with self._lock:
            dev.graphs.pop(key, None)
        # Allocated on the thread's own stream with the ordinary allocator: outside the graph pool.
        latents = [s.clone() for s in shards]
        requests = [_StaticRequest(p, device, shard_of) for p in prepared]
        static_inputs = {name: t.clone() for name, t in inputs.items()}
        graph = Graph(key, device, latents, requests, static_inputs, valid)
        graph.sources = dict(inputs)
        return graph

    def warm_up(self, graph: Graph, adapter: Any, transformer: torch.nn.Module, context: Any,
                dtype: torch.dtype) -> tuple[str | None, int]:
        """Eager steps on the capture stream -> (first error or None, exchanges done). A failed step
        catches up with the group's exchanges, so every rank does the same number of them. (They move
        the static buffers; `Graph.begin` loads them before the graph runs.)"""
        dev = self._device(graph.device)
        current = torch.cuda.current_stream(graph.device)
        dev.stream.wait_stream(current)
        error, exchanges = None, 0
        with torch.cuda.stream(dev.stream):
            for _ in range(self.warmup):
                context.exchange_log = []
                try:
                    graph.step(adapter, transformer, context)
                except Exception as exc:
                    error = error or _describe(exc)
                    if context.degree > 1 or context.cfg_degree > 1:
                        try:
                            adapter.catch_up(context, graph.requests, dtype, graph.device)
                        except Exception as exc2:
                            error += f" (and catching up with the group failed: {_describe(exc2)})"
                exchanges += len(context.exchange_log)
        current.wait_stream(dev.stream)
        context.exchange_log = []
        if error is not None:
            self._count("warmup_failures")
        return error, exchanges

    def capture(self, graph: Graph, adapter: Any, transformer: torch.nn.Module, context: Any) -> str | None:
        """Capture the step on this rank -> None, or the error (the key then runs eagerly)."""
        import time

        dev = self._device(graph.device)
        start = time.perf_counter()
        cuda_graph = torch.cuda.CUDAGraph()
        context.exchange_log = []
        error = None
        current = torch.cuda.current_stream(graph.device)
        dev.stream.wait_stream(current)
        with torch.cuda.stream(dev.stream):
            # Not `with torch.cuda.graph(...)`: its entry synchronises and empties the allocator cache
            # of every device, while the other executor threads are running (or capturing) there.
            try:
                cuda_graph.capture_begin(pool=dev.pool, capture_error_mode="thread_local")
            except Exception as exc:
                error = f"capture_begin: {_describe(exc)}"
            if error is None:
                try:
                    graph.step(adapter, transformer, context)
                except Exception as exc:
                    error = _describe(exc)
                    if os.environ.get("TETRI_CUDA_GRAPHS_DEBUG"):
                        traceback.print_exc()
                try:  # always end the capture, or the stream stays in capture mode
                    cuda_graph.capture_end()
                except Exception as exc:
                    error = error or f"capture_end: {_describe(exc)}"
                    _release_pool(graph.device, dev.pool)
                    _reset_generator(graph.device)
        current.wait_stream(dev.stream)
        exchanges, context.exchange_log = list(context.exchange_log), []
        for request in graph.requests:
            request.release()
        if error is not None:
            dev.failed_graphs.append(cuda_graph)
            return error
        graph.graph = cuda_graph
        graph.exec_handle = _exec_handle(cuda_graph)
        graph.exchanges = exchanges
        # The communicator (NCCL handles in the graph) and the key index of padded shards (made during
        # the warm-up, read by index_select in the graph) must live as long as the graph.
        graph.keepalive = [(context.comm, context.cfg_comm), dict(context._key_index)]
        self._count("captures")
        self._count("capture_s", time.perf_counter() - start)
        return None

    def store(self, graph: Graph) -> None:
        dev = self._device(graph.device)
        with self._lock:
            dev.graphs[graph.key] = graph
            dev.graphs.move_to_end(graph.key)
            while len(dev.graphs) > self.max_graphs:
                _, old = dev.graphs.popitem(last=False)
                self._stats["replays"] += old.replays
                self._stats["native_launches"] += old.native_launches
                self._stats["evictions"] += 1

    def mark_failed(self, device: torch.device, key: tuple, error: str) -> None:
        """Remember a failed capture: the key runs eagerly from now on. Logged once per key."""
        dev = self._device(device)
        with self._lock:
            dev.graphs.pop(key, None)
            if key in dev.failed:
                return
            dev.failed[key] = error
            self._stats["capture_failures"] += 1
            self._failures.append({"key": repr(key), "device": str(device), "error": error})
        self._log(f"tetri-engine: CUDA graph capture failed on {device} for {key}; running that key eagerly: "
                  f"{error}")


def _release_pool(device: torch.device, pool: Any) -> None:
    """After a capture_end that raised: stop routing this device's allocations to the graph pool (torch
    checks cudaStreamEndCapture before it does that itself). Best effort: a private torch API."""
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if end is None:
        return
    try:
        end(device.index, pool)
    except Exception:  # already released, or a torch without this signature: nothing more to do
        pass


def _reset_generator(device: torch.device) -> None:
    """After a capture_end that raised: torch runs the default generator's capture epilogue only on
    success, so the generator stays in capture mode and every later random op on this device fails
    ("Offset increment outside graph capture"; seen on an H200 after a failed capture). A clone of its
    state (same seed and offset, not capturing) takes its place."""
    try:
        generator = torch.cuda.default_generators[device.index]
        generator.graphsafe_set_state(generator.clone_state())
    except (AttributeError, RuntimeError, IndexError):  # a torch without these: nothing more to do
        pass


def _exec_handle(cuda_graph: torch.cuda.CUDAGraph) -> int:
    """The graph's cudaGraphExec_t for a launch from C++ (torch's replay() is that launch, plus RNG
    bookkeeping a step does not use: it draws no random numbers), or 0 where this torch does not give
    it (the step is then replayed from Python)."""
    try:
        return int(cuda_graph.raw_cuda_graph_exec())
    except (AttributeError, RuntimeError):
        return 0


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
