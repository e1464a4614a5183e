#!/usr/bin/env python3
"""How fast can one denoising step go on this GPU, and which change buys what? (issue 17)

One bare diffusers transformer forward (= one step) of a full-size architecture with random weights,
degree 1, on one GPU, replayed from a CUDA graph as the engine's executor does, in these variants:

  eager     the blocks as diffusers runs them (the engine today)
  compiled  regional torch.compile: each transformer block compiled (one graph per block class and
            shape, reused by every block of that class), then captured in the CUDA graph
  fp8       every nn.Linear of the blocks as a dynamic float8 (e4m3) GEMM with row-wise scales
            (torch._scaled_mm: per-token activation scales, per-output-channel weight scales), bf16 out:
            the engine's own `tetri_engine.model.fp8.Float8Linear` (dtype="fp8")
  fp8+compiled

each with the SDPA backends the machine offers (flash, cudnn, efficient). For every variant: the
median step time, achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode on one forward), the
fraction of the measured bf16 matmul peak (fp8's peak printed apart), the compile time, and how far its output is from
the eager bf16 output on the same inputs (relative L2, max |d|, PSNR over the output's range).

  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    python bench/step_variants.py --model flux-dev --sizes 1024,2048 --output $OUT/step-variants.jsonl

GPU only. Prints a table at the end; one JSON object per line in --output.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tetri_engine.model.compile import transformer_blocks  # noqa: E402
from tetri_engine.model.fp8 import convert_linears  # noqa: E402
from tetri_engine.model.presets import PRESETS, build_random_pipeline  # noqa: E402

BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def matmul_peak_tflops(device: torch.device, fp8: bool) -> float:
    """Median of 20 products 8192^3 on random data (bf16, or float8 e4m3 with row-wise scales)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    if fp8:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        sa = torch.ones(n, 1, device=device)
        sb = torch.ones(1, n, device=device)
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        fn = lambda: a @ b  # noqa: E731
    return 2 * n ** 3 / time_ms(fn, warmup=3, repeats=20) / 1e9


def time_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def blocks_of(transformer) -> list[torch.nn.Module]:
    return transformer_blocks(transformer)


def to_fp8(transformer) -> int:
    """Swap every nn.Linear inside the blocks for the engine's Float8Linear; returns how many."""
    return convert_linears(transformer_blocks(transformer))


def flux_inputs(preset, size: int, device, dtype):
    from tetri_engine.model.flux import latent_image_ids

    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = (size // 16) ** 2
    text = preset.random_text["prompt_embeds"]
    return dict(
        hidden_states=torch.randn(1, tokens, 64, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, *text, generator=g).to(device, dtype),
        pooled_projections=torch.randn(1, *preset.random_text["pooled_prompt_embeds"], generator=g).to(device, dtype),
        timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
        guidance=torch.full((1,), 3.5, device=device, dtype=dtype) if preset.transformer.get("guidance_embeds") else None,
        txt_ids=torch.zeros(text[0], 3, device=device, dtype=dtype),
        img_ids=latent_image_ids(size // 8, size // 8, device, dtype),
        return_dict=False,
    )


def sd3_inputs(preset, size: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    return dict(
        hidden_states=torch.randn(2, 16, size // 8, size // 8, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(2, *preset.random_text["prompt_embeds"], generator=g).to(device, dtype),
        pooled_projections=torch.randn(2, *preset.random_text["pooled_prompt_embeds"], generator=g).to(device, dtype),
        timestep=torch.full((2,), 500.0, device=device, dtype=dtype),
        return_dict=False,
    )


def forward_flops(preset, size: int, dtype, make_inputs) -> int:
    """FLOPs of one forward, counted by FlopCounterMode on the meta device (no memory, no GPU time)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    transformer = build_random_pipeline(preset, meta, dtype).transformer
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        transformer(**make_inputs(preset, size, meta, dtype))
    return counter.get_total_flops()


def graphed(transformer, inputs):
    """Capture one forward in a CUDA graph (after warm-up on a side stream); returns (replay, output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            transformer(**inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = transformer(**inputs)[0]
    return graph.replay, out


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (out.float() - ref.float())
    rel = (d.norm() / ref.float().norm()).item()
    peak = (ref.float().max() - ref.float().min()).item()
    mse = d.pow(2).mean().item()
    return {"rel_l2": rel, "max_abs": d.abs().max().item(),
            "psnr_db": 10 * math.log10(peak ** 2 / mse) if mse > 0 else float("inf")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux-dev", choices=["flux-dev", "flux-schnell", "sd3-medium"])
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--variants", default="eager,compiled,fp8,fp8+compiled")
    parser.add_argument("--backends", default="flash,cudnn,efficient")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda:0")
    torch.cuda.set_device(device)
    preset = PRESETS[args.model]
    dtype = torch.bfloat16
    peak_bf16 = matmul_peak_tflops(device, fp8=False)
    peak_fp8 = matmul_peak_tflops(device, fp8=True)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}: matmul peak bf16 {peak_bf16:.0f}, "
          f"fp8 {peak_fp8:.0f} TFLOP/s", flush=True)
    out_file = open(args.output, "a") if args.output else None
    make_inputs = flux_inputs if preset.pipeline_class == "FluxPipeline" else sd3_inputs
    sizes = [int(s) for s in args.sizes.split(",")]
    flops = {size: forward_flops(preset, size, dtype, make_inputs) for size in sizes}
    refs: dict[tuple[int, str], torch.Tensor] = {}
    rows = []
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        transformer = build_random_pipeline(preset, device, dtype).transformer
        if "fp8" in variant:
            print(f"{variant}: {to_fp8(transformer)} linears in float8", flush=True)
        if "compiled" in variant:
            torch._dynamo.config.cache_size_limit = 64
            for block in blocks_of(transformer):
                block.compile(fullgraph=True, dynamic=False)
        for size in sizes:
            inputs = make_inputs(preset, size, device, dtype)
            for backend in args.backends.split(","):
                row = dict(model=args.model, size=size, variant=variant, backend=backend,
                           gpu=torch.cuda.get_device_name(device), torch=torch.__version__,
                           peak_bf16_tflops=peak_bf16, peak_fp8_tflops=peak_fp8)
                try:
                    with torch.inference_mode(), sdpa_kernel([getattr(SDPBackend, BACKENDS[backend])]):
                        t0 = time.perf_counter()
                        transformer(**inputs)  # compiles here for a compiled variant (once per shape)
                        torch.cuda.synchronize()
                        row["first_forward_s"] = time.perf_counter() - t0
                        replay, out = graphed(transformer, inputs)
                        row["step_ms"] = time_ms(replay, warmup=2, repeats=args.repeats)
                        if (size, backend) not in refs and variant == "eager":
                            refs[(size, backend)] = out.clone()
                        ref = refs.get((size, args.backends.split(",")[0]))
                        if ref is not None:
                            row.update(compare(out, ref))
                        del replay, out
                    row["tflops"] = flops[size] / row["step_ms"] / 1e9
                    row["of_peak"] = row["tflops"] / peak_bf16  # fp8 variants too: the same work, bf16's ceiling
                except Exception as exc:  # a backend the machine lacks, a capture that fails: say so, go on
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
                if out_file:
                    out_file.write(json.dumps(row) + "\n")
                    out_file.flush()
                torch.cuda.empty_cache()
        del transformer
        torch.cuda.empty_cache()
    print(f"\n{'size':>5} {'variant':<13} {'attn':<9} {'ms':>8} {'TFLOP/s':>8} {'peak%':>6} {'1st s':>7} "
          f"{'rel L2':>8} {'PSNR dB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['size']:>5} {r['variant']:<13} {r['backend']:<9} {r['error'][:70]}")
            continue
        print(f"{r['size']:>5} {r['variant']:<13} {r['backend']:<9} {r['step_ms']:>8.1f} {r['tflops']:>8.0f} "
              f"{100 * r['of_peak']:>5.0f}% {r['first_forward_s']:>7.1f} {r.get('rel_l2', float('nan')):>8.1e} "
              f"{r.get('psnr_db', float('nan')):>8.1f}")


if __name__ == "__main__":
    main()
