"""ModelRuntime: one loaded model on its devices, and `load_runtime`, which builds it from a preset name
or a local diffusers directory.

Devices are strings ("cuda:0", "cpu:1"). GPUs each get their own replica of the transformer and the
VAE (copied from the first device, so every replica holds the same weights); CPU virtual devices all
share the one CPU model. The text encoders live on the first device only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from tetri_engine.model.adapter import ModelAdapter, PreparedRequest
from tetri_engine.model.flux import FluxAdapter
from tetri_engine.model.presets import PRESETS, Preset, build_random_pipeline, build_tiny_pipeline, default_dtype
from tetri_engine.model.sd3 import SD3Adapter
from tetri_engine.request import SizeRule

# pipeline class name (model_index.json "_class_name") -> adapter: a new model family is one adapter here
ADAPTERS: dict[str, type[ModelAdapter]] = {a.pipeline_class_name: a for a in (FluxAdapter, SD3Adapter)}

def torch_device(name: str) -> torch.device:
    """"cuda:N" -> cuda device N; "cpu:N" (a virtual device) -> the host CPU."""
    kind, _, index = str(name).partition(":")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        return torch.device("cuda", int(index or 0))
    raise ValueError(f"unknown device {name!r}: expected 'cuda:N' or 'cpu:N'")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: expected 'auto', 'bf16', 'fp16' or 'fp32'")
    return names[dtype]


@dataclass
class ModelRuntime:
    """A model ready to run on `devices`. What the executor reads from it (and passes on to the engine):

    default_steps, default_guidance, num_heads, patch_px (16: image pixels per token side), size_rule
    (the sizes the model can make), name, family ("flux" | "sd3"), dtype, devices. Everything that
    depends on the family is the adapter's.
    """

    name: str
    pipeline: Any  # the diffusers pipeline; its transformer/VAE are the first device's replicas
    adapter: ModelAdapter
    devices: list[str]
    dtype: torch.dtype
    default_steps: int
    default_guidance: float
    transformers: dict[str, torch.nn.Module]  # str(torch device) -> replica
    vaes: dict[str, torch.nn.Module]
    encode_device: torch.device

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def patch_px(self) -> int:
        return self.adapter.patch_px

    @property
    def size_rule(self) -> SizeRule:
        return self.adapter.size_rule

    @property
    def num_heads(self) -> int:
        return self.adapter.num_heads

    def torch_device(self, device_index: int) -> torch.device:
        return torch_device(self.devices[device_index])

    def transformer_on(self, device: torch.device) -> torch.nn.Module:
        return self.transformers[str(device)]

    def vae_on(self, device: torch.device) -> torch.nn.Module:
        return self.vaes[str(device)]

    @torch.no_grad()
    def prepare(self, *, prompt: str, width: int, height: int, seed: int, num_steps: int | None = None,
                guidance_scale: float | None = None, negative_prompt: str | None = None) -> PreparedRequest:
        """Prompt embeddings (on the encode device), the seeded noise (CPU) and the request's schedule.
        ValueError for a size the model cannot make (`size_rule`) or fewer than one step."""
        self.size_rule.check(width, height)
        num_steps = self.default_steps if num_steps is None else int(num_steps)
        if num_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
        guidance_scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        return self.adapter.prepare(
            prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, seed=int(seed),
            num_steps=num_steps, guidance_scale=guidance_scale, device=self.encode_device, dtype=self.dtype,
        )

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, width: int, height: int):
        """The whole packed latent [1, L, C] -> PIL image, with the VAE of the latent's device."""
        return self.adapter.decode(self.vae_on(latent.device), latent, width, height)

    def preview(self, latent: torch.Tensor, width: int, height: int):
        """The whole packed latent [1, L, C] -> a low-cost PIL preview of (width/8, height/8), no VAE."""
        return self.adapter.preview(latent, width, height)


# --- building -----------------------------------------------------------------------------------------


def replicate(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of a diffusers model on `device`: built on the meta device (no init), then filled with the
    source's tensors, copied straight across devices (peer copies between GPUs)."""
    with torch.device("meta"), default_dtype(next(module.parameters()).dtype):
        clone = type(module).from_config(module.config)
    state = {name: t.to(device, copy=True) for name, t in module.state_dict().items()}
    clone.load_state_dict(state, assign=True, strict=True)
    for name, buf in module.named_buffers():  # non-persistent buffers are not in the state dict
        if name not in state:
            owner, _, attr = name.rpartition(".")
            clone.get_submodule(owner)._buffers[attr] = buf.to(device, copy=True)
    return clone.eval().requires_grad_(False)


def load_local_pipeline(path: str, dtype: torch.dtype):
    """A diffusers pipeline directory, local files only. Returns (pipeline, class name)."""
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(f"{path!r} is not a diffusers pipeline directory: it has no model_index.json")
    try:
        with open(index_path) as f:
            class_name = json.load(f).get("_class_name")
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {index_path}: {exc}") from exc
    if class_name not in ADAPTERS:
        raise ValueError(f"{path!r} holds a {class_name or 'pipeline of unknown class'}; tetri-engine serves "
                         f"{', '.join(sorted(ADAPTERS))}")
    import diffusers

    try:
        pipeline = getattr(diffusers, class_name).from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as exc:  # missing or broken component files: say which directory, keep the cause
        raise ValueError(f"cannot load the {class_name} in {path!r}: {exc}") from exc
    return pipeline, class_name


def _check_scheduler(pipeline) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = pipeline.scheduler
    if not isinstance(sched, FlowMatchEulerDiscreteScheduler) or sched.config.get("stochastic_sampling", False):
        raise ValueError(f"the runtime steps with deterministic flow-matching Euler; this pipeline's scheduler "
                         f"is {type(sched).__name__} {dict(sched.config)}")


def load_runtime(name_or_path: str = "tiny", devices: list[str] | None = None, dtype: str | torch.dtype = "auto",
                 seed: int = 0) -> ModelRuntime:
    """Load a model for `devices`.

    name_or_path: a preset ("tiny", "tiny-sd3", "flux-dev", "flux-schnell", "sd3-medium") or a local
    diffusers directory of a FluxPipeline or StableDiffusion3Pipeline (local files only).
    devices: ["cuda:0", ...] or virtual CPU devices ["cpu:0", ...] (default ["cpu:0"]); one kind only.
    dtype: "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16", "fp32". seed: random weights of presets.
    """
    devices = list(devices or ["cpu:0"])
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct, got {devices}")
    torch_devices = [torch_device(d) for d in devices]
    if len({d.type for d in torch_devices}) != 1:
        raise ValueError(f"devices must be all GPUs or all virtual CPU devices, got {devices}")
    first = torch_devices[0]
    dtype = resolve_dtype(dtype, first)

    preset: Preset | None = PRESETS.get(name_or_path)
    if preset is not None:
        if preset.tiny:
            pipeline = build_tiny_pipeline(preset, seed=seed)  # float32 on the CPU
            pipeline = pipeline.to(first) if dtype == torch.float32 else pipeline.to(first, dtype)
        else:
            if first.type != "cuda":
                raise ValueError(f"the {preset.name} preset is a full-size model with random weights, meant for "
                                 f"GPUs; on CPU use the 'tiny' or 'tiny-sd3' preset")
            pipeline = build_random_pipeline(preset, first, dtype, seed=seed)
        class_name = preset.pipeline_class
        text_tokens, random_text = preset.text_tokens, preset.random_text
        default_steps, default_guidance, name = preset.default_steps, preset.default_guidance, preset.name
    elif os.path.isdir(name_or_path):
        pipeline, class_name = load_local_pipeline(name_or_path, dtype)
        pipeline = pipeline.to(first)
        text_tokens, random_text = ADAPTERS[class_name].local_text_tokens(pipeline), None
        default_steps, default_guidance = ADAPTERS[class_name].local_defaults(pipeline)
        name = os.path.basename(os.path.normpath(name_or_path))
    else:
        raise ValueError(f"unknown model {name_or_path!r}: expected a preset ({', '.join(PRESETS)}) or a local "
                         f"diffusers directory")

    _check_scheduler(pipeline)
    adapter = ADAPTERS[class_name](pipeline, text_tokens=text_tokens, random_text=random_text)
    transformers: dict[str, torch.nn.Module] = {}
    vaes: dict[str, torch.nn.Module] = {}
    for device in torch_devices:
        key = str(device)
        if key in transformers:
            continue  # CPU virtual devices share the one CPU model
        if device == first:
            transformers[key], vaes[key] = pipeline.transformer, pipeline.vae
        else:
            transformers[key], vaes[key] = replicate(pipeline.transformer, device), replicate(pipeline.vae, device)
        adapter.install_attention(transformers[key])
    return ModelRuntime(
        name=name, pipeline=pipeline, adapter=adapter, devices=devices, dtype=dtype,
        default_steps=default_steps, default_guidance=default_guidance, transformers=transformers, vaes=vaes,
        encode_device=first,
    )
