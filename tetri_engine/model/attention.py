"""Which attention kernel the model runs, chosen once when it is loaded, and the call that runs it.

On an H200 the kernel behind scaled-dot-product attention is the largest single lever at large
images (bench/RESULTS.md, issue 17: a FLUX forward at 2048x2048 takes 1119 ms with PyTorch's flash
kernel, 865 ms with cuDNN's). `choose_backend` settles it at load time:

    auto       GPU: time cuDNN, flash and memory-efficient attention on a probe of the model's own head
               shape, keep those whose output agrees with the math reference (`AGREE_REL_L2`), and use
               the fastest; CPU: "sdpa"
    sdpa       torch.nn.functional.scaled_dot_product_attention, PyTorch picking per call
    cudnn | flash | efficient | math    that kernel, always (checked on the probe first)

`attend` then calls the chosen kernel's ATen op directly instead of switching SDPA's backend flags
(`torch.nn.attention.sdpa_kernel`): those flags are process-wide, and the executor's threads run
forwards at the same time, so entering and leaving them around each call would race. Should a
direct op refuse a shape the probe did not cover, the call falls back to PyTorch's own pick.

FlashAttention-3 is not a candidate: no installable wheel exists for torch 2.11 / CUDA 13 / Python
3.12 (PyPI has no flash-attn-3 files and only a source distribution of flash-attn 2); FlashAttention-4
(flash-attn-4, CuTe DSL, with a Hopper forward) needs nvidia-cutlass-dsl, whose CUDA 13 library wheel
alone is 92 MB (checked with `pip download`, 2026-12-04).
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tetri_engine.request import StrEnum

log = logging.getLogger("tetri_engine.model")

# Relative L2 distance from the float32 math reference within which a kernel agrees (bf16 rounding of
# the inputs and the output is ~4e-3; fused kernels measured 3e-3..6e-3 on the H200).
AGREE_REL_L2 = 2e-2
PROBE_TOKENS = 4096 + 512  # timing probe: FLUX at 1024x1024 (image + text tokens)
CHECK_TOKENS = 1024  # agreement probe (the float32 reference holds tokens^2 scores per head)


class AttentionBackend(StrEnum):
    AUTO = "auto"
    SDPA = "sdpa"
    CUDNN = "cudnn"
    FLASH = "flash"
    EFFICIENT = "efficient"
    MATH = "math"


GPU_KERNELS = (AttentionBackend.CUDNN, AttentionBackend.FLASH, AttentionBackend.EFFICIENT)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Attention of [B, H, S, D] tensors with `backend`'s kernel -> [B, H, S, D]."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(query, key, value)
    try:
        return _kernel(query, key, value, backend)
    except RuntimeError:  # a shape the kernel does not take (the probe checked the model's usual ones)
        return F.scaled_dot_product_attention(query, key, value)


def _kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str) -> torch.Tensor:
    aten = torch.ops.aten
    if backend == "cudnn":
        return aten._scaled_dot_product_cudnn_attention(query, key, value, None, False)[0]
    if backend == "flash":
        return aten._scaled_dot_product_flash_attention(query, key, value)[0]
    if backend == "efficient":
        return aten._scaled_dot_product_efficient_attention(query, key, value, None, False)[0]
    if backend == "math":
        return aten._scaled_dot_product_attention_math(query, key, value)[0]
    raise ValueError(f"unknown attention backend {backend!r}")


@dataclass
class AttentionChoice:
    """What `choose_backend` decided and why: per probed kernel its median ms, or why it was left out."""

    backend: str
    requested: str
    probe_ms: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        timed = ", ".join(f"{name} {ms:.3f} ms" for name, ms in sorted(self.probe_ms.items(), key=lambda kv: kv[1]))
        left_out = "; ".join(f"{name}: {why}" for name, why in self.rejected.items())
        text = f"attention kernel {self.backend} (asked: {self.requested})"
        if timed:
            text += f"; probe {timed}"
        if left_out:
            text += f"; left out: {left_out}"
        return text


def pick_fastest(probe_ms: dict[str, float], rejected: dict[str, str]) -> str:
    """The fastest kernel that ran and agreed with the reference; "sdpa" when none did."""
    usable = {name: ms for name, ms in probe_ms.items() if name not in rejected}
    return min(usable, key=usable.get) if usable else AttentionBackend.SDPA.value


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype, num_heads: int,
                   head_dim: int) -> AttentionChoice:
    """Settle the attention kernel for a model with `num_heads` heads of `head_dim` on `device`.

    ValueError: an unknown name, a GPU kernel asked for on the CPU, or an asked-for kernel that fails
    or disagrees with the reference on the probe."""
    requested = AttentionBackend.parse(requested, "attention").value
    if device.type != "cuda":
        if requested in {k.value for k in GPU_KERNELS}:
            raise ValueError(f"attention={requested} is a GPU kernel; on CPU devices use 'auto', 'sdpa' or 'math'")
        backend = AttentionBackend.SDPA.value if requested == "auto" else requested
        return AttentionChoice(backend, requested)
    if requested in ("sdpa", "math"):
        return AttentionChoice(requested, requested)
    candidates = [k.value for k in GPU_KERNELS] if requested == "auto" else [requested]
    choice = AttentionChoice("", requested)
    for name in candidates:
        problem = _disagreement(name, device, dtype, num_heads, head_dim)
        if problem is None:
            choice.probe_ms[name] = _time_ms(name, device, dtype, num_heads, head_dim)
        else:
            choice.rejected[name] = problem
    if requested != "auto" and requested in choice.rejected:
        raise ValueError(f"attention={requested} cannot be used here: {choice.rejected[requested]}")
    choice.backend = pick_fastest(choice.probe_ms, choice.rejected)
    return choice


def _probe(device: torch.device, dtype: torch.dtype, heads: int, tokens: int, head_dim: int,
           packed: bool = False) -> list[torch.Tensor]:
    """q, k, v [1, heads, tokens, head_dim] laid out as the model's attention hands them over: views of
    [1, tokens, heads, head_dim] (degree 1), or of one [1, tokens, 3, heads, head_dim] buffer (`packed`:
    what a Ulysses exchange receives)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    if packed:
        qkv = torch.randn(1, tokens, 3, heads, head_dim, generator=generator).to(device, dtype)
        return [t.transpose(1, 2) for t in qkv.unbind(2)]
    return [torch.randn(1, tokens, heads, head_dim, generator=generator).to(device, dtype).transpose(1, 2)
            for _ in range(3)]


def _disagreement(name: str, device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> str | None:
    """None when kernel `name` runs and agrees with float32 math on small probes of both layouts, else
    why not."""
    for packed in (False, True):
        q, k, v = _probe(device, dtype, min(heads, 4), CHECK_TOKENS, head_dim, packed)
        try:
            out = _kernel(q, k, v, name).float()
        except RuntimeError as exc:
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        reference = _kernel(q.float(), k.float(), v.float(), "math")
        rel_l2 = ((out - reference).norm() / reference.norm()).item()
        if not rel_l2 <= AGREE_REL_L2:  # (NaN included)
            return (f"differs from the math reference by {rel_l2:.2e} relative L2 (limit {AGREE_REL_L2:.0e}"
                    f"{', packed q/k/v' if packed else ''})")
    return None


def _time_ms(name: str, device: torch.device, dtype: torch.dtype, heads: int, head_dim: int,
             warmup: int = 2, repeats: int = 7) -> float:
    q, k, v = _probe(device, dtype, heads, PROBE_TOKENS, head_dim)
    with torch.cuda.device(device):
        for _ in range(warmup):
            _kernel(q, k, v, name)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _kernel(q, k, v, name)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)
