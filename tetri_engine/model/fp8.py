"""FP8 GEMMs for the transformer blocks (`dtype="fp8"`): every nn.Linear inside the blocks becomes a
`Float8Linear`, a dynamic float8 (e4m3) GEMM with row-wise scales through `torch._scaled_mm`;
activations, norms, attention and everything outside the blocks stay in bf16.

    y = (x_q * s_x) (W_q * s_W)^T + b       x_q = x / s_x, s_x = amax(|x| over a token) / 448, per token
                                            W_q = W / s_W, s_W = amax(|W| over an output channel) / 448

The weight is quantized once at load (halving its memory), the activation at every call. torchao's
float8 training/inference does the same; it is not used because its C++ parts are bound to one
torch version and the GPU machines have none installed.

Speed: the per-token quantization is a reduction and a cast that only pay when torch.compile fuses
them into the producing kernel; eager, FP8 is slower than bf16 (bench/RESULTS.md, issue 17: 205 ms
vs 171 ms per 1024x1024 FLUX step; compiled, 105.5 vs 136.1 ms). Quality: bench/fp8_quality.py.

`torch._scaled_mm` with row-wise scales runs on GPUs of compute capability >= 8.9 and, in recent
torch, on the CPU (slowly: a reference path that lets the tests run the real arithmetic).
"""
from __future__ import annotations

from typing import Iterable

import torch

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
FP8 = torch.float8_e4m3fn


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (float8 [M, K], float32 scale [M, 1]) with x ~= x_q * scale, each row's largest
    magnitude mapped to E4M3_MAX (an all-zero row gets a tiny scale and stays zero)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(FP8), scale


class Float8Linear(torch.nn.Module):
    """y = x W^T + b with x and W in float8 e4m3: x scaled per token (at each call), W per output
    channel (once, here). Output in x's dtype."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"float8 GEMMs need in/out features divisible by 16, got {linear.in_features} -> "
                             f"{linear.out_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight_fp8, scale = quantize_rowwise(linear.weight.detach())
        self.register_buffer("weight_fp8", weight_fp8)  # [N, K] row-major: `.t()` is the column-major B
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, N]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        x_fp8, x_scale = quantize_rowwise(rows)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               bias=bias, out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32 (tests, error analysis)."""
        return self.weight_fp8.float() * self.weight_scale.t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"


def convert_linears(modules: Iterable[torch.nn.Module]) -> int:
    """Swap every nn.Linear inside `modules` (the transformer blocks) for a Float8Linear, where its
    shape allows (features divisible by 16). Returns how many were swapped."""
    count = 0
    for root in modules:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if (type(child) is torch.nn.Linear and child.in_features % 16 == 0
                        and child.out_features % 16 == 0):
                    setattr(parent, name, Float8Linear(child))
                    count += 1
    return count


def check_support(device: torch.device, dtype: torch.dtype) -> None:
    """ValueError, saying why, when row-wise scaled float8 GEMMs cannot run on `device` in `dtype`."""
    try:
        x = torch.ones(16, 32, device=device, dtype=dtype)
        layer = Float8Linear(torch.nn.Linear(32, 16, device=device, dtype=dtype))
        layer(x)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        raise ValueError(f"dtype=fp8 needs float8 GEMMs with row-wise scales (torch._scaled_mm), which "
                         f"torch {torch.__version__} cannot run on {where}: "
                         f"{str(exc).splitlines()[0][:200]}") from None
