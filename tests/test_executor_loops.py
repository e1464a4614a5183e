"""The executor's two step loops (StepOptions.loop: the native loop, csrc/step_loop.cpp, and its Python
twin) on 4 virtual CPU devices: the same results for the same calls (batching, degree changes, a
failing request, a cancel), the per-phase trace, the options, and a static check that nothing in the
layers below the engine synchronises every GPU at once."""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from tetri_engine import ops
from tetri_engine.executor import Executor
from tetri_engine.executor.options import StepOptions
from tetri_engine.model import load_runtime
from tetri_engine.request import GenerationRequest

DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


@pytest.fixture(scope="module")
def runtime():
    return load_runtime("tiny", DEVICES)


def encode(ex, rid, seed, steps=6, width=48, height=80, prompt="a house"):
    ex.submit_encode(rid, GenerationRequest(prompt=prompt, width=width, height=height, seed=seed,
                                            num_inference_steps=steps)).result()


def scenario(runtime, loop, monkeypatch):
    """Batching, degree changes, a request that fails at its third step, a cancel after step 3 ->
    (per request: steps done per call, errors, cancelled flags), latents, progress calls."""
    velocity = runtime.adapter.velocity

    def failing(transformer, latents, prepared, step_indices, inputs, **kwargs):
        if any(p.seed == 666 and i == 2 for p, i in zip(prepared, step_indices)):
            raise RuntimeError("injected")
        return velocity(transformer, latents, prepared, step_indices, inputs, **kwargs)

    monkeypatch.setattr(runtime.adapter, "velocity", failing)
    calls, progress = [], []
    with Executor(runtime, DEVICES, ops.CommCache(timeout_s=30.0), step_options=StepOptions(loop=loop)) as ex:
        for rid, seed in (("a", 1), ("b", 2), ("bad", 666), ("victim", 3)):
            encode(ex, rid, seed)

        def on_step(rid, step):
            progress.append((rid, step))
            if rid == "victim" and step == 3:
                ex.cancel("victim")

        for ids, group, n in ((["a", "b", "bad", "victim"], (0, 1), 2), (["a", "b", "bad", "victim"], (2, 3, 1, 0), 3),
                              (["a", "b"], (3,), 1)):
            result = ex.submit_steps(ids, group, n, on_step=on_step).result(timeout=60)
            calls.append({rid: (r.steps_done, r.error, r.cancelled, r.regrouped) for rid, r in result.requests.items()})
        latents = {rid: ex.latent(rid) for rid in ("a", "b")}
    monkeypatch.setattr(runtime.adapter, "velocity", velocity)
    return calls, latents, sorted(progress)


def test_the_native_loop_and_its_python_twin_agree(runtime, monkeypatch):
    native = scenario(runtime, "native", monkeypatch)
    python = scenario(runtime, "python", monkeypatch)
    assert native[0] == python[0] and native[2] == python[2]
    for rid in ("a", "b"):
        torch.testing.assert_close(native[1][rid], python[1][rid], rtol=0, atol=0)
    calls = native[0]
    # The failing request failed at its third step (the second call's first, retried alone); the cancel
    # made after step 3 is read at step 4's report: step 4 is the victim's last.
    assert calls[0]["bad"][:2] == (2, None) and calls[1]["bad"][0] == 0 and "injected" in calls[1]["bad"][1]
    assert calls[0]["victim"][:3] == (2, None, False) and calls[1]["victim"][:3] == (2, "cancelled", True)
    assert calls[1]["a"] == (3, None, False, True) and calls[2]["a"] == (1, None, False, True)


def test_trace_gives_each_rank_s_phases(runtime):
    with Executor(runtime, DEVICES[:2], step_options=StepOptions(trace=True)) as ex:
        encode(ex, "t", 1, steps=4)
        result = ex.submit_steps(["t"], (0, 1), 3).result(timeout=60)
        plain = Executor(runtime, DEVICES[:2])
        try:
            encode(plain, "t", 1, steps=4)
            assert plain.submit_steps(["t"], (0, 1), 3).result(timeout=60).trace is None
        finally:
            plain.shutdown()
    ranks = result.trace["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert {"meet_s", "steps_s"} <= set(r["host_s"]) and r["gpu_ms"] == []  # (CPU: no GPU marks)
        [segment] = r["segments"]
        assert (segment["steps"], segment["end"], segment["graph"]) == (3, "budget", False)
        assert len(segment["phases_s"]) == 3
    assert "wait_earlier_s" in ranks[0]["host_s"]


def test_step_options_are_checked_and_read_from_the_environment(monkeypatch):
    with pytest.raises(ValueError, match="step loop"):
        StepOptions(loop="fast")
    with pytest.raises(ValueError, match="max_steps_queued"):
        StepOptions(max_steps_queued=-1)
    monkeypatch.setenv("TETRI_STEP_LOOP", "python")
    monkeypatch.setenv("TETRI_MAX_STEPS_QUEUED", "0")
    assert StepOptions.from_env() == StepOptions(loop="python", max_steps_queued=0)
    assert StepOptions.from_env(trace=True).trace


# Calls that make one thread wait for, or disturb, every GPU of the process: no device argument means
# all devices (synchronize) or the calling thread's current device, and graph() syncs and empties the
# allocator cache of every device on entry. Between executor threads, any of these couples groups that
# share nothing.
DEVICE_WIDE = {("torch.cuda.synchronize", 0), ("torch.cuda.empty_cache", None), ("torch.cuda.graph", None),
               ("torch.cuda.current_stream", 0), ("torch.cuda.default_stream", 0)}


def test_no_device_wide_call_below_the_engine():
    package = pathlib.Path(__file__).resolve().parent.parent / "tetri_engine"
    found = []
    for layer in ("executor", "model", "ops"):
        for path in sorted((package / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = ast.unparse(node.func)
                for wide, nargs in DEVICE_WIDE:
                    if name == wide and (nargs is None or len(node.args) + len(node.keywords) == nargs):
                        found.append(f"{path.relative_to(package)}:{node.lineno} {ast.unparse(node)}")
    assert not found, "\n".join(found)
