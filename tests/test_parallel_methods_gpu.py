"""The parallel layouts (issue 16) on two GPUs: the CFG-parallel step as a CUDA graph launched by the native
loop (its exchange captured with the forward) gives the eager step's latents, and both give degree 1's;
the patch-parallel decode gives the one-GPU image. tiny-sd3 in float32, so that only rounding differs.
Skipped without two GPUs (tests/conftest.py); `bench/runtime_check.py` measures sd3-medium in bf16."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tetri_engine import ops
from tetri_engine.executor import Executor
from tetri_engine.model import load_runtime
from tetri_engine.request import GenerationRequest

DEVICES = ["cuda:0", "cuda:1"]


def run(ex, rid, devices, cfg, decode_degree=1, steps=4):
    ex.submit_encode(rid, GenerationRequest(prompt="a lighthouse", width=128, height=96, seed=3,
                                            num_inference_steps=steps)).result()
    result = ex.submit_steps([rid], devices, steps, cfg=cfg, decode_after=True, decode_degree=decode_degree).result()
    assert result[rid].error is None, result[rid].error
    return ex.latent(rid), np.asarray(result[rid].image, dtype=np.int16)


@pytest.mark.multi_gpu
def test_cfg_parallel_graphs_eager_and_degree_1_agree_and_the_patch_decode_too():
    runtime = load_runtime("tiny-sd3", DEVICES, dtype="fp32")
    cache = ops.CommCache()
    with Executor(runtime, DEVICES, cache, cuda_graphs=True) as graphs, \
            Executor(runtime, DEVICES, cache, cuda_graphs=False) as eager:
        reference, image_1 = run(eager, "one", (0,), 1)
        plain, image_eager = run(eager, "cfg", (0, 1), 2, decode_degree=2)
        graphed, image_graph = run(graphs, "cfg", (0, 1), 2, decode_degree=2)
        stats = graphs.graph_stats()
    assert stats["captures"] >= 1 and stats["native_launches"] >= 1 and not stats["failures"]
    torch.testing.assert_close(graphed, plain, rtol=0, atol=1e-4)
    torch.testing.assert_close(plain, reference, rtol=0, atol=1e-4)
    assert np.abs(image_eager - image_1).max() <= 1 and np.abs(image_graph - image_1).max() <= 1
