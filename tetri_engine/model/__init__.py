"""The model layer: diffusers adapters (FLUX, SD3), Ulysses sequence-parallel attention, presets and
loading. `load_runtime` is the entry point; the executor drives the runtime it returns.

Importing this package imports torch and diffusers (the engine imports it on first use only).
"""
from __future__ import annotations

from tetri_engine.model.adapter import (
    ModelAdapter,
    PreparedRequest,
    Replicate,
    SeqSplit,
    flow_match_euler_step,
    pack_latents,
    unpack_latents,
)
from tetri_engine.model.presets import PRESETS
from tetri_engine.model.runtime import ADAPTERS, ModelRuntime, load_runtime, torch_device
from tetri_engine.model.ulysses import SPContext, check_heads, sequence_parallel, sp_attention

__all__ = [
    "ADAPTERS",
    "ModelAdapter",
    "ModelRuntime",
    "PRESETS",
    "PreparedRequest",
    "Replicate",
    "SPContext",
    "SeqSplit",
    "check_heads",
    "flow_match_euler_step",
    "load_runtime",
    "pack_latents",
    "sequence_parallel",
    "sp_attention",
    "torch_device",
    "unpack_latents",
]
