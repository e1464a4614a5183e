"""Start-up warm-up: one denoising step of each shape the engine will run, before any request, so that
a compiled model compiles that shape here (model/compile.py) and the executor captures its CUDA graph
here, not on a request's critical path.

A shape is (width, height, batch) on a group of devices. Compiled code depends on the device and on
the shard's shape (hence on the degree), not on which group the device is in, so covering every
device at every degree compiles everything; a CUDA graph is per group and rank, so a group that is
not warmed captures on its first request (one eager forward and a capture: no compilation).

Shapes of the same (size, batch, degree) run together, one job per group (the groups of a degree are
disjoint), through the executor's ordinary `submit_encode` / `submit_steps`, inside
`Executor.compiling()`. A shape that fails (out of memory, ...) is reported and skipped: requests of
that shape then run eagerly.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from tetri_engine.executor.executor import Executor

_ids = itertools.count()


@dataclass(frozen=True)
class WarmupShape:
    width: int
    height: int
    group: tuple[int, ...]  # device indices, rank order
    batch: int = 1
    cfg: int = 1  # 2: the CFG-parallel layout (guidance branches side by side)

    def label(self) -> str:
        return (f"{self.width}x{self.height} degree {len(self.group)} batch {self.batch}"
                + (f" cfg {self.cfg}" if self.cfg > 1 else ""))


@dataclass
class WarmupReport:
    """What the warm-up did: shapes run, wall time, graphs compiled by the compile backend (0: an eager
    model, or everything came from dynamo's in-process cache), CUDA graphs captured, failures."""

    shapes: int = 0
    seconds: float = 0.0
    compiled: bool = False
    compiled_graphs: int = 0
    compile_backend_s: float = 0.0
    cache_dir: str | None = None
    graphs_captured: int = 0
    failures: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{self.shapes} shapes in {self.seconds:.1f} s"
        if self.compiled:
            text += (f"; torch.compile: {self.compiled_graphs} graphs compiled ({self.compile_backend_s:.1f} s in "
                     f"the backend), inductor cache {self.cache_dir or '-'}")
        text += f"; {self.graphs_captured} CUDA graphs captured"
        if self.failures:
            text += f"; {len(self.failures)} failed (they run eagerly): " + "; ".join(self.failures)
        return text


def warm_up_shapes(executor: Executor, shapes: Sequence[WarmupShape],
                   log: Callable[[str], None] | None = None) -> WarmupReport:
    """Run one step of every shape (see the module docstring) -> WarmupReport."""
    say = log or (lambda message: None)
    compiled = executor.runtime.compiled
    report = WarmupReport(shapes=len(shapes), compiled=compiled is not None)
    before = compiled.stats() if compiled is not None else {"graphs": 0, "backend_s": 0.0}
    captures_before = executor.graph_stats().get("captures", 0)
    start = time.perf_counter()
    waves: dict[tuple, list[WarmupShape]] = {}
    for shape in shapes:
        waves.setdefault((shape.width, shape.height, shape.batch, len(shape.group), shape.cfg), []).append(shape)
    with executor.compiling():
        for wave in waves.values():
            wave_start = time.perf_counter()
            jobs = []
            for shape in wave:
                try:
                    jobs.append((shape, *_submit(executor, shape)))
                except Exception as exc:  # a call that cannot run (heads % degree, ...)
                    report.failures.append(f"{shape.label()} on {shape.group}: {type(exc).__name__}: {exc}")
            for shape, ids, future in jobs:
                try:
                    errors = [r.error for r in future.result().requests.values() if r.error]
                    if errors:
                        report.failures.append(f"{shape.label()} on {shape.group}: {errors[0]}")
                except Exception as exc:
                    report.failures.append(f"{shape.label()} on {shape.group}: {type(exc).__name__}: {exc}")
                finally:
                    for rid in ids:
                        executor.release(rid)
            say(f"warm-up {wave[0].label()} on {len(wave)} group(s): {time.perf_counter() - wave_start:.1f} s")
    report.seconds = time.perf_counter() - start
    if compiled is not None:
        after = compiled.stats()
        report.compiled_graphs = after["graphs"] - before["graphs"]
        report.compile_backend_s = after["backend_s"] - before["backend_s"]
        report.cache_dir = after["cache_dir"]
    report.graphs_captured = executor.graph_stats().get("captures", 0) - captures_before
    return report


def _submit(executor: Executor, shape: WarmupShape):
    """Encode `shape.batch` one-step requests and submit their step on the group -> (ids, future)."""
    from tetri_engine.request import GenerationRequest

    ids = []
    try:
        for _ in range(shape.batch):
            rid = f"__warmup__/{next(_ids)}"
            request = GenerationRequest(prompt="warm-up", width=shape.width, height=shape.height,
                                        num_inference_steps=1, seed=0, request_id=rid)
            executor.submit_encode(rid, request)
            ids.append(rid)
        return ids, executor.submit_steps(ids, shape.group, 1, cfg=shape.cfg)
    except Exception:
        for rid in ids:
            executor.release(rid)
        raise
