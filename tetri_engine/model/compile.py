"""Regional torch.compile of the transformer blocks, and the rule that keeps compilation off the
serving path.

What is compiled: each transformer block (FLUX's double- and single-stream blocks, SD3's joint
blocks), `fullgraph=True, dynamic=False`: one graph per block class and input shape, which every block
of that class shares (dynamo treats the weights as inputs). Inductor fuses the norms, modulation,
RoPE, activations and, with FP8, the per-token quantization around the GEMMs. The sequence-parallel
attention (model/ulysses.py) is one opaque custom op inside that graph: its exchanges and the
thread-local group context never reach dynamo. The executor's CUDA graphs then capture the compiled
kernels like any others.

When it compiles: only inside `CompiledBlocks.compiling()`, which the executor's start-up warm-up (and
the profile measurement) enter. Everywhere else each block runs in dynamo's "run" mode: the compiled
code whose guards match its inputs, else the block's eager forward. So a request never waits for a
compilation: a shape outside the warmed set runs eagerly (slower, correct), whatever order things
happen in. `torch.compiler.set_stance("eager_on_recompile")` (torch >= 2.6; read in 2.13's source: it
sets dynamo's frame callback to `False`, "run mode") does the same for the whole process; here the same
mode is set per block with `torch._dynamo.run` (its RunOnlyContext is in every torch 2.x), so it
neither leaks into a host program's own torch.compile nor needs restoring.

Where it caches: inductor's on-disk caches (FX graphs, AOT autograd, Triton kernels) go to
TORCHINDUCTOR_CACHE_DIR, which `use_cache_dir` points at the engine's cache directory unless the
environment already sets it; a restart then recompiles from cache (dynamo still traces each shape).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import torch

log = logging.getLogger("tetri_engine.model")

# dynamo keeps one compiled entry per block class, device and shape (sizes x degrees x batches x
# devices): far more than its default of 8 recompilations per function.
RECOMPILE_LIMIT = 1024


def use_cache_dir(cache_dir: str | None) -> str:
    """Point inductor's caches at `cache_dir`/inductor unless the user chose a directory with
    TORCHINDUCTOR_CACHE_DIR; returns the directory in use. (torch writes its default, a per-user
    directory under /tmp, into that variable on first use, e.g. when a custom op is registered: that
    value is not a choice.)"""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir, default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache_dir and (not current or os.path.abspath(current) == os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)),
                                                             "inductor")
    return inductor_cache_dir()


class CountingBackend:
    """A torch.compile backend that counts the graphs it compiles (and the time it spends) around
    another backend: inductor by default, or any `backend(graph_module, example_inputs)` (tests use one
    that runs the captured graph as it is, which works on any device)."""

    def __init__(self, inner: str | Callable = "inductor"):
        self.inner = inner
        self.graphs = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        start = time.perf_counter()
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(graph_module, example_inputs)
        else:
            compiled = self.inner(graph_module, example_inputs)
        with self._lock:
            self.graphs += 1
            self.seconds += time.perf_counter() - start
        return compiled


class _BlockForward:
    """A block's forward: compiled (may compile) inside `compiling()`, dynamo's run mode outside it."""

    def __init__(self, forward: Callable, backend: CountingBackend, owner: CompiledBlocks):
        self.compiled = torch.compile(forward, backend=backend, fullgraph=True, dynamic=False)
        self.run_only = torch._dynamo.run(self.compiled)
        self.owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.owner.may_compile:
            return self.run_only(*args, **kwargs)
        with _recompile_limits():  # (dynamo's settings are per thread in recent torch: set where it compiles)
            return self.compiled(*args, **kwargs)


class CompiledBlocks:
    """The compiled blocks of a runtime's transformer replicas (see the module docstring)."""

    def __init__(self, transformers: Sequence[torch.nn.Module], backend: str | Callable = "inductor",
                 cache_dir: str | None = None):
        self.backend = CountingBackend(backend)
        self.cache_dir = use_cache_dir(cache_dir) if backend == "inductor" else None
        self.may_compile = False
        self._lock = threading.Lock()
        self._entered = 0
        self.blocks = [block for t in transformers for block in transformer_blocks(t)]
        for block in self.blocks:
            block.forward = _BlockForward(block.forward, self.backend, self)

    @contextlib.contextmanager
    def compiling(self) -> Iterator[None]:
        """Allow compilation of shapes not compiled yet while inside (start-up warm-up, profiling)."""
        with self._lock:
            self._entered += 1
            self.may_compile = True
        try:
            yield
        finally:
            with self._lock:
                self._entered -= 1
                self.may_compile = self._entered > 0

    def stats(self) -> dict:
        """graphs compiled so far, seconds in the backend, the inductor cache directory."""
        return {"graphs": self.backend.graphs, "backend_s": round(self.backend.seconds, 3),
                "cache_dir": self.cache_dir, "blocks": len(self.blocks)}


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a diffusers FLUX or SD3 transformer, in order."""
    return [*getattr(transformer, "transformer_blocks", []), *getattr(transformer, "single_transformer_blocks", [])]


def _recompile_limits():
    """dynamo's per-function and total recompile limits raised to RECOMPILE_LIMIT (newer torch names
    them recompile_limit / accumulated_recompile_limit, older cache_size_limit / accumulated_...)."""
    config = torch._dynamo.config
    limits = {}
    for names, value in ((("recompile_limit", "cache_size_limit"), RECOMPILE_LIMIT),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 8 * RECOMPILE_LIMIT)):
        name = next((n for n in names if hasattr(config, n)), None)
        if name is not None:
            limits[name] = max(getattr(config, name), value)
    return config.patch(**limits)
