"""EngineConfig: everything the engine is started with, as one plain dataclass."""
from __future__ import annotations

import os
from dataclasses import dataclass, field


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "tetri-engine")


@dataclass
class EngineConfig:
    # Model: "tiny" (embedded random-weight default), "flux-dev", "flux-schnell", "sd3-medium",
    # or a local diffusers directory.
    model: str = "tiny"
    # Devices, e.g. ["cuda:0", "cuda:1"] or ["cpu:0", "cpu:1", "cpu:2", "cpu:3"] (virtual CPU devices).
    # None: every visible GPU, else `num_cpu_devices` virtual CPU devices.
    devices: list[str] | None = None
    num_cpu_devices: int = 4
    # dtype of the model: "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16", "fp32".
    dtype: str = "auto"
    # Scheduling policy: "tetri" (default), "fixed1", "fixed2", "fixed4", "fixed8", "rssp", "edf2" ...
    policy: str = "tetri"
    # Step-time profile JSON (bench/profiles/*.json). None: measured at start-up for this model and
    # these devices, cached under `cache_dir`.
    profile: str | None = None
    cache_dir: str = field(default_factory=default_cache_dir)
    # Round length: `round_steps` steps of a typical request (paper: 5), or fixed `round_s` seconds.
    round_steps: int = 5
    round_s: float | None = None
    # Admission: at most `max_queue` requests waiting or running; a deadline that cannot be met even
    # at full width is rejected ("reject") or accepted best effort ("best_effort").
    max_queue: int = 64
    admission: str = "reject"
    # Default deadline when a request gives none: the SLO table for its resolution x `slo_scale`.
    slo_scale: float = 1.0
    # Input limits.
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 100
    # Communicator cache size (least-recently-used groups beyond it are destroyed).
    comm_cache_size: int = 64
    # CUDA graphs of the denoising steps (GPU only; executor/cuda_graphs.py): each batch's forward is
    # captured once per shape, group and rank, then replayed. Off: every step launches eagerly.
    cuda_graphs: bool = True
