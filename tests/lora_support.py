"""Tiny LoRA adapters for the tests, made at random and saved as diffusers saves them
(`FluxPipeline.save_lora_weights`: `NAME/pytorch_lora_weights.safetensors`, keys `transformer.<layer>.lora_A.weight`,
the adapter config in the file's metadata), or as a bare `NAME.safetensors` file."""
from __future__ import annotations

import os

import torch

# The tiny FLUX model's attention projections (model/presets.py: 2 double blocks, 1 single block, width 64).
DOUBLE = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SINGLE = ("to_q", "to_k", "to_v")
WIDTH = 64


def attention_layers(double_blocks: int = 2, single_blocks: int = 1) -> list[str]:
    return ([f"transformer_blocks.{b}.attn.{p}" for b in range(double_blocks) for p in DOUBLE]
            + [f"single_transformer_blocks.{b}.attn.{p}" for b in range(single_blocks) for p in SINGLE])


def lora_factors(seed: int, rank: int = 4, layers: list[str] | None = None, strength: float = 0.5) -> dict:
    """Random factors lora_A [rank, 64], lora_B [64, rank] for each layer (PEFT key names, no prefix)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers or attention_layers():
        out[f"{layer}.lora_A.weight"] = torch.randn(rank, WIDTH, generator=gen) / WIDTH ** 0.5
        out[f"{layer}.lora_B.weight"] = torch.randn(WIDTH, rank, generator=gen) * strength
    return out


def save_lora(directory: str, name: str, seed: int, *, rank: int = 4, alpha: float | None = None,
              as_file: bool = False, layers: list[str] | None = None) -> str:
    """Save a random adapter in `directory` the way diffusers does -> its safetensors path. alpha: the
    adapter config's lora_alpha (scale alpha / rank); as_file: `NAME.safetensors` instead of `NAME/`."""
    from diffusers import FluxPipeline

    target = directory if as_file else os.path.join(directory, name)
    metadata = None if alpha is None else {"r": rank, "lora_alpha": alpha}
    weight_name = f"{name}.safetensors" if as_file else None
    FluxPipeline.save_lora_weights(target, transformer_lora_layers=lora_factors(seed, rank, layers),
                                   transformer_lora_adapter_metadata=metadata, weight_name=weight_name)
    return os.path.join(target, weight_name or "pytorch_lora_weights.safetensors")
