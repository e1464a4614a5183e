"""LoRA adapters (issue 19): a diffusers/PEFT LoRA file read into low-rank factors checked against the
transformer (`read_adapter`), and a set of adapters fused into one transformer replica's weights, in place,
and undone exactly (`FusedLoras`).

    weights = read_adapter(path, "FluxPipeline", target_layers(transformer), device, dtype)   # LoraWeights
    fused = FusedLoras(transformer)
    fused.apply(key, [(weights_a, 0.8), (weights_b, 0.5)])   # W = W0 + 0.8 s_a B_a A_a + 0.5 s_b B_b A_b
    fused.apply((), [])                                      # W = W0 again, bit for bit

Why fused, not a LoRA branch beside each layer (vLLM-Omni, peft's unmerged layers): the forward stays the
one the engine already runs, so CUDA graphs (they hold the weights' addresses, which writing in place
keeps), compiled blocks (dynamo treats the weights as inputs) and every degree run an adapter set at the
plain model's step time; a branch costs two more GEMMs per adapted layer per step and a graph per set. The
price is a switch when a device's next group wants another set: per adapted layer one GEMM
(B [out, r] x A [r, in]) added to the original weight, written over the weight (bench/lora_bench.py
measures it). The originals of every layer an adapter set changes stay on the device while it is changed
(copied when it first changes), so undoing is a copy, never a subtraction that would drift by a rounding per
switch; a device back to the plain model drops them.

Reading uses diffusers' own `lora_state_dict` of the pipeline class (FluxPipeline, StableDiffusion3Pipeline),
so the formats diffusers converts (kohya, xlabs, ... for FLUX) are read as diffusers reads them; only the
transformer's `lora_A` / `lora_B` factors are served. Per layer the delta is B A x alpha / r, with alpha and
r as diffusers' peft loading takes them: the file's `lora_adapter_metadata` (lora_alpha, r, alpha_pattern,
use_rslora), else its network alphas (`<layer>.alpha`), else alpha = r (scale 1).
"""
from __future__ import annotations

import inspect
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from tetri_engine.model.fp8 import Float8Linear, quantize_rowwise

PREFIX = "transformer."  # diffusers' key prefix of the transformer's factors


@dataclass
class LoraWeights:
    """One adapter's factors on one device: layer name -> (down A [r, in], up B x alpha/r [out, r])."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.layers.values() for t in pair)

    @property
    def rank(self) -> int:
        return max(down.shape[0] for down, _ in self.layers.values())


def target_layers(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers an adapter may change: every linear of the transformer (float8 ones included)."""
    return {name: m for name, m in transformer.named_modules() if isinstance(m, (torch.nn.Linear, Float8Linear))}


def layer_shape(layer: torch.nn.Module) -> tuple[int, int]:
    return layer.out_features, layer.in_features


def read_adapter(path: str, pipeline_class_name: str, layers: dict[str, Any], device: torch.device,
                 dtype: torch.dtype, name: str = "") -> LoraWeights:
    """The adapter in safetensors file `path` as `LoraWeights` on `device` in `dtype`, for a transformer whose
    target layers (`target_layers`, or name -> (out, in)) are `layers`. ValueError saying why it cannot be
    used: unreadable, not a LoRA of this model (a layer it lacks, shapes that differ), or parts this engine
    does not serve (text-encoder factors, DoRA, biases, norm weights)."""
    state_dict, alphas, metadata = _state_dict(path, pipeline_class_name)
    factors = _factors(state_dict)
    shapes = {k: (v if isinstance(v, tuple) else layer_shape(v)) for k, v in layers.items()}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer, (down, up) in factors.items():
        if layer not in shapes:
            raise ValueError(f"it changes a layer this model does not have or that is not linear: {layer!r}")
        rank = down.shape[0]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != rank or (up.shape[0], down.shape[1]) != shapes[layer]:
            raise ValueError(f"its factors of {layer!r} ({tuple(up.shape)} x {tuple(down.shape)}) do not fit the "
                             f"layer's weight {shapes[layer]}")
        scaling = _scaling(layer, rank, alphas, metadata)
        out[layer] = (down.to(device, torch.float32).to(dtype).contiguous(),
                      (up.to(device, torch.float32) * scaling).to(dtype).contiguous())
    return LoraWeights(name or os.path.basename(path), out)


def _state_dict(path: str, pipeline_class_name: str) -> tuple[dict, dict, dict]:
    """(state dict, network alphas, adapter metadata) as diffusers' `<Pipeline>.lora_state_dict` reads the file."""
    import diffusers

    pipeline_class = getattr(diffusers, pipeline_class_name)
    options = {"weight_name": os.path.basename(path), "local_files_only": True, "return_lora_metadata": True}
    with_alphas = "return_alphas" in inspect.signature(pipeline_class.lora_state_dict).parameters
    if with_alphas:
        options["return_alphas"] = True
    try:
        out = pipeline_class.lora_state_dict(os.path.dirname(os.path.abspath(path)), **options)
    except Exception as exc:  # a broken file, or a format diffusers refuses: say which
        raise ValueError(f"diffusers cannot read it: {type(exc).__name__}: {exc}") from None
    state_dict, alphas, metadata = (out if with_alphas else (out[0], None, out[1]))
    return state_dict, alphas or {}, metadata or {}


def _factors(state_dict: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (lora_A, lora_B) of the transformer's keys; ValueError for anything else in the file."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    others = sorted({k.split(".")[0] for k in state_dict if not k.startswith(PREFIX)})
    if others:
        raise ValueError(f"it holds weights of {', '.join(others)} besides the transformer; only transformer "
                         f"LoRAs are served")
    keys = {k[len(PREFIX):]: v for k, v in state_dict.items()}
    if keys and "lora_A" not in next(iter(keys)):  # an older diffusers naming (lora.down / lora.up)
        keys = convert_unet_state_dict_to_peft(keys)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in keys.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise ValueError(f"it holds {key!r}, which is not a LoRA factor (DoRA, biases and norm weights "
                             f"are not served)")
        factors.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not factors:
        raise ValueError("it holds no transformer LoRA factors")
    broken = [layer for layer, pair in factors.items() if set(pair) != {"A", "B"}]
    if broken:
        raise ValueError(f"layer {broken[0]!r} has only one of its two LoRA factors")
    return {layer: (pair["A"], pair["B"]) for layer, pair in factors.items()}


def _scaling(layer: str, rank: int, alphas: dict, metadata: dict) -> float:
    """alpha / r of one layer (alpha / sqrt(r) with rsLoRA), as diffusers' peft loading sets it up."""
    config = {k[len(PREFIX):]: v for k, v in metadata.items() if k.startswith(PREFIX)}
    if config:
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, layer, config.get("lora_alpha", rank)))
        return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    alpha = alphas.get(f"{PREFIX}{layer}.alpha", alphas.get(f"{layer}.alpha"))
    return 1.0 if alpha is None else float(alpha) / rank


def _pattern_value(patterns: dict, layer: str, default: Any) -> Any:
    """peft's per-layer pattern lookup: a key matches a layer name ending in it ("^key": the whole name)."""
    for key, value in patterns.items():
        if re.fullmatch(key[1:] if key.startswith("^") else rf"(.*\.)?{key}", layer):
            return value
    return default


class FusedLoras:
    """The adapter set fused into one transformer replica's weights (see the module docstring). Used by one
    thread at a time: the executor thread of the replica's device."""

    def __init__(self, transformer: torch.nn.Module):
        self.layers = target_layers(transformer)
        self.originals: dict[str, tuple[torch.Tensor, ...]] = {}  # layer -> its weights before any adapter
        self.key: tuple = ()  # the set fused now: ((name, scale), ...)
        self._changed: set[str] = set()  # layers whose weights differ from their originals now

    @property
    def originals_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.originals.values() for t in ts)

    @torch.no_grad()
    def apply(self, key: tuple, adapters: Sequence[tuple[LoraWeights, float]]) -> None:
        """Make the weights W0 + sum of scale x delta of `adapters` (in their order), known as `key`. A layer no
        adapter touches any more gets its original back. On an exception the replica holds an unknown mix:
        `key` is then None, so the next apply writes every layer it changed again."""
        wanted: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for weights, scale in adapters:
            for layer, (down, up) in weights.layers.items():
                wanted.setdefault(layer, []).append((down, up, float(scale)))
        self.key = None
        for layer in self._changed - wanted.keys():
            _restore(self.layers[layer], self.originals[layer])
        for layer, deltas in wanted.items():
            if layer not in self.originals:
                self.originals[layer] = _snapshot(self.layers[layer])
            self._changed.add(layer)  # (before the write: a write that fails half way is undone too)
            _fuse(self.layers[layer], self.originals[layer], deltas)
        self._changed &= wanted.keys()
        # Originals are kept only while their layer is changed: a device back to the plain model holds no
        # copy (~4.7 GiB for every attention projection of FLUX.1-dev), at the price of copying again on
        # its next switch to an adapter.
        for layer in self.originals.keys() - self._changed:
            del self.originals[layer]
        self.key = tuple(key)


def _snapshot(layer: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    if isinstance(layer, Float8Linear):
        return layer.weight_fp8.clone(), layer.weight_scale.clone()
    return (layer.weight.detach().clone(),)


def _restore(layer: torch.nn.Module, original: tuple[torch.Tensor, ...]) -> None:
    if isinstance(layer, Float8Linear):
        layer.weight_fp8.copy_(original[0])
        layer.weight_scale.copy_(original[1])
    else:
        layer.weight.copy_(original[0])


def _fuse(layer: torch.nn.Module, original: tuple[torch.Tensor, ...],
          deltas: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """Write original + sum(scale x up @ down) over the layer's weight, in place (its address kept)."""
    if isinstance(layer, Float8Linear):  # in float32, then quantized again row by row
        weight = original[0].float() * original[1].t()
        for down, up, scale in deltas:
            weight.addmm_(up.float(), down.float(), alpha=scale)
        quantized, row_scale = quantize_rowwise(weight)
        layer.weight_fp8.copy_(quantized)
        layer.weight_scale.copy_(row_scale.t())
        return
    weight = layer.weight
    (down, up, scale), rest = deltas[0], deltas[1:]
    # One GEMM whose epilogue adds the original: accumulated in float32, rounded once.
    torch.addmm(original[0], up.to(weight.dtype), down.to(weight.dtype), alpha=scale, out=weight)
    for down, up, scale in rest:
        weight.addmm_(up.to(weight.dtype), down.to(weight.dtype), alpha=scale)
