"""ModelRuntime: one loaded model on its devices, and `load_runtime`, which builds it from a preset name
or a local diffusers directory.

Devices are strings ("cuda:0", "cpu:1"). GPUs each get their own replica of the transformer and the
VAE (copied from the first device, so every replica holds the same weights); CPU virtual devices all
share the one CPU model, unless `replica_per_device` (LoRA adapters are served: each device fuses its
own group's adapters into its weights, model/lora.py) gives each its own transformer. The text encoders
live on the first device only.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from tetri_engine.model import fp8 as fp8_module
from tetri_engine.model import patch_vae
from tetri_engine.model.adapter import ModelAdapter, PreparedRequest
from tetri_engine.model.attention import AttentionChoice, choose_backend
from tetri_engine.model.compile import CompiledBlocks, transformer_blocks
from tetri_engine.model.flux import FluxAdapter
from tetri_engine.model.presets import PRESETS, Preset, build_random_pipeline, build_tiny_pipeline, default_dtype
from tetri_engine.model.sd3 import SD3Adapter
from tetri_engine.model.ulysses import AttentionOptions
from tetri_engine.request import SizeRule

log = logging.getLogger("tetri_engine.model")

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
    """The activation dtype of `dtype` on `device` ("fp8": that of "auto", its GEMMs aside)."""
    return resolve_precision(dtype, device)[0]


def resolve_precision(dtype: str | torch.dtype, device: torch.device) -> tuple[torch.dtype, bool]:
    """(activation dtype, float8 GEMMs in the blocks) of a dtype option."""
    if isinstance(dtype, torch.dtype):
        return dtype, False
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype in ("auto", "fp8"):
        return (torch.bfloat16 if device.type == "cuda" else torch.float32), dtype == "fp8"
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: expected 'auto', 'bf16', 'fp16', 'fp32' or 'fp8'")
    return names[dtype], False


@dataclass
class ModelRuntime:
    """A model ready to run on `devices`. What the executor reads from it (and passes on to the engine):

    default_steps, default_guidance, num_heads, patch_px (16: image pixels per token side), size_rule
    (the sizes the model can make), parallel_methods (what the family offers and this model supports),
    name, family ("flux" | "sd3"), dtype, devices. Everything that depends on the family is the adapter's.
    """

    name: str
    pipeline: Any  # the diffusers pipeline; its transformer/VAE are the first device's replicas
    adapter: ModelAdapter
    devices: list[str]
    dtype: torch.dtype
    default_steps: int
    default_guidance: float
    transformers: dict[str, torch.nn.Module]  # str(torch device), or a CPU virtual device's own name -> replica
    vaes: dict[str, torch.nn.Module]
    encode_device: torch.device
    precision: str = ""  # "bfloat16", "float32", ... or "fp8" (float8 GEMMs in the blocks, `dtype` elsewhere)
    attention: AttentionChoice | None = None  # the attention kernel and why (model/attention.py)
    compiled: CompiledBlocks | None = None  # the compiled blocks (model/compile.py), None: eager
    fp8_linears: int = 0  # linears running as float8 GEMMs, over all replicas

    def __post_init__(self) -> None:
        self.precision = self.precision or str(self.dtype).replace("torch.", "")

    def compiling(self):
        """Context in which compiled blocks may compile new shapes (start-up warm-up, profiling); a
        no-op for an eager model. Outside it, a shape not compiled yet runs eagerly."""
        return self.compiled.compiling() if self.compiled is not None else contextlib.nullcontext()

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

    @property
    def parallel_methods(self) -> frozenset[str]:
        """The adapter's methods ("ulysses", "cfg", "patch_vae"), less a patch decode this VAE cannot run."""
        methods = set(self.adapter.parallel_methods)
        if not all(patch_vae.supported(vae) for vae in self.vaes.values()):
            methods.discard("patch_vae")
        return frozenset(methods)

    def torch_device(self, device_index: int) -> torch.device:
        return torch_device(self.devices[device_index])

    def transformer_on(self, device: torch.device | str) -> torch.nn.Module:
        """The replica of a torch device, or of a device name ("cpu:1": its own replica if it has one)."""
        replica = self.transformers.get(str(device))
        return replica if replica is not None else self.transformers[str(torch_device(str(device)))]

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


class _Source(NamedTuple):
    pipeline: Any
    class_name: str
    name: str
    text_tokens: int
    random_text: dict[str, tuple[int, ...]] | None
    default_steps: int
    default_guidance: float


def _load_pipeline(name_or_path: str, first: torch.device, dtype: torch.dtype, seed: int) -> _Source:
    """A preset built here, or a local diffusers directory, on the first device in `dtype`."""
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
        return _Source(pipeline, preset.pipeline_class, preset.name, preset.text_tokens, preset.random_text,
                       preset.default_steps, preset.default_guidance)
    if os.path.isdir(name_or_path):
        pipeline, class_name = load_local_pipeline(name_or_path, dtype)
        pipeline = pipeline.to(first)
        steps, guidance = ADAPTERS[class_name].local_defaults(pipeline)
        return _Source(pipeline, class_name, os.path.basename(os.path.normpath(name_or_path)),
                       ADAPTERS[class_name].local_text_tokens(pipeline), None, steps, guidance)
    raise ValueError(f"unknown model {name_or_path!r}: expected a preset ({', '.join(PRESETS)}) or a local "
                     f"diffusers directory")


def load_runtime(name_or_path: str = "tiny", devices: list[str] | None = None, dtype: str | torch.dtype = "auto",
                 seed: int = 0, *, attention: str = "auto", ulysses_chunks: int = 1, compile: bool = False,
                 compile_backend: str | Callable = "inductor", cache_dir: str | None = None,
                 replica_per_device: bool = False) -> ModelRuntime:
    """Load a model for `devices`.

    name_or_path: a preset ("tiny", "tiny-sd3", "flux-dev", "flux-schnell", "sd3-medium") or a local
    diffusers directory of a FluxPipeline or StableDiffusion3Pipeline (local files only).
    devices: ["cuda:0", ...] or virtual CPU devices ["cpu:0", ...] (default ["cpu:0"]); one kind only.
    dtype: "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16", "fp32", or "fp8": float8 GEMMs in the
    transformer blocks (model/fp8.py), activations bf16 on GPU, fp32 on CPU. seed: random weights of presets.
    attention: the attention kernel (model/attention.py: "auto" probes the GPU's and keeps the fastest
    that agrees with the reference). ulysses_chunks: head chunks per exchange at degree > 1
    (model/ulysses.py). compile: torch.compile the transformer blocks (model/compile.py) with
    `compile_backend`; with inductor only on GPUs (on CPU it is skipped, saying so in the log);
    cache_dir: where inductor caches (`cache_dir`/inductor). replica_per_device: every device its own
    transformer, CPU virtual devices too (LoRA fuses adapters per device; GPUs always have their own).
    """
    # The pipelines warn with the cut-off part of every long prompt: client text must not reach the logs.
    logging.getLogger("diffusers.pipelines").setLevel(logging.ERROR)
    devices = list(devices or ["cpu:0"])
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct, got {devices}")
    torch_devices = [torch_device(d) for d in devices]
    if len({d.type for d in torch_devices}) != 1:
        raise ValueError(f"devices must be all GPUs or all virtual CPU devices, got {devices}")
    if not isinstance(ulysses_chunks, int) or ulysses_chunks < 1:
        raise ValueError(f"ulysses_chunks={ulysses_chunks!r} must be an integer >= 1")
    first = torch_devices[0]
    dtype, fp8 = resolve_precision(dtype, first)
    if fp8:
        fp8_module.check_support(first, dtype)

    source = _load_pipeline(name_or_path, first, dtype, seed)
    _check_scheduler(source.pipeline)
    config = source.pipeline.transformer.config
    choice = choose_backend(attention, first, dtype, int(config.num_attention_heads), int(config.attention_head_dim))
    log.info("%s: %s", source.name, choice.describe())
    adapter = ADAPTERS[source.class_name](source.pipeline, text_tokens=source.text_tokens,
                                          random_text=source.random_text,
                                          attention=AttentionOptions(choice.backend, ulysses_chunks))
    transformers, vaes = _replicas(source.pipeline, adapter, devices, replica_per_device)
    # After the replicas are made (they copy the bf16 weights), each replica's own linears go float8.
    fp8_linears = sum(fp8_module.convert_linears(transformer_blocks(t)) for t in transformers.values()) if fp8 else 0
    compiled = _compile(list(transformers.values()), compile, compile_backend, first, cache_dir, source.name)
    return ModelRuntime(
        name=source.name, pipeline=source.pipeline, adapter=adapter, devices=devices, dtype=dtype,
        default_steps=source.default_steps, default_guidance=source.default_guidance, transformers=transformers,
        vaes=vaes, encode_device=first, precision="fp8" if fp8 else str(dtype).replace("torch.", ""),
        attention=choice, compiled=compiled, fp8_linears=fp8_linears,
    )


def _replicas(pipeline: Any, adapter: ModelAdapter, devices: list[str],
              replica_per_device: bool) -> tuple[dict[str, torch.nn.Module], dict[str, torch.nn.Module]]:
    """The transformer and VAE of each device (see the module docstring), the first device's the pipeline's own,
    with the adapter's attention (and patch-parallel VAE) installed."""
    transformers: dict[str, torch.nn.Module] = {}
    vaes: dict[str, torch.nn.Module] = {}
    first = torch_device(devices[0])
    for name in devices:
        device = torch_device(name)
        key = str(device)
        if key in transformers:  # a CPU virtual device after the first
            if replica_per_device:
                transformers[name] = replicate(pipeline.transformer, device)
                adapter.install_attention(transformers[name])
            continue  # (else they share the one CPU model)
        if device == first:
            transformers[key], vaes[key] = pipeline.transformer, pipeline.vae
        else:
            transformers[key] = replicate(pipeline.transformer, device)
            vaes[key] = replicate(pipeline.vae, device)
        adapter.install_attention(transformers[key])
        if "patch_vae" in adapter.parallel_methods:
            patch_vae.install(vaes[key])
    return transformers, vaes


def _compile(transformers: list[torch.nn.Module], compile: bool, backend: str | Callable, first: torch.device,
             cache_dir: str | None, name: str) -> CompiledBlocks | None:
    """The runtime's CompiledBlocks, or None: not asked, or inductor on CPU devices (GPU only here)."""
    if not compile:
        return None
    if backend == "inductor" and first.type != "cuda":
        log.info("%s: torch.compile is for GPU runs; CPU devices run the blocks eagerly", name)
        return None
    compiled = CompiledBlocks(transformers, backend=backend, cache_dir=cache_dir)
    log.info("%s: %d transformer blocks compiled regionally (torch.compile, backend %s, inductor cache %s); "
             "shapes compile at warm-up only", name, len(compiled.blocks), getattr(backend, "__name__", backend),
             compiled.cache_dir or "-")
    return compiled
