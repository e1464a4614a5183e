"""A group never waits for work another group queued on another device (issue 21), on GPUs.

The mechanism found (executor/latents.py): torch runs a copy that reads a GPU on that GPU's current stream
of the calling thread, the stream its own executor thread queues steps on. These tests keep a device's
default stream busy (`torch.cuda._sleep`, a kernel that spins for a number of clock cycles, standing in
for a big group's queued steps) and check, by the stream's state and not by timing, whether work that
only *reads* that device waited for it: with the fix it does not; with the old behaviour
(`StepOptions(host_conditioning=False, private_reads=False)`) it does, which shows the mechanism."""
from __future__ import annotations

import pytest
import torch

from tetri_engine import ops
from tetri_engine.executor import Executor
from tetri_engine.executor.options import StepOptions
from tetri_engine.model import load_runtime
from tetri_engine.request import GenerationRequest

SPIN_CYCLES = 4_000_000_000  # ~2-3 s on an H200's SM clock: far longer than the tiny model's steps
COUPLED = StepOptions(host_conditioning=False, private_reads=False)  # the behaviour before the fix


def encode(ex, rid, seed=1, steps=4, size=64):
    ex.submit_encode(rid, GenerationRequest(prompt=f"prompt {rid}", width=size, height=size, seed=seed,
                                            num_inference_steps=steps)).result()


def keep_busy(index: int) -> torch.cuda.Stream:
    """Queue a long spin on the default stream of GPU `index` (what the executor threads use)."""
    with torch.cuda.device(index):
        torch.cuda._sleep(SPIN_CYCLES)
    return torch.cuda.default_stream(torch.device("cuda", index))


@pytest.mark.gpu
def test_prompt_embeddings_live_in_host_memory_once_encoded():
    runtime = load_runtime("tiny", ["cuda:0"], dtype="fp32")
    for options, where in ((StepOptions(), "cpu"), (COUPLED, "cuda")):
        with Executor(runtime, ["cuda:0"], step_options=options) as ex:
            encode(ex, "a")
            assert {t.device.type for t in ex.prepared("a").cond.values()} == {where}
            assert ex.submit_steps(["a"], (0,), 4).result().errors == {}


@pytest.mark.gpu
@pytest.mark.parametrize("private", [True, False])
def test_a_preview_does_not_wait_for_steps_queued_on_its_device(private):
    """The preview's device-to-host copy runs on the worker's own stream: it returns while the device's
    default stream is still busy. On the shared stream (the old way) it waits for the spin."""
    runtime = load_runtime("tiny", ["cuda:0"], dtype="fp32")
    with Executor(runtime, ["cuda:0"], cuda_graphs=False, step_options=StepOptions(private_reads=private)) as ex:
        encode(ex, "a")
        assert ex.submit_steps(["a"], (0,), 2).result().errors == {}
        ex.submit_preview("a").result(timeout=60)  # first use: the thread's stream is made here
        stream = keep_busy(0)
        image = ex.submit_preview("a").result(timeout=60)
        still_busy = not stream.query()
        torch.cuda.synchronize(0)
    assert image.size == (8, 8)
    assert still_busy == private


@pytest.mark.multi_gpu
@pytest.mark.parametrize("fixed", [True, False])
def test_a_group_on_gpu_1_does_not_wait_for_work_queued_on_gpu_0(fixed):
    """GPU 0 is busy (the stand-in for a 2048^2 group's queued steps). A request encoded on GPU 0 steps
    on GPU 1, and a latent moves from GPU 0 to GPU 1: with the fix both finish while GPU 0 still
    spins; with the old behaviour the first step on GPU 1 waited for GPU 0 (the 2.1x of issue 21)."""
    two = ["cuda:0", "cuda:1"]
    runtime = load_runtime("tiny", two, dtype="fp32")
    with Executor(runtime, two, ops.CommCache(), cuda_graphs=False,
                  step_options=StepOptions() if fixed else COUPLED) as ex:
        encode(ex, "warm")
        assert ex.submit_steps(["warm"], (1,), 1).result().errors == {}  # first-use costs on GPU 1
        encode(ex, "a")
        encode(ex, "b")
        assert ex.submit_steps(["b"], (0,), 1).result().errors == {}  # b's latent on GPU 0
        stream = keep_busy(0)
        a = ex.submit_steps(["a"], (1,), 2).result(timeout=120)  # prompt embeddings from the encode device
        b = ex.submit_steps(["b"], (1,), 1).result(timeout=120)  # latent from GPU 0 to GPU 1
        still_busy = not stream.query()
        torch.cuda.synchronize(0)
    assert a.errors == {} and b.errors == {} and b["b"].regrouped
    assert still_busy == fixed
