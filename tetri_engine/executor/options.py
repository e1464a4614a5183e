"""How the executor's ranks run their steps (`StepOptions`), and what a steps job runs with (`StepEnv`).

The defaults of StepOptions are what the engine runs; each other value exists to measure a piece of the
executor against its alternative (bench/corun_interference.py switches them one at a time,
bench/runtime_check.py compares the loops).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

LOOPS = ("native", "python")


@dataclass(frozen=True)
class StepOptions:
    """loop: "native" runs a batch's steps in the extension's loop (csrc/step_loop.cpp) with the GIL
        released, Python entered only for an eager forward and for progress; "python" runs the same
        protocol in Python (executor/segments.py), one GIL round per step.
    max_steps_queued: steps a rank may have queued on its GPU ahead of the one running (0: no bound).
    host_conditioning: a request's prompt embeddings leave the encode device (the first GPU) for host
        memory once encoded, so each rank copies them from the host on its own stream. False keeps them
        on the encode device, where every other GPU's copy of them is ordered behind the work queued on
        the encode device's stream (what made a 512^2 group on GPU 1 wait for a 2048^2 group's queued
        steps on GPU 0; bench/RESULTS.md, issue 21).
    private_reads: copies that read a device the calling thread does not step on (latent moves to
        another group, gathers for a decode or preview) run on streams of the calling thread's own, so
        they do not wait for another group's work queued on that device. False: on the shared stream.
    trace: record per-phase host and GPU timings of every steps call (`StepsResult.trace`).
    """

    loop: str = "native"
    max_steps_queued: int = 2
    host_conditioning: bool = True
    private_reads: bool = True
    trace: bool = False

    def __post_init__(self):
        if self.loop not in LOOPS:
            raise ValueError(f"step loop must be one of {LOOPS}, got {self.loop!r}")
        if self.max_steps_queued < 0:
            raise ValueError(f"max_steps_queued must be >= 0 (0: no bound), got {self.max_steps_queued}")

    @classmethod
    def from_env(cls, **overrides) -> StepOptions:
        """The defaults, with TETRI_STEP_LOOP (native|python) and TETRI_MAX_STEPS_QUEUED read from the
        environment when set (read when an executor is made, never at import), then `overrides`."""
        options = cls()
        if os.environ.get("TETRI_STEP_LOOP"):
            options = replace(options, loop=os.environ["TETRI_STEP_LOOP"].strip().lower())
        if os.environ.get("TETRI_MAX_STEPS_QUEUED"):
            options = replace(options, max_steps_queued=int(os.environ["TETRI_MAX_STEPS_QUEUED"]))
        return replace(options, **overrides)


@dataclass(frozen=True)
class StepEnv:
    """What a steps job needs of the executor that runs it (the job holds no reference to the executor)."""

    runtime: Any  # model.ModelRuntime
    devices: list[str]  # device names; jobs index them
    torch_devices: list[Any]  # torch.device of each
    comm_cache: Any  # ops.CommCache
    graphs: Any  # cuda_graphs.CudaGraphs, or None (eager)
    latents: Any  # latents.LatentPlacer
    exiting: Any  # ops.StopFlag: set at interpreter exit, every job stops at its next step boundary
    options: StepOptions
    log_errors: bool = False  # print the traceback of a failed step
    loras: Any = None  # adapters.LoraDevices when LoRA adapters are served, else None
