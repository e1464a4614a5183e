"""Regional compilation (model/compile.py) and the start-up warm-up (executor/warmup.py,
engine/warmup.py) on the CPU, for real: torch.compile with a backend that runs the captured graph as
it is and counts, on the tiny model. Inductor itself runs only on GPUs (tests/test_speed_gpu.py).

What a user would notice: a request never waits for a compilation (no warmed shape: eager; a warmed
shape: the compiled code; an unwarmed shape after warm-up: eager), and compiled steps compute what
eager ones do, at degree 1 and across a group (the attention op, exchanges included, inside the graph)."""
from __future__ import annotations

import logging

import pytest
import torch

from tetri_engine.executor import Executor
from tetri_engine.executor.warmup import WarmupShape
from tetri_engine.model import load_runtime
from tetri_engine.request import GenerationRequest

DEVICES = ["cpu:0", "cpu:1"]


class CountingEager:
    """A torch.compile backend: the captured graph runs as it is; compilations and runs counted."""

    def __init__(self):
        self.compiled = 0
        self.runs = 0
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph_module, example_inputs):
        self.compiled += 1
        self.graphs.append(graph_module)

        def run(*args):
            self.runs += 1
            return graph_module.forward(*args)

        return run


@pytest.fixture()
def backend():
    torch._dynamo.reset()  # no compiled code left from other tests (dynamo caches per function, process-wide)
    yield CountingEager()
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def eager():
    return Executor(load_runtime("tiny", DEVICES))


def denoise(ex: Executor, group, width=64, height=64, steps=2, seed=4) -> torch.Tensor:
    rid = f"r-{width}x{height}-{group}-{seed}"
    ex.submit_encode(rid, GenerationRequest("a ship", width, height, steps, seed=seed)).result()
    result = ex.submit_steps([rid], group, steps).result()
    assert result[rid].error is None, result[rid].error
    latent = ex.latent(rid)
    ex.release(rid)
    return latent


def test_no_request_compiles_even_without_a_warm_up(backend, eager):
    runtime = load_runtime("tiny", DEVICES, compile=True, compile_backend=backend)
    with Executor(runtime) as ex:
        assert ex.model.compiled
        for group in ((0,), (0, 1)):
            torch.testing.assert_close(denoise(ex, group), denoise(eager, group))
    assert backend.compiled == 0 and backend.runs == 0  # eager: the shapes were never warmed


def test_warm_up_compiles_then_requests_run_compiled_code_and_never_compile(backend, eager):
    runtime = load_runtime("tiny", DEVICES, compile=True, compile_backend=backend)
    with Executor(runtime) as ex:
        report = ex.warm_up_shapes([WarmupShape(64, 64, (0,)), WarmupShape(64, 64, (1,)),
                                    WarmupShape(64, 64, (0, 1))])
        assert report.shapes == 3 and report.failures == [] and report.compiled
        assert report.compiled_graphs == backend.compiled > 0
        compiled_ops = [str(n.target) for gm in backend.graphs for n in gm.graph.nodes if n.op == "call_function"]
        assert "tetri.sp_attention" in compiled_ops  # one opaque node, exchanges and all

        # warmed shapes: compiled code runs, nothing compiles, the result is eager's
        compiled, runs = backend.compiled, backend.runs
        for group in ((0,), (1,), (0, 1)):
            torch.testing.assert_close(denoise(ex, group), denoise(eager, group))
        assert backend.compiled == compiled and backend.runs > runs

        # a size nobody warmed (24 tokens: no shard shape in common with 64x64's 16): eager, no compilation
        runs = backend.runs
        for group in ((0,), (0, 1)):
            torch.testing.assert_close(denoise(ex, group, 96, 64), denoise(eager, group, 96, 64))
        assert backend.compiled == compiled and backend.runs == runs

        # inside compiling() (the warm-up's mode) the new size does compile
        with ex.compiling():
            denoise(ex, (0,), 96, 64)
        assert backend.compiled > compiled


def test_a_shape_that_cannot_run_is_reported_and_the_rest_warms(backend):
    runtime = load_runtime("tiny", ["cpu:0", "cpu:1", "cpu:2"], compile=True, compile_backend=backend)
    with Executor(runtime) as ex:
        report = ex.warm_up_shapes([WarmupShape(64, 64, (0, 1, 2)), WarmupShape(64, 64, (0,))])
    assert report.shapes == 2 and len(report.failures) == 1
    assert "degree 3" in report.failures[0] and "heads" in report.failures[0]  # 4 heads over 3 devices
    assert report.compiled_graphs > 0
    assert "1 failed (they run eagerly)" in report.describe()


def test_inductor_on_cpu_devices_is_skipped_saying_so(caplog):
    with caplog.at_level(logging.INFO, logger="tetri_engine.model"):
        runtime = load_runtime("tiny", DEVICES, compile=True)
    assert runtime.compiled is None
    assert any("torch.compile is for GPU runs" in r.getMessage() for r in caplog.records)
    with Executor(runtime) as ex:
        assert not ex.model.compiled
        report = ex.warm_up_shapes([WarmupShape(64, 64, (0,))])  # still runs: an eager warm-up step
    assert not report.compiled and report.compiled_graphs == 0 and "torch.compile" not in report.describe()


def test_inductor_caches_under_the_engines_cache_dir_unless_the_user_chose(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from tetri_engine.model.compile import use_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what torch writes there on first use
    assert use_cache_dir(str(tmp_path)) == str(tmp_path / "inductor")
    chosen = tmp_path / "mine"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(chosen))
    assert use_cache_dir(str(tmp_path)) == str(chosen)
