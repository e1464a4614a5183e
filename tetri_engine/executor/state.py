"""Per-request denoising state held by the executor, what the executor tells the engine about its model
and its requests (ModelInfo, RequestProgress), and the result records its futures resolve to.

The executor is the one owner of what happened to a request on the devices (steps done, degrees,
regroups, placement, times, peak memory); the engine reads `RequestProgress` snapshots of it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from tetri_engine import ops
from tetri_engine.model.adapter import PreparedRequest
from tetri_engine.request import SizeRule


def describe_error(exc: BaseException) -> str:
    """The message a request that failed of `exc` carries."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"CUDA out of memory: {exc}"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class ModelInfo:
    """What the layers above the executor need to know of the loaded model."""

    dtype: str  # "float32", "bfloat16", ..., "fp8" (float8 GEMMs in the transformer blocks)
    num_heads: int  # a group's degree must divide it (Ulysses)
    default_steps: int
    default_guidance: float
    size_rule: SizeRule  # the sizes the model can make
    compiled: bool = False  # transformer blocks compiled (shapes compile at warm-up only)
    attention: str = "sdpa"  # the attention kernel (model/attention.py)
    # Parallel methods the model offers (issue 16): "ulysses", "cfg" (guidance branches side by side),
    # "patch_vae" (patch-parallel decode). With "cfg": a request runs true classifier-free guidance,
    # and so may run CFG-parallel, when its guidance_scale > cfg_guidance_above.
    parallel_methods: frozenset[str] = frozenset({"ulysses"})
    cfg_guidance_above: float | None = None

    def cfg_parallel(self, guidance_scale: float, cached: bool = False) -> bool:
        """Whether a request with this guidance (and step caching or not) can run CFG-parallel."""
        return ("cfg" in self.parallel_methods and self.cfg_guidance_above is not None and not cached
                and guidance_scale > self.cfg_guidance_above)


@dataclass(frozen=True)
class RequestProgress:
    """A snapshot of what the executor did for one request so far."""

    seed: int
    step: int  # steps done in total
    num_steps: int
    placement: tuple[int, ...] | None  # device indices holding its latent, rank order
    steps_at_degree: dict[int, int]  # degree -> steps run at it
    regroups: int  # calls that moved its latent onto another group first
    steps_s: float  # time of the step calls it ran in (a batch's time counts for each of its requests)
    encode_s: float
    decode_s: float
    peak_memory_bytes: int  # GPU: max torch.cuda.max_memory_allocated over its calls' devices; CPU: 0


@dataclass
class DenoiseState:
    """One request between `submit_encode` and `release`.

    The latent lives as `shards` (one per device of `placement`) from its first steps on; before that it
    is `prepared.noise` on the CPU. With `cfg` = 1 the shards are the `ops.shard` layout over the
    placement; in a CFG-parallel layout (cfg = 2) each guidance branch's devices hold the `ops.shard`
    layout over themselves, the same values in both (`token_shards`: the first branch's). `step`
    counts the steps done. Only the job that currently owns the request (see `idle`) changes these fields.
    """

    request_id: str
    prompt: str
    width: int
    height: int
    seed: int
    prepared: PreparedRequest | None = None
    shards: list[torch.Tensor] | None = None
    placement: tuple[int, ...] | None = None  # device indices holding the shards, in rank order
    cfg: int = 1  # the layout of the shards: guidance branches side by side (see above)
    step: int = 0
    error: str | None = None  # set once the request failed; it then stays failed
    # Executor.cancel: its steps stop at the next step boundary, in this call and every later one.
    # Set by any thread, read by rank 0 of the job that owns the request (in the native loop too).
    stop: ops.StopFlag = field(default_factory=ops.StopFlag)
    steps_at_degree: dict[int, int] = field(default_factory=dict)
    regroups: int = 0
    peak_memory_bytes: int = 0  # GPU: max torch.cuda.max_memory_allocated over its jobs' devices; CPU: 0
    steps_s: float = 0.0
    encode_s: float = 0.0
    decode_s: float = 0.0
    cache: Any = None  # a model.step_cache.StepCache when the request caches (cache="auto"), else None
    lora: tuple = ()  # its LoRA adapter set: ((name, scale), ...) sorted by name (executor/adapters.py)
    # Set when no job owns the request. Each new job takes the current event to wait on and leaves a
    # fresh one, so the jobs of one request run one after the other, in submission order.
    idle: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        return self.stop.is_set()

    @property
    def token_shards(self) -> list[torch.Tensor]:
        """The latent's shards in the `ops.shard` layout (one guidance branch's, in a CFG layout)."""
        return self.shards[:len(self.shards) // self.cfg]

    @property
    def num_steps(self) -> int:
        return self.prepared.num_steps if self.prepared is not None else 0

    @property
    def finished(self) -> bool:
        return self.prepared is not None and self.step >= self.prepared.num_steps

    def progress(self) -> RequestProgress:
        return RequestProgress(
            seed=self.seed, step=self.step, num_steps=self.num_steps, placement=self.placement,
            steps_at_degree=dict(self.steps_at_degree), regroups=self.regroups, steps_s=self.steps_s,
            encode_s=self.encode_s, decode_s=self.decode_s, peak_memory_bytes=self.peak_memory_bytes)

    def stats(self) -> dict[str, Any]:
        return {**self.progress().__dict__, "error": self.error, "cancelled": self.cancelled,
                "cache": self.cache.stats() if self.cache is not None else None}


@dataclass
class EncodeResult:
    request_id: str
    seed: int  # the request's seed (drawn at random when it gave none)
    num_steps: int
    image_tokens: int
    encode_s: float


@dataclass
class RequestStepResult:
    request_id: str
    steps_done: int  # steps run by this call
    step: int  # steps done in total
    num_steps: int
    regrouped: bool  # its latent moved to this call's devices first
    seconds: float  # the call's step time (shared by the requests of a batch)
    error: str | None = None  # the request failed (here or before); the others of the call are unaffected
    # Executor.cancel stopped it in this call before its last step (or before its decode): steps_done
    # counts the steps it did; error is "cancelled". Its batch-mates are unaffected.
    cancelled: bool = False
    image: Any = None  # PIL.Image, when decode_after and the request finished
    png: bytes | None = None
    decode_s: float = 0.0

    @property
    def finished(self) -> bool:
        return self.error is None and self.step >= self.num_steps


@dataclass
class StepsResult:
    """What `Executor.submit_steps` resolves to.

    seconds: wall time of the steps on the devices (from every rank ready to the last step finished on
    the devices, synchronised on GPU); regroup_s: moving the latents first; decode_s: decoding after;
    lora_s: fusing the requests' LoRA adapter set into the devices' weights first (the slowest device; 0.0
    when they held it already).
    """

    requests: dict[str, RequestStepResult]
    device_indices: tuple[int, ...]
    num_steps: int
    seconds: float = 0.0
    regroup_s: float = 0.0
    decode_s: float = 0.0
    trace: dict[str, Any] | None = None  # StepOptions.trace: per-phase timings of each rank (executor/trace.py)
    lora_s: float = 0.0

    @property
    def degree(self) -> int:
        return len(self.device_indices)

    def __getitem__(self, request_id: str) -> RequestStepResult:
        return self.requests[request_id]

    @property
    def errors(self) -> dict[str, str]:
        return {rid: r.error for rid, r in self.requests.items() if r.error is not None}
