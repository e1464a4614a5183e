"""CUDA graphs of the denoising step (executor/cuda_graphs.py): graph replay gives the eager result, at
degree 1 and 2, across degree changes, padded shards, batches, eviction, and a capture that fails
(eager fallback, reported once); the native loop's launches give what the Python loop's replays give.
GPU tests; the CPU test only checks that CPU executors never use them."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tetri_engine import ops
from tetri_engine.executor import Executor
from tetri_engine.executor.options import StepOptions
from tetri_engine.model import load_runtime
from tetri_engine.model.presets import FLUX_DEV_TRANSFORMER, PRESETS
from tetri_engine.request import GenerationRequest

TWO = ["cuda:0", "cuda:1"]


def encode(ex, rid, width=256, height=256, seed=0, steps=6, **kwargs):
    ex.submit_encode(rid, GenerationRequest(prompt=f"prompt {rid}", width=width, height=height, seed=seed,
                                            num_inference_steps=steps, **kwargs)).result()


def run_schedule(runtime, devices, schedule, *, graphs, size=(256, 256), rids=("a",), **executor_kwargs):
    """Run `schedule` [(device_indices, steps), ...] for the requests `rids` (one batch) -> (latents, stats)."""
    with Executor(runtime, devices, ops.CommCache(), cuda_graphs=graphs, **executor_kwargs) as ex:
        for i, rid in enumerate(rids):
            encode(ex, rid, *size, seed=10 + i, steps=sum(n for _, n in schedule))
        for group, steps in schedule:
            result = ex.submit_steps(list(rids), group, steps).result()
            assert result.errors == {}, result.errors
        return {rid: ex.latent(rid).float() for rid in rids}, ex.graph_stats()


def assert_same(graph_latents, eager_latents, dtype):
    for rid, eager in eager_latents.items():
        graphed = graph_latents[rid]
        assert torch.isfinite(graphed).all()
        if torch.equal(graphed, eager):
            continue  # the same kernels on the same inputs: normally bit for bit
        # else within rounding of the dtype (a different cuBLAS algorithm on the capture stream)
        atol = (2e-2 if dtype != torch.float32 else 1e-4) * max(1.0, eager.abs().max().item())
        torch.testing.assert_close(graphed, eager, rtol=0, atol=atol)


def test_cpu_executors_never_use_graphs():
    runtime = load_runtime("tiny", ["cpu:0", "cpu:1"])
    with Executor(runtime, cuda_graphs=True) as ex:
        assert ex.graphs is None and ex.graph_stats() == {"enabled": False}


@pytest.mark.parametrize("degree", [1, 2])
def test_the_captured_step_is_the_eager_step(degree):
    """What a graph captures (`Graph.step`: the forward, the Euler update, the step index + 1, all on
    static buffers, the timestep and sigmas read at the step index held as tensor data), run eagerly
    on CPU ranks: the executor's eager steps, bit for bit, padded shards included (48x80: 15 tokens),
    across a reload of the buffers (`Graph.begin`) between two batches of steps."""
    import rank_threads

    from tetri_engine.executor.cuda_graphs import Graph, _StaticRequest
    from tetri_engine.model import SPContext
    from tetri_engine.model.ulysses import valid_tokens

    devices = ["cpu:0", "cpu:1"][:degree]
    runtime = load_runtime("tiny", devices)
    with Executor(runtime, devices) as ex:
        for rid in ("eager", "graph"):
            ex.submit_encode(rid, GenerationRequest(prompt="a boat", width=48, height=80, seed=3,
                                                    num_inference_steps=5)).result()
        assert ex.submit_steps(["eager"], tuple(range(degree)), 4).result().errors == {}
        reference = ex.latent("eager")
        prepared = ex.prepared("graph")
    cache = ops.CommCache()
    comm = cache.get(tuple(devices)) if degree > 1 else None
    shards = ops.shard(prepared.noise, degree, devices)
    lengths = {"image": prepared.image_tokens, "text": prepared.text_tokens}

    def rank(r):
        device = torch.device("cpu")
        inputs = runtime.adapter.rank_inputs([prepared], device, r, degree)
        graph = Graph(None, device, [shards[r].clone()], [_StaticRequest(prepared, device)],
                      {k: v.clone() for k, v in inputs.items()}, valid_tokens(prepared.image_tokens, degree, r))
        context = SPContext(comm, r, degree, lengths)
        transformer = runtime.transformer_on(device)
        graph.begin([shards[r]], [prepared], [0], inputs)
        for _ in range(3):
            graph.step(runtime.adapter, transformer, context)
        after_3 = graph.end()[0]
        graph.begin([after_3], [prepared], [3], inputs)
        graph.step(runtime.adapter, transformer, context)
        return graph.end()[0]

    out = rank_threads.run_ranks(rank, range(degree))
    torch.testing.assert_close(ops.gather(out, prepared.image_tokens), reference, rtol=0, atol=0)


# --- one GPU ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpu():
    return load_runtime("tiny", ["cuda:0"], dtype="fp32")


@pytest.mark.gpu
@pytest.mark.parametrize("size", [(256, 256), (48, 80)])
def test_degree_1_graph_equals_eager(tiny_gpu, size):
    schedule = [((0,), 2), ((0,), 3)]  # two calls: the second replays the graph captured by the first
    eager, off = run_schedule(tiny_gpu, ["cuda:0"], schedule, graphs=False, size=size)
    graphed, stats = run_schedule(tiny_gpu, ["cuda:0"], schedule, graphs=True, size=size)
    assert off == {"enabled": False}
    assert stats["failures"] == [] and stats["captures"] == 1 and stats["replays"] == 5, stats
    assert_same(graphed, eager, torch.float32)


@pytest.mark.gpu
def test_native_loop_launches_equal_python_replays_and_eager(tiny_gpu):
    """The whole step (forward, Euler update, step index) in one graph, launched from C++ by the native
    loop or replayed from Python by its twin, for a batch of two over two calls: the eager latents, and
    every launch of the native loop made natively."""
    schedule = [((0,), 3), ((0,), 3)]
    eager, _ = run_schedule(tiny_gpu, ["cuda:0"], schedule, graphs=False, rids=("a", "b"))
    results = {}
    for loop in ("native", "python"):
        results[loop] = run_schedule(tiny_gpu, ["cuda:0"], schedule, graphs=True, rids=("a", "b"),
                                     step_options=StepOptions(loop=loop))
    for loop, (graphed, stats) in results.items():
        assert stats["failures"] == [] and stats["captures"] == 1 and stats["replays"] == 6, (loop, stats)
        assert_same(graphed, eager, torch.float32)
    assert results["native"][1]["native_launches"] == 6 and results["python"][1]["native_launches"] == 0
    for rid in ("a", "b"):
        assert torch.equal(results["native"][0][rid], results["python"][0][rid])


@pytest.mark.gpu
def test_degree_1_batch_and_a_request_finishing_early(tiny_gpu):
    """A batch of two; one request has fewer steps, so the batch shrinks mid-call (a second key)."""
    def run(graphs):
        with Executor(tiny_gpu, ["cuda:0"], ops.CommCache(), cuda_graphs=graphs) as ex:
            encode(ex, "long", seed=1, steps=5)
            encode(ex, "short", seed=2, steps=2)
            assert ex.submit_steps(["long", "short"], (0,), 5).result().errors == {}
            return {rid: ex.latent(rid).float() for rid in ("long", "short")}, ex.graph_stats()

    eager, _ = run(False)
    graphed, stats = run(True)
    assert stats["failures"] == [] and stats["captures"] == 2, stats
    assert_same(graphed, eager, torch.float32)


@pytest.mark.gpu
def test_bf16_and_sd3_graphs():
    for name in ("tiny", "tiny-sd3"):
        runtime = load_runtime(name, ["cuda:0"], dtype="bf16")
        eager, _ = run_schedule(runtime, ["cuda:0"], [((0,), 3)], graphs=False)
        graphed, stats = run_schedule(runtime, ["cuda:0"], [((0,), 3)], graphs=True)
        assert stats["failures"] == [] and stats["captures"] == 1, (name, stats)
        assert_same(graphed, eager, torch.bfloat16)


@pytest.mark.gpu
def test_lru_keeps_at_most_max_graphs(tiny_gpu):
    with Executor(tiny_gpu, ["cuda:0"], ops.CommCache(), cuda_graphs=True, max_graphs=1) as ex:
        for rid, size in (("a", 256), ("b", 128), ("c", 256)):
            encode(ex, rid, size, size, steps=2)
            assert ex.submit_steps([rid], (0,), 2).result().errors == {}
        stats = ex.graph_stats()
    assert stats["graphs"] == 1 and stats["evictions"] == 2 and stats["captures"] == 3, stats


@pytest.mark.gpu
def test_a_capture_that_fails_runs_eagerly_and_is_reported_once(tiny_gpu, monkeypatch):
    """A host sync inside the forward cannot be captured: that key falls back to eager, correctly."""
    velocity = tiny_gpu.adapter.velocity

    def syncs(transformer, latents, prepared, step_indices, inputs, **kwargs):
        float(latents[0].float().abs().sum().item())  # not allowed while capturing
        return velocity(transformer, latents, prepared, step_indices, inputs, **kwargs)

    eager, _ = run_schedule(tiny_gpu, ["cuda:0"], [((0,), 2), ((0,), 2)], graphs=False)
    monkeypatch.setattr(tiny_gpu.adapter, "velocity", syncs)
    graphed, stats = run_schedule(tiny_gpu, ["cuda:0"], [((0,), 2), ((0,), 2)], graphs=True)
    assert stats["captures"] == 0 and stats["capture_failures"] == 1 and len(stats["failures"]) == 1, stats
    assert stats["failures"][0]["error"]
    assert_same(graphed, eager, torch.float32)
    # The failed capture leaves the device usable: random ops there still work (torch leaves the default
    # generator in capture mode after a capture_end that raises, unless the executor resets it).
    assert torch.randn(4, device="cuda:0").isfinite().all()


# --- two GPUs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_two():
    return load_runtime("tiny", TWO, dtype="fp32")


@pytest.fixture(scope="module")
def small_flux():
    """FLUX.1-dev's widths, heads, text length and rotary axes, with 2 double + 2 single blocks (bf16)."""
    preset = dataclasses.replace(PRESETS["flux-dev"], name="flux-small",
                                 transformer={**FLUX_DEV_TRANSFORMER, "num_layers": 2, "num_single_layers": 2})
    PRESETS["flux-small"] = preset
    try:
        return load_runtime("flux-small", TWO)
    finally:
        del PRESETS["flux-small"]


@pytest.mark.multi_gpu
@pytest.mark.parametrize("size", [(256, 256), (48, 80)])  # the second: 15 image tokens, padded shards
def test_degree_2_graph_equals_eager(tiny_two, size):
    schedule = [((0, 1), 2), ((0, 1), 2)]
    eager, _ = run_schedule(tiny_two, TWO, schedule, graphs=False, size=size)
    graphed, stats = run_schedule(tiny_two, TWO, schedule, graphs=True, size=size)
    assert stats["failures"] == [] and stats["captures"] == 2 and stats["replays"] == 8, stats  # one per rank
    assert_same(graphed, eager, torch.float32)


@pytest.mark.multi_gpu
def test_degree_changes_with_graphs_equal_eager(tiny_two):
    schedule = [((0,), 2), ((0, 1), 2), ((1,), 1), ((1, 0), 1), ((0,), 2)]
    eager, _ = run_schedule(tiny_two, TWO, schedule, graphs=False, rids=("a", "b"))
    graphed, stats = run_schedule(tiny_two, TWO, schedule, graphs=True, rids=("a", "b"))
    assert stats["failures"] == [] and stats["captures"] >= 4, stats
    assert_same(graphed, eager, torch.float32)


@pytest.mark.multi_gpu
def test_small_flux_degree_1_2_1_graphs_equal_eager(small_flux):
    schedule = [((0,), 2), ((0, 1), 3), ((0,), 2)]
    for size in ((512, 512), (49 * 16, 63 * 16)):
        eager, _ = run_schedule(small_flux, TWO, schedule, graphs=False, size=size)
        graphed, stats = run_schedule(small_flux, TWO, schedule, graphs=True, size=size)
        assert stats["failures"] == [] and stats["captures"] == 3, stats
        assert_same(graphed, eager, torch.bfloat16)


@pytest.mark.multi_gpu
def test_failure_on_one_rank_with_graphs_fails_only_that_request(tiny_two, monkeypatch):
    """Rank 1 fails one request of a batch: the warm-up catches up, the batch runs eagerly, the request
    fails alone, and the rest of the group goes on with graphs."""
    from tetri_engine.model import ulysses

    velocity = tiny_two.adapter.velocity

    def fails_on_rank_1(transformer, latents, prepared, step_indices, inputs, **kwargs):
        if ulysses.current_context().rank == 1 and any(p.seed == 666 for p in prepared):
            raise RuntimeError("injected on cuda:1")
        return velocity(transformer, latents, prepared, step_indices, inputs, **kwargs)

    monkeypatch.setattr(tiny_two.adapter, "velocity", fails_on_rank_1)
    with Executor(tiny_two, TWO, ops.CommCache(), cuda_graphs=True) as ex:
        encode(ex, "good", seed=1, steps=4)
        encode(ex, "bad", seed=666, steps=4)
        result = ex.submit_steps(["good", "bad"], (0, 1), 2).result()
        assert result["good"].error is None and result["good"].steps_done == 2
        assert "injected" in result["bad"].error
        assert ex.submit_steps(["good"], (0, 1), 2).result().errors == {}
        stats = ex.graph_stats()
    assert stats["failures"] == [] and stats["warmup_failures"] >= 1 and stats["captures"] >= 2, stats
