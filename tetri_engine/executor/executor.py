"""The Executor the engine drives: one worker thread per device, the per-request denoising state, and
the jobs (encode, steps, decode, preview) that the engine submits and awaits as
`concurrent.futures.Future`s. It owns the loaded model (`Executor.load`): the engine knows the model
only through `Executor.model` (ModelInfo) and the jobs.

Threads never touch an asyncio loop. Every call that may wait on other ranks (collectives, barriers,
events) releases the GIL, so the threads of a group run together.

Ordering, and why it cannot deadlock: a job is queued on all of its devices' threads at once, under
one lock, so every thread sees jobs in one global submission order; a job waits only for its own
group's ranks and for *earlier* jobs on the same requests. The earliest unfinished job can therefore
always run to the end.

Worked example with devices ["cuda:0", "cuda:1", "cuda:2", "cuda:3"] (indices 0..3):

    submit_encode("a", ...)                      encode thread: prompt embeddings made on cuda:0, kept in
                                                 host memory (latents.py says why), noise on CPU
    submit_steps(["a"], (2, 3), 5)               threads 2 and 3: shard the noise onto cuda:2/cuda:3, 5 steps
    submit_steps(["a"], (0, 1, 2, 3), 5)         threads 0..3: regroup 2 -> 4 shards once the first job is
                                                 done (rank 0 = cuda:0 does it), 5 steps at degree 4
    submit_steps(["a"], (2,), 40, decode_after=True)   regroup 4 -> 1 onto cuda:2, 40 steps, decode there

and, for a request with true classifier-free guidance (SD3, guidance > 1), other layouts (issue 16):

    submit_steps(["b"], (0, 1), 5, cfg=2)        the uncond branch on cuda:0, the cond branch on cuda:1,
                                                 each over the whole latent; one exchange per step
    submit_steps(["b"], (0, 1, 2, 3), 45, cfg=2, decode_after=True, decode_degree=4)
                                                 branches on (0, 1) and (2, 3), Ulysses within each;
                                                 then a patch-parallel decode on all four
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import queue
import random
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import torch

from tetri_engine.executor.cuda_graphs import DEFAULT_MAX_GRAPHS, CudaGraphs, graphs_wanted
from tetri_engine.executor.decode import DecodeJob
from tetri_engine.executor.latents import LatentPlacer, conditioning_to_host
from tetri_engine.executor.options import StepEnv, StepOptions
from tetri_engine.executor.state import (DenoiseState, EncodeResult, ModelInfo, RequestProgress, StepsResult,
                                         describe_error)
from tetri_engine.executor.steps import StepsJob
from tetri_engine.model.image_input import prepare_edit
from tetri_engine.model.runtime import ModelRuntime, torch_device
from tetri_engine.model.ulysses import check_heads
from tetri_engine.request import CacheMode

EXIT_JOIN_S = 30.0  # at interpreter exit, how long to wait for the threads (one step each, at most)


def _shutdown_at_exit(executor_ref: weakref.ref) -> None:
    """atexit hook of an Executor that was not shut down (holds it weakly: the hook keeps nothing alive)."""
    executor = executor_ref()
    if executor is not None:
        executor._shutdown_at_exit()


class _Worker(threading.Thread):
    """Runs the tasks queued for one device (or the text encoder), one at a time, in order."""

    def __init__(self, name: str, device: torch.device):
        # Daemon: a program that never calls shutdown() must still be able to exit (the atexit hook
        # stops these threads first; see Executor._shutdown_at_exit).
        super().__init__(name=name, daemon=True)
        self.device = device
        self.tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()

    def run(self) -> None:
        torch.set_grad_enabled(False)  # grad mode is per thread
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # this thread's kernels go to its device's stream
        while True:
            task = self.tasks.get()
            if task is None:
                return
            try:
                task()
            except BaseException:  # tasks report their own errors; the thread must survive anything
                import traceback

                traceback.print_exc()


class Executor:
    """Runs denoising steps of requests on groups of devices.

    devices: the device names of `runtime` this executor drives (default: all); `device_indices` in
    every call index this list. comm_cache: an `ops.CommCache` (a new one by default).
    log_errors: print the traceback of a failed step (the request's error carries the message).
    cache_plan: the `model.step_cache.CachePlan` of requests with cache="auto" (default: the model's
    saved plan, `step_cache.load_plan(runtime.name)`, else the default plan; read on first use).
    cuda_graphs: launch each batch's step as a CUDA graph (executor/cuda_graphs.py); None: on for
    CUDA devices unless the environment sets TETRI_CUDA_GRAPHS=0; never on CPU devices. max_graphs:
    graphs kept per device (least recently used beyond it are dropped). step_options: how the ranks
    run their steps (`StepOptions`; default: `StepOptions.from_env()`, the native loop). loras: an
    `adapters.LoraDevices` when requests may name LoRA adapters (`load(lora_dir=...)` makes one).
    """

    def __init__(self, runtime: ModelRuntime, devices: Sequence[str] | None = None, comm_cache: Any = None,
                 log_errors: bool = False, cache_plan: Any = None, cuda_graphs: bool | None = None,
                 max_graphs: int = DEFAULT_MAX_GRAPHS, step_options: StepOptions | None = None, loras: Any = None):
        from tetri_engine import ops

        self.runtime = runtime
        self.model = ModelInfo(dtype=runtime.precision, num_heads=runtime.num_heads,
                               default_steps=runtime.default_steps, default_guidance=runtime.default_guidance,
                               size_rule=runtime.size_rule, compiled=runtime.compiled is not None,
                               attention=runtime.attention.backend if runtime.attention else "sdpa",
                               parallel_methods=runtime.parallel_methods,
                               cfg_guidance_above=runtime.adapter.cfg_guidance_above)
        self.devices = list(devices or runtime.devices)
        unknown = [d for d in self.devices if d not in runtime.devices]
        if unknown:
            raise ValueError(f"devices {unknown} are not among the runtime's devices {runtime.devices}")
        self.comm_cache = comm_cache if comm_cache is not None else ops.CommCache()
        self.log_errors = log_errors
        self._cache_plan = cache_plan
        self._torch_devices = [torch_device(d) for d in self.devices]
        self.graphs = CudaGraphs(max_graphs) if graphs_wanted(cuda_graphs, self._torch_devices) else None
        self.step_options = step_options if step_options is not None else StepOptions.from_env()
        self.latents = LatentPlacer(runtime, self.devices, self.step_options.private_reads)
        self._states: dict[str, DenoiseState] = {}
        self._lock = threading.Lock()  # states, and queuing a job on all of its threads at once
        self._closed = False
        # Set at interpreter exit without shutdown(): every steps job stops at its next step boundary.
        self.exiting = ops.StopFlag()
        self.loras = loras
        self._env = StepEnv(runtime=runtime, devices=self.devices, torch_devices=self._torch_devices,
                            comm_cache=self.comm_cache, graphs=self.graphs, latents=self.latents,
                            exiting=self.exiting, options=self.step_options, log_errors=log_errors, loras=loras)
        self._workers = [_Worker(f"tetri-{d}", td) for d, td in zip(self.devices, self._torch_devices)]
        self._encoder = _Worker("tetri-encode", runtime.encode_device)
        self._encode_stream = None  # created on first use by the encoder thread (CUDA only)
        for worker in (*self._workers, self._encoder):
            worker.start()
        # A daemon thread still inside a C++ call (a collective, a torch op) when the interpreter
        # finalises is killed by a forced unwind, and the process dies with "terminate called
        # without an active exception". So at exit, stop the threads while Python is still whole.
        self._atexit = functools.partial(_shutdown_at_exit, weakref.ref(self))
        atexit.register(self._atexit)

    @classmethod
    def load(cls, model: str, devices: Sequence[str], *, dtype: str = "auto", comm_cache_size: int = 64,
             cuda_graphs: bool | None = None, step_options: StepOptions | None = None,
             lora_dir: str | None = None, lora_cache_mb: int = 2048, **model_options: Any) -> Executor:
        """Load `model` (a preset or a local diffusers directory: `model.load_runtime`, which takes
        `model_options`: attention, ulysses_chunks, compile, cache_dir) on `devices` and start an
        executor there, with a communicator cache of `comm_cache_size` groups and `step_options`;
        with `lora_dir`, requests may name its LoRA adapters (`lora_cache_mb` of them loaded per device)."""
        from tetri_engine import ops
        from tetri_engine.executor.adapters import LoraDevices
        from tetri_engine.model import load_runtime

        runtime = load_runtime(model, devices=list(devices), dtype=dtype, replica_per_device=lora_dir is not None,
                               **model_options)
        loras = LoraDevices(runtime, devices, lora_dir, lora_cache_mb << 20) if lora_dir is not None else None
        return cls(runtime, devices, ops.CommCache(capacity=comm_cache_size), cuda_graphs=cuda_graphs,
                   step_options=step_options, loras=loras)

    @staticmethod
    def visible_devices(num_cpu_devices: int) -> list[str]:
        """Every visible GPU ("cuda:N"), else `num_cpu_devices` virtual CPU devices ("cpu:N")."""
        num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if num_gpus:
            return [f"cuda:{i}" for i in range(num_gpus)]
        return [f"cpu:{i}" for i in range(num_cpu_devices)]

    def cache_plan(self):
        """The plan of requests with cache="auto" (see the class docstring)."""
        from tetri_engine.model.step_cache import load_plan

        if self._cache_plan is None:
            self._cache_plan = load_plan(self.runtime.name)
        return self._cache_plan

    # -- the interface
    @contextlib.contextmanager
    def _encode_stream_context(self):
        """Encode on a stream of its own. On the legacy default stream, the encoder thread's work
        would implicitly synchronise with a CUDA graph that a worker thread is capturing on the same
        device, which invalidates the capture ("operation not permitted when stream is capturing")."""
        device = self.runtime.encode_device
        if device.type != "cuda":
            yield None
            return
        if self._encode_stream is None:
            self._encode_stream = torch.cuda.Stream(device)  # pool streams are non-blocking
        with torch.cuda.stream(self._encode_stream):
            yield self._encode_stream

    def submit_encode(self, request_id: str, request: Any) -> Future[EncodeResult]:
        """Prompt embeddings and seeded noise for `request` (a GenerationRequest), held here.

        Resolves to an EncodeResult (the seed, drawn at random when the request gave none); raises
        ValueError (through the future) for an invalid request. request.cache "auto" caches its steps
        (model/step_cache.py) with `cache_plan()`; "off" (or no such attribute) runs every block.
        """
        seed = request.seed if request.seed is not None else random.randrange(2**63)
        state = DenoiseState(request_id=request_id, prompt=request.prompt, width=int(request.width),
                             height=int(request.height), seed=int(seed), lora=self._lora_key(request))
        future: Future[EncodeResult] = Future()
        # A steps job submitted before the encode ends swaps state.idle for its own event and waits
        # on this one: set this one, not whichever is current when the encode finishes.
        encoded = state.idle

        def encode() -> None:
            start = time.perf_counter()
            try:
                if state.lora:  # a file that does not fit the model fails here, not in a group
                    self.loras.validate([name for name, _ in state.lora])
                if CacheMode.parse(getattr(request, "cache", None) or CacheMode.OFF, "cache") is CacheMode.AUTO:
                    from tetri_engine.model.step_cache import StepCache

                    state.cache = StepCache(self.cache_plan())
                with self._encode_stream_context() as stream:
                    prepared = self.runtime.prepare(
                        prompt=request.prompt, width=state.width, height=state.height, seed=state.seed,
                        num_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                        negative_prompt=request.negative_prompt)
                    if getattr(request, "image", None) is not None:  # an edit (model/image_input.py)
                        prepared = prepare_edit(self.runtime, prepared, request.image, request.mask,
                                                request.strength)
                    if self.step_options.host_conditioning:  # off the encode device (latents.py says why)
                        conditioning_to_host(prepared)
                    if stream is not None:
                        stream.synchronize()
                    state.prepared = prepared
                state.encode_s = time.perf_counter() - start
                future.set_result(EncodeResult(request_id, state.seed, state.prepared.num_steps,
                                               state.prepared.image_tokens, state.encode_s))
            except Exception as exc:
                state.error = f"encode failed: {describe_error(exc)}"
                future.set_exception(exc)
            finally:
                encoded.set()

        with self._lock:
            self._check_open()
            if request_id in self._states:
                raise ValueError(f"request {request_id!r} is already held by the executor")
            self._states[request_id] = state
            self._encoder.tasks.put(encode)
        return future

    def _lora_key(self, request: Any) -> tuple:
        """A request's LoRA set as a job's key: ((name, scale), ...) in its order (admission sorts by name)."""
        refs = tuple(getattr(request, "lora", None) or ())
        if refs and self.loras is None:
            raise ValueError("this engine serves no LoRA adapters (start it with a lora_dir)")
        return tuple((ref.name, float(ref.scale)) for ref in refs)

    def submit_steps(self, request_ids: Sequence[str], device_indices: Sequence[int], num_steps: int,
                     on_step: Callable[[str, int], None] | None = None,
                     decode_after: bool = False, *, cfg: int = 1, decode_degree: int = 1) -> Future[StepsResult]:
        """Run `num_steps` steps of the requests on the devices `device_indices` (rank order).

        The latents move onto these devices first when they are elsewhere. Several requests (same
        size) run as one batched forward. A request with fewer steps left stops early. on_step(
        request_id, step) is called on a worker thread after each step (step = steps done in total).
        decode_after: decode each request that finished, on the first `decode_degree` devices of the
        group (patch-parallel when > 1). cfg: 2 runs each request's two guidance branches side by side,
        branch c on device_indices[c * k/2:(c + 1) * k/2] (requests with true CFG only, no step cache).
        Resolves to a StepsResult; a failed request carries its error there and does not disturb the
        others (or the threads). Raises ValueError at once for a call that cannot run (unknown request,
        bad devices, heads not divisible by the sequence-parallel degree, a layout the model lacks).
        """
        request_ids = list(request_ids)
        device_indices = tuple(int(i) for i in device_indices)
        if not request_ids or len(set(request_ids)) != len(request_ids):
            raise ValueError(f"request_ids must be distinct and non-empty, got {request_ids}")
        if not device_indices or len(set(device_indices)) != len(device_indices):
            raise ValueError(f"device_indices must be distinct and non-empty, got {device_indices}")
        if any(not 0 <= i < len(self.devices) for i in device_indices):
            raise ValueError(f"device_indices {device_indices} out of range for {len(self.devices)} devices")
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        self._check_layout(len(device_indices), cfg, decode_degree if decode_after else 1)
        with self._lock:
            self._check_open()
            states = [self._state(rid) for rid in request_ids]
            if len({s.lora for s in states}) > 1:
                raise ValueError(f"requests with different LoRA adapter sets cannot run as one batch: {request_ids}")
            wait_for = [s.idle for s in states]
            release = []
            for s in states:
                s.idle = threading.Event()
                release.append(s.idle)
            job = StepsJob(self._env, states, device_indices, int(num_steps), on_step, decode_after, wait_for, release,
                           cfg=cfg, decode_degree=decode_degree if decode_after else 1)
            for rank, index in enumerate(device_indices):
                self._workers[index].tasks.put(lambda rank=rank: job.run(rank))
        return job.future

    def submit_decode(self, request_id: str, device_index: int | Sequence[int]) -> Future[tuple[Any, bytes]]:
        """Gather the request's latent onto `device_index` and decode it there -> (PIL image, PNG bytes);
        several device indices: decode it patch-parallel on them (executor/decode.py)."""
        if not isinstance(device_index, int):
            return self._submit_parallel_decode(request_id, tuple(int(i) for i in device_index))

        def decode(state: DenoiseState) -> tuple[Any, bytes]:
            start = time.perf_counter()
            result = self.latents.decode(state, device_index)
            state.decode_s += time.perf_counter() - start
            return result

        return self._submit_after(request_id, device_index, decode)

    def _submit_parallel_decode(self, request_id: str, device_indices: tuple[int, ...]) -> Future:
        if len(device_indices) == 1:
            return self.submit_decode(request_id, device_indices[0])
        if len(set(device_indices)) != len(device_indices) or any(not 0 <= i < len(self.devices) for i in device_indices):
            raise ValueError(f"device_indices {device_indices} must be distinct, out of {len(self.devices)} devices")
        self._check_layout(len(device_indices), 1, len(device_indices), steps=False)
        with self._lock:
            self._check_open()
            state = self._state(request_id)
            wait_for, state.idle = state.idle, threading.Event()
            job = DecodeJob(self._env, state, device_indices, wait_for, state.idle)
            for rank, index in enumerate(device_indices):
                self._workers[index].tasks.put(lambda rank=rank: job.run(rank))
        return job.future

    def _check_layout(self, degree: int, cfg: int, decode_degree: int, steps: bool = True) -> None:
        """ValueError for a parallel layout this model cannot run on `degree` devices."""
        methods = self.runtime.parallel_methods
        if cfg not in (1, 2) or degree % cfg or (cfg > 1 and "cfg" not in methods):
            raise ValueError(f"cfg={cfg} on {degree} devices: this model offers CFG parallel "
                             f"{'on an even number of devices' if 'cfg' in methods else 'not at all'} (cfg 1 or 2)")
        if not 1 <= decode_degree <= degree or (decode_degree > 1 and "patch_vae" not in methods):
            raise ValueError(f"decode_degree={decode_degree} on {degree} devices: this model offers "
                             f"{'1..%d' % degree if 'patch_vae' in methods else 'one-device decodes only'}")
        if steps:
            check_heads(self.runtime.num_heads, degree // cfg)

    def submit_preview(self, request_id: str) -> Future[Any]:
        """A low-cost preview of the request's latent (PIL, width/8 x height/8, no VAE: `runtime.preview`)
        once its submitted work is done; made on the thread of the first device holding it, so the loop
        that asks never waits, and its next steps wait for the preview (it shows this boundary)."""
        with self._lock:
            placement = self._state(request_id).placement
        return self._submit_after(request_id, placement[0] if placement else 0, self.latents.preview)

    def _submit_after(self, request_id: str, device_index: int, work: Callable[[DenoiseState], Any]) -> Future:
        """Run `work(state)` on `device_index`'s thread after the request's earlier jobs, before later ones."""
        if not 0 <= device_index < len(self.devices):
            raise ValueError(f"device_index {device_index} out of range for {len(self.devices)} devices")
        future: Future = Future()
        with self._lock:
            self._check_open()
            state = self._state(request_id)
            wait_for, state.idle = state.idle, threading.Event()
            release = state.idle

            def task() -> None:
                wait_for.wait()
                try:
                    if state.prepared is None:
                        raise RuntimeError(state.error or "the request has no prompt encoding")
                    future.set_result(work(state))
                except Exception as exc:
                    future.set_exception(exc)
                finally:
                    release.set()

            self._workers[device_index].tasks.put(task)
        return future

    def cancel(self, request_id: str) -> bool:
        """Stop a request's steps at the next step boundary, for good.

        Its running `submit_steps` call (if any) stops it after the step in progress, on every rank of
        the group at the same step, and resolves with the steps it did, `cancelled=True` and error
        "cancelled" for it; batch-mates go on, and a call with every request cancelled ends at once.
        Later calls do no steps for it (a decode is still possible). A request cancelled after its last
        step is reported as finished, unless the call would decode it. Returns False for an unknown or
        released request id."""
        with self._lock:
            state = self._states.get(request_id)
        if state is None:
            return False
        state.stop.set()  # read by rank 0 of its job at each step boundary (csrc/step_loop.cpp, segments.py)
        return True

    def graph_stats(self) -> dict[str, Any]:
        """{"enabled": bool, ...`CudaGraphs.stats()`}: captures, replays, failures (key, device, error) ..."""
        if self.graphs is None:
            return {"enabled": False}
        return {"enabled": True, **self.graphs.stats()}

    def placement(self, request_id: str) -> tuple[int, ...] | None:
        """Device indices holding the request's latent (rank order), None before its first steps."""
        with self._lock:
            state = self._states.get(request_id)
        return None if state is None else state.placement

    def progress(self, request_id: str) -> RequestProgress | None:
        """What the executor did for the request so far (None: unknown or released)."""
        with self._lock:
            state = self._states.get(request_id)
            return None if state is None else state.progress()

    def warm_up(self, groups: Sequence[Sequence[int]]) -> None:
        """Create the communicators of these groups of device indices now rather than in a round."""
        names = [tuple(self.devices[i] for i in group) for group in groups]
        if names:
            self.comm_cache.warmup(names)

    def compiling(self):
        """Context in which a compiled model may compile shapes it has not compiled yet (start-up
        warm-up, profile measurement); outside it such shapes run eagerly (model/compile.py)."""
        return self.runtime.compiling()

    def warm_up_shapes(self, shapes: Sequence[Any], log: Callable[[str], None] | None = None) -> Any:
        """Compile (and capture the CUDA graphs of) these `warmup.WarmupShape`s now, one step each,
        rather than in a request -> `warmup.WarmupReport` (executor/warmup.py)."""
        from tetri_engine.executor.warmup import warm_up_shapes

        return warm_up_shapes(self, shapes, log)

    def comm_stats(self) -> dict[str, Any]:
        """The communicator cache's counters (`ops.CommCache.stats()`)."""
        return self.comm_cache.stats()

    def request_stats(self, request_id: str) -> dict[str, Any]:
        """steps_at_degree, regroups, peak_memory_bytes (GPU only; 0 on CPU), seed, step, ... of a request."""
        with self._lock:
            return self._state(request_id).stats()

    def prepared(self, request_id: str):
        """The request's PreparedRequest (prompt embeddings, noise, schedule), None until encoded."""
        with self._lock:
            return self._state(request_id).prepared

    def latent(self, request_id: str, timeout_s: float | None = None) -> torch.Tensor:
        """The request's whole latent [1, L, C] on the CPU, once its submitted work is done."""
        with self._lock:
            state = self._state(request_id)
            idle = state.idle
        if not idle.wait(timeout_s):
            raise TimeoutError(f"request {request_id!r} is still busy")
        return self.latents.whole_latent(state, "cpu:0")

    def release(self, request_id: str) -> None:
        """Forget a request (its latent is freed once no queued job uses it). Unknown ids are ignored."""
        with self._lock:
            self._states.pop(request_id, None)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the threads after the jobs already queued."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for worker in (*self._workers, self._encoder):
                worker.tasks.put(None)
        atexit.unregister(self._atexit)
        if wait:
            for worker in (*self._workers, self._encoder):
                worker.join()

    def _shutdown_at_exit(self) -> None:
        """The interpreter is exiting without shutdown(): cut running and queued steps short at the
        next step boundary (all ranks agree, so no collective is left waiting) and join the threads."""
        self.exiting.set()
        self.shutdown(wait=False)
        deadline = time.monotonic() + EXIT_JOIN_S
        for worker in (*self._workers, self._encoder):
            worker.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _state(self, request_id: str) -> DenoiseState:
        state = self._states.get(request_id)
        if state is None:
            raise ValueError(f"unknown request {request_id!r}: submit_encode it first (or it was released)")
        return state

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the executor is shut down")
