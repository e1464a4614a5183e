"""The speed options on GPUs (issue 17): the attention kernel choice, float8 GEMMs, inductor-compiled
blocks replayed from CUDA graphs, and chunked Ulysses exchanges on a side stream (two GPUs). Speed is
measured in bench/step_bench.py; these check that the fast paths compute what the plain ones do."""
from __future__ import annotations

import pytest
import torch

from tetri_engine.executor import Executor
from tetri_engine.executor.warmup import WarmupShape
from tetri_engine.model import load_runtime
from tetri_engine.model.attention import attend, choose_backend
from tetri_engine.model.fp8 import Float8Linear, quantize_rowwise
from tetri_engine.request import GenerationRequest

pytestmark = pytest.mark.gpu


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_the_chosen_attention_kernel_agrees_with_math():
    device = torch.device("cuda:0")
    choice = choose_backend("auto", device, torch.bfloat16, 24, 128)
    assert choice.backend in ("cudnn", "flash", "efficient"), choice.describe()
    assert choice.probe_ms[choice.backend] == min(choice.probe_ms.values())
    q, k, v = (torch.randn(1, 24, 1536, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    reference = attend(q.float(), k.float(), v.float(), "math")
    for name in choice.probe_ms:
        assert rel_l2(attend(q, k, v, name), reference) < 2e-2, name


def test_float8_linear_on_the_gpu_eager_and_compiled():
    device = torch.device("cuda:0")
    torch.manual_seed(0)
    linear = torch.nn.Linear(3072, 1536, device=device, dtype=torch.bfloat16)
    layer = Float8Linear(linear)
    x = torch.randn(2, 700, 3072, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        xq, sx = quantize_rowwise(x.reshape(-1, 3072))
        reference = (xq.float() * sx) @ layer.dequantized_weight().t() + linear.bias.float()
        assert rel_l2(out.reshape(-1, 1536), reference) < 1e-2  # bf16 output rounding
        assert rel_l2(out, linear(x)) < 5e-2
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x)
    assert rel_l2(compiled, out) < 1e-2


@pytest.fixture(scope="module")
def eager_tiny():
    with Executor(load_runtime("tiny", ["cuda:0"])) as ex:
        yield ex


def denoise(ex: Executor, group, width=64, height=64, steps=3, seed=2) -> torch.Tensor:
    rid = f"g-{width}x{height}-{group}"
    ex.submit_encode(rid, GenerationRequest("a ship", width, height, steps, seed=seed)).result()
    result = ex.submit_steps([rid], group, steps).result()
    assert result[rid].error is None, result[rid].error
    latent = ex.latent(rid)
    ex.release(rid)
    return latent.float()


def test_compiled_blocks_in_cuda_graphs_compile_at_warm_up_only(eager_tiny, tmp_path):
    runtime = load_runtime("tiny", ["cuda:0"], compile=True, cache_dir=str(tmp_path))
    assert runtime.compiled is not None
    with Executor(runtime) as ex:
        report = ex.warm_up_shapes([WarmupShape(64, 64, (0,))])
        assert report.failures == [] and report.compiled_graphs > 0 and report.graphs_captured == 1
        graphs = runtime.compiled.stats()["graphs"]
        for size in ((64, 64), (96, 64)):  # warmed: compiled, replayed; not warmed: eager (and captured)
            assert rel_l2(denoise(ex, (0,), *size), denoise(eager_tiny, (0,), *size)) < 2e-2
        assert runtime.compiled.stats()["graphs"] == graphs
        stats = ex.graph_stats()
        assert stats["capture_failures"] == 0 and stats["replays"] > 0, stats


@pytest.mark.multi_gpu
@pytest.mark.parametrize("compile", [False, True])
def test_chunked_exchanges_overlap_on_a_side_stream_and_agree(compile, tmp_path):
    devices = ["cuda:0", "cuda:1"]
    plain = load_runtime("tiny", devices)
    chunked = load_runtime("tiny", devices, ulysses_chunks=2, compile=compile, cache_dir=str(tmp_path))
    with Executor(plain) as a, Executor(chunked) as b:
        if compile:
            assert b.warm_up_shapes([WarmupShape(48, 80, (0, 1))]).failures == []
        assert b.graphs is not None  # the side stream's exchanges are captured in the CUDA graphs too
        chunked_latent = denoise(b, (0, 1), 48, 80)  # 15 tokens: padded shards
        assert rel_l2(chunked_latent, denoise(a, (0, 1), 48, 80)) < 2e-2
        assert rel_l2(chunked_latent, denoise(a, (0,), 48, 80)) < 2e-2
        assert b.graph_stats()["capture_failures"] == 0
