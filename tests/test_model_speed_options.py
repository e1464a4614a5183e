"""The model's speed options on the CPU (issue 17): float8 GEMMs (`dtype="fp8"`), the attention kernel
choice, and Ulysses exchanges split into head chunks. Their speed is measured on GPUs (bench/); here,
that each computes what it should."""
from __future__ import annotations

import math

import pytest
import torch

from tetri_engine import ops
from tetri_engine.executor import Executor
from tetri_engine.model import load_runtime, verify
from tetri_engine.model.attention import AttentionChoice, attend, choose_backend, pick_fastest
from tetri_engine.model.fp8 import E4M3_MAX, Float8Linear, convert_linears, quantize_rowwise
from tetri_engine.model.ulysses import SPContext, effective_chunks, exchange_shapes, sequence_parallel
from tetri_engine.request import GenerationRequest

DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


def _scaled_mm_on_cpu() -> bool:
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError):
        return False


needs_cpu_fp8 = pytest.mark.skipif(not _scaled_mm_on_cpu(),
                                   reason="this torch has no CPU torch._scaled_mm (row-wise); the GPU tests cover it")


# --- float8 ------------------------------------------------------------------------------------------------

def test_rowwise_quantization_keeps_e4m3_precision():
    """Each row's largest magnitude maps to 448; every element that is a normal e4m3 number after
    scaling comes back within e4m3's rounding (3 mantissa bits: half a step, 1/16 relative)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 3, 64).unsqueeze(1)  # rows of very different scale
    x[5] = 0.0
    q, scale = quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.allclose(q.float().abs().amax(dim=1)[x.abs().amax(dim=1) > 0], torch.tensor(E4M3_MAX))
    back = q.float() * scale
    normal = (x.abs() / scale) >= 2.0 ** -6
    rel = ((back - x).abs() / x.abs())[normal]
    assert rel.max().item() <= 1 / 16 + 1e-6
    assert torch.equal(back[5], torch.zeros(256))  # an all-zero row stays zero (no division by zero)


@needs_cpu_fp8
def test_float8_linear_is_the_dequantized_product():
    """The float8 GEMM equals, to float32 rounding, the product of the dequantized operands; and lies
    within e4m3's expected error of the float32 layer it replaced."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(3, 40, 256)
    layer = Float8Linear(linear)
    out = layer(x)
    xq, sx = quantize_rowwise(x.reshape(-1, 256))
    reference = (xq.float() * sx) @ layer.dequantized_weight().t() + linear.bias
    torch.testing.assert_close(out, reference.reshape(3, 40, 128), rtol=1e-5, atol=1e-5)
    exact = linear(x)
    rel_l2 = ((out - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel_l2 < 5e-2  # float8 is not free, and not far either (~2.5% per operand, uncorrelated)


def test_convert_linears_swaps_the_blocks_linears_only():
    runtime = load_runtime("tiny", ["cpu:0"])
    transformer = runtime.transformer_on(torch.device("cpu"))
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    linears = sum(isinstance(m, torch.nn.Linear) for b in blocks for m in b.modules())
    assert convert_linears(blocks) == linears > 0
    assert not any(isinstance(m, torch.nn.Linear) for b in blocks for m in b.modules())
    assert isinstance(transformer.proj_out, torch.nn.Linear)  # outside the blocks: untouched
    with pytest.raises(ValueError, match="divisible by 16"):
        Float8Linear(torch.nn.Linear(24, 16))


def psnr_db(test: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (test.float() - reference.float()).pow(2).mean().item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


@needs_cpu_fp8
def test_fp8_runtime_denoises_close_to_full_precision():
    """dtype="fp8" on the CPU runs the real float8 arithmetic: the executor reports it, and a 4-step
    denoise at degree 2 stays close to the float32 one of the same seed (and to fp8 at degree 1)."""
    fp32 = load_runtime("tiny", DEVICES[:2])
    fp8 = load_runtime("tiny", DEVICES[:2], dtype="fp8")
    assert fp8.precision == "fp8" and fp8.dtype == torch.float32 and fp8.fp8_linears > 0
    latents = {}
    for name, runtime, group in (("fp32", fp32, (0, 1)), ("fp8", fp8, (0, 1)), ("fp8-1", fp8, (0,))):
        with Executor(runtime) as ex:
            assert ex.model.dtype == ("fp8" if runtime is fp8 else "float32")
            ex.submit_encode("r", GenerationRequest("a kite", 64, 48, 4, seed=5)).result()
            assert ex.submit_steps(["r"], group, 4).result()["r"].error is None
            latents[name] = ex.latent("r")
    assert 30 < psnr_db(latents["fp8"], latents["fp32"]) < 120  # close (68 dB here), and yet not the same
    assert psnr_db(latents["fp8"], latents["fp8-1"]) > 120  # the degree changes float32 rounding only (159 dB)


# --- the attention kernel ----------------------------------------------------------------------------------

def test_the_fastest_agreeing_kernel_wins():
    assert pick_fastest({"cudnn": 1.2, "flash": 1.6, "efficient": 2.9}, {}) == "cudnn"
    assert pick_fastest({"cudnn": 1.2, "flash": 1.6}, {"cudnn": "differs from the math reference"}) == "flash"
    assert pick_fastest({}, {"cudnn": "RuntimeError", "flash": "RuntimeError"}) == "sdpa"


def test_attention_choice_on_the_cpu():
    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu, torch.float32, 4, 16).backend == "sdpa"
    assert choose_backend("math", cpu, torch.float32, 4, 16).backend == "math"
    with pytest.raises(ValueError, match="GPU kernel"):
        choose_backend("cudnn", cpu, torch.float32, 4, 16)
    with pytest.raises(ValueError, match="attention must be"):
        choose_backend("fa9", cpu, torch.float32, 4, 16)
    text = AttentionChoice("cudnn", "auto", {"cudnn": 1.0, "flash": 2.0}, {"efficient": "too slow"}).describe()
    assert "cudnn 1.000 ms" in text and "efficient: too slow" in text


def test_every_cpu_kernel_computes_attention():
    q, k, v = (torch.randn(2, 4, 33, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    for backend in ("sdpa", "math"):
        torch.testing.assert_close(attend(q, k, v, backend), expected, rtol=1e-5, atol=1e-5)


def test_runtime_runs_with_the_chosen_kernel():
    runtime = load_runtime("tiny", DEVICES[:2], attention="math")
    assert runtime.attention.backend == "math" and runtime.adapter.attention.backend == "math"
    reference = load_runtime("tiny", DEVICES[:2])
    p = reference.prepare(prompt="a lighthouse", width=48, height=80, seed=3)
    torch.testing.assert_close(verify.sp_velocity(runtime, p, DEVICES[:2]), verify.sp_velocity(reference, p, DEVICES[:1]))


# --- Ulysses head chunks -----------------------------------------------------------------------------------

def test_effective_chunks_divide_the_local_heads():
    assert [effective_chunks(4, h) for h in (12, 6, 3, 1)] == [4, 3, 3, 1]
    assert effective_chunks(1, 12) == 1 and effective_chunks(100, 12) == 12


@pytest.mark.parametrize("model", ["tiny", "tiny-sd3"])
@pytest.mark.parametrize("degree", [2, 4])
def test_chunked_exchanges_give_the_same_output(model, degree):
    """Split into head chunks (2 at degree 2; 1 head a rank at degree 4: one chunk) the sequence-parallel
    forward still equals degree 1, with padded streams (15 image tokens; SD3's 109 text tokens)."""
    chunked = load_runtime(model, DEVICES, ulysses_chunks=2)
    plain = load_runtime(model, DEVICES)
    p = plain.prepare(prompt="a lighthouse", width=48, height=80, seed=3)
    cache = ops.CommCache(timeout_s=30.0)
    torch.testing.assert_close(verify.sp_velocity(chunked, p, DEVICES[:degree], cache),
                               verify.sp_velocity(plain, p, DEVICES[:1]))


def test_exchange_shapes_are_the_chunked_forwards_exchanges():
    """What `catch_up` would replay is exactly what a chunked forward exchanges, in order."""
    runtime = load_runtime("tiny-sd3", DEVICES, ulysses_chunks=2)  # SD3.5 block: two attention calls
    p = runtime.prepare(prompt="a lighthouse", width=48, height=80, seed=3)
    comm = ops.CommCache(timeout_s=30.0).get(tuple(DEVICES[:2]))
    lengths = {"image": p.image_tokens, "text": p.text_tokens}
    logs = [None, None]

    def rank(r: int) -> None:
        context = SPContext(comm, r, 2, lengths)
        with torch.no_grad(), sequence_parallel(context):
            inputs = runtime.adapter.rank_inputs([p], torch.device("cpu"), r, 2)
            shard = ops.shard(p.noise, 2, DEVICES[:2])[r]
            runtime.adapter.velocity(runtime.transformer_on(torch.device("cpu")), [shard], [p], [0], inputs)
        logs[r] = [shape for shape, _ in context.exchange_log]

    import threading

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = exchange_shapes(SPContext(None, 0, 2, lengths), runtime.adapter.exchange_plan(), p.rows,
                               runtime.num_heads, runtime.adapter.head_dim)
    assert logs[0] == logs[1] == expected
    assert len(expected) == 4 * len(runtime.adapter.exchange_plan())  # 2 chunks x (q/k/v, output)
