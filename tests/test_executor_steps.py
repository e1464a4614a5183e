"""The Executor on 4 virtual CPU devices: degree changes between steps, batching, images, failures."""
from __future__ import annotations

import io
import time
import numpy as np
import pytest
import torch
from PIL import Image

from tetri_engine import ops
from tetri_engine.executor import Executor
from tetri_engine.model import load_runtime, ulysses
from tetri_engine.request import GenerationRequest

DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


@pytest.fixture(scope="module")
def runtime():
    return load_runtime("tiny", DEVICES)


@pytest.fixture(scope="module")
def ex(runtime):
    executor = Executor(runtime, DEVICES, ops.CommCache(timeout_s=30.0))
    yield executor
    executor.shutdown()


_ids = iter(range(10**6))


def encode(ex, width=64, height=64, seed=1, steps=4, prompt="a small house"):
    rid = f"r{next(_ids)}"
    ex.submit_encode(rid, GenerationRequest(prompt=prompt, width=width, height=height, seed=seed,
                                            num_inference_steps=steps)).result()
    return rid


def run_schedule(ex, schedule, **request):
    """schedule: [(device_indices, num_steps), ...]; returns (latent, request id)."""
    rid = encode(ex, **request)
    for devices, n in schedule:
        result = ex.submit_steps([rid], devices, n).result()
        assert result[rid].error is None, result[rid].error
    return ex.latent(rid), rid


def test_degree_schedule_equals_fixed_degree(ex):
    fixed, rid_fixed = run_schedule(ex, [((0,), 4)], width=48, height=80, seed=9)
    moving, rid = run_schedule(ex, [((0,), 1), ((0, 1), 1), ((0, 1, 2, 3), 1), ((3,), 1)], width=48, height=80, seed=9)
    torch.testing.assert_close(moving, fixed)
    stats = ex.request_stats(rid)
    assert stats["steps_at_degree"] == {1: 2, 2: 1, 4: 1}
    assert stats["regroups"] == 3 and stats["step"] == 4
    assert stats["peak_memory_bytes"] == 0  # CPU: not measured
    assert ex.placement(rid) == (3,)
    for r in (rid, rid_fixed):
        ex.release(r)
    assert ex.placement(rid) is None


def test_fixed_degrees_agree(ex):
    one, a = run_schedule(ex, [((0,), 3)], width=64, height=48, seed=4)
    two, b = run_schedule(ex, [((1, 2), 3)], width=64, height=48, seed=4)
    four, c = run_schedule(ex, [((3, 2, 1, 0), 3)], width=64, height=48, seed=4)  # any device order
    torch.testing.assert_close(two, one)
    torch.testing.assert_close(four, one)
    for r in (a, b, c):
        ex.release(r)


def test_regroup_reported_only_when_the_latent_moves(ex):
    rid = encode(ex, seed=2)
    assert not ex.submit_steps([rid], (0, 1), 1).result()[rid].regrouped  # first placement
    assert not ex.submit_steps([rid], (0, 1), 1).result()[rid].regrouped  # same group
    assert ex.submit_steps([rid], (2, 3), 1).result()[rid].regrouped
    ex.release(rid)


def test_full_pipeline_png_of_requested_size_and_same_seed_same_image(ex):
    rid = encode(ex, width=512, height=512, steps=8, seed=21)
    result = ex.submit_steps([rid], (0,), 8, decode_after=True).result()
    r = result[rid]
    assert r.error is None and r.finished and r.steps_done == 8
    assert r.image.size == (512, 512)
    assert Image.open(io.BytesIO(r.png)).size == (512, 512)

    # A non-square image, at other degrees, same seed: the same picture.
    first = encode(ex, width=96, height=64, steps=4, seed=5)
    a = ex.submit_steps([first], (0,), 4, decode_after=True).result()[first]
    second = encode(ex, width=96, height=64, steps=4, seed=5)
    ex.submit_steps([second], (0, 1), 2).result()
    b = ex.submit_steps([second], (1, 2, 3, 0), 2, decode_after=True).result()[second]
    assert Image.open(io.BytesIO(a.png)).size == (96, 64)
    pixels_a, pixels_b = np.asarray(a.image, dtype=np.int16), np.asarray(b.image, dtype=np.int16)
    assert np.abs(pixels_a - pixels_b).max() <= 1
    decoded, png = ex.submit_decode(second, 2).result()
    assert np.array_equal(np.asarray(decoded), np.asarray(b.image))
    for x in (rid, first, second):
        ex.release(x)


def test_batched_requests_equal_each_alone(ex):
    alone = [run_schedule(ex, [((0, 1), 3)], seed=s, prompt=p) for s, p in ((1, "a cat"), (2, "a dog"))]
    a, b = encode(ex, seed=1, prompt="a cat"), encode(ex, seed=2, prompt="a dog")
    result = ex.submit_steps([a, b], (2, 3), 3).result()
    assert result.errors == {} and result[a].steps_done == result[b].steps_done == 3
    torch.testing.assert_close(ex.latent(a), alone[0][0])
    torch.testing.assert_close(ex.latent(b), alone[1][0])
    for rid in (a, b, alone[0][1], alone[1][1]):
        ex.release(rid)


def test_requests_with_fewer_steps_left_stop_early(ex):
    short, long = encode(ex, steps=2, seed=1), encode(ex, steps=4, seed=2)
    seen: list[tuple[str, int]] = []
    result = ex.submit_steps([short, long], (0,), 3, on_step=lambda rid, step: seen.append((rid, step)),
                             decode_after=True).result()
    assert (result[short].steps_done, result[short].finished) == (2, True)
    assert (result[long].steps_done, result[long].step, result[long].finished) == (3, 3, False)
    assert result[short].image is not None and result[long].image is None
    assert sorted(seen) == sorted([(short, 1), (short, 2), (long, 1), (long, 2), (long, 3)])
    for rid in (short, long):
        ex.release(rid)


def test_submit_errors_are_raised_at_once(ex):
    rid = encode(ex)
    with pytest.raises(ValueError, match="4 attention heads.*3 devices"):
        ex.submit_steps([rid], (0, 1, 2), 1)
    with pytest.raises(ValueError, match="unknown request"):
        ex.submit_steps(["nope"], (0,), 1)
    with pytest.raises(ValueError, match="out of range"):
        ex.submit_steps([rid], (4,), 1)
    with pytest.raises(ValueError, match="already held"):
        ex.submit_encode(rid, GenerationRequest(prompt="x"))
    bad = ex.submit_encode("bad-size", GenerationRequest(prompt="x", width=100, height=64))
    with pytest.raises(ValueError, match="multiples of 16"):
        bad.result()
    result = ex.submit_steps(["bad-size"], (0,), 1).result()
    assert "multiples of 16" in result["bad-size"].error
    for x in (rid, "bad-size"):
        ex.release(x)


def test_a_request_whose_encode_failed_does_not_stop_its_batch(ex):
    good = encode(ex, seed=1)
    with pytest.raises(ValueError):
        ex.submit_encode("broken", GenerationRequest(prompt="x", width=64, height=64, num_inference_steps=0)).result()
    result = ex.submit_steps([good, "broken"], (0, 1), 2).result()
    assert result[good].error is None and result[good].steps_done == 2
    assert "num_inference_steps" in result["broken"].error and result["broken"].steps_done == 0
    for x in (good, "broken"):
        ex.release(x)


def test_batch_of_different_sizes_fails_cleanly(ex):
    a, b = encode(ex, width=64, height=64), encode(ex, width=64, height=48)
    result = ex.submit_steps([a, b], (0,), 1).result()
    assert "different sizes" in result[a].error and "different sizes" in result[b].error
    for x in (a, b):
        ex.release(x)


@pytest.mark.parametrize("devices", [(0,), (1, 2)])
def test_a_failing_request_fails_alone(ex, runtime, monkeypatch, devices):
    """A step that raises for one request (on every rank) fails that request; its batch-mate and the
    threads go on."""
    good, bad = encode(ex, seed=1, prompt="a cat"), encode(ex, seed=666, prompt="a dog")
    reference, ref_id = run_schedule(ex, [(devices, 3)], seed=1, prompt="a cat")
    velocity = runtime.adapter.velocity

    def failing(transformer, latents, prepared, step_indices, inputs):
        if any(p.seed == 666 for p in prepared) and step_indices[[p.seed for p in prepared].index(666)] == 1:
            raise torch.cuda.OutOfMemoryError("injected: tried to allocate 80 GiB")
        return velocity(transformer, latents, prepared, step_indices, inputs)

    monkeypatch.setattr(runtime.adapter, "velocity", failing)
    result = ex.submit_steps([good, bad], devices, 3).result()
    assert result[good].error is None and result[good].steps_done == 3
    assert "CUDA out of memory" in result[bad].error and result[bad].steps_done == 1
    torch.testing.assert_close(ex.latent(good), reference)
    # The request stays failed; the devices keep working.
    again = ex.submit_steps([bad], devices, 1).result()
    assert "CUDA out of memory" in again[bad].error and again[bad].steps_done == 0
    monkeypatch.setattr(runtime.adapter, "velocity", velocity)
    fine = encode(ex, seed=3)
    assert ex.submit_steps([fine], devices, 2).result().errors == {}
    for x in (good, bad, ref_id, fine):
        ex.release(x)


def test_a_failure_on_one_rank_only(runtime, monkeypatch):
    """A request that fails on rank 1 only, before the first exchange: rank 1 catches up with the
    exchanges rank 0 goes on with (no timeout), the batch is retried request by request, and only that
    request fails; a one-off failure in a batch costs nothing."""
    with Executor(runtime, DEVICES, ops.CommCache(timeout_s=20.0)) as ex:
        reference, _ = run_schedule(ex, [((0, 1), 2)], seed=1)
        good, bad = encode(ex, seed=1), encode(ex, seed=666)
        flaky, other = encode(ex, seed=1), encode(ex, seed=1)
        velocity = runtime.adapter.velocity
        flaky_calls = []

        def fails_on_rank_1(transformer, latents, prepared, step_indices, inputs):
            rank = ulysses.current_context().rank
            if rank == 1 and any(p.seed == 666 for p in prepared):
                raise RuntimeError("injected on rank 1")
            if rank == 1 and len(prepared) == 2 and not flaky_calls:
                flaky_calls.append(1)
                raise RuntimeError("injected once on rank 1")
            return velocity(transformer, latents, prepared, step_indices, inputs)

        monkeypatch.setattr(runtime.adapter, "velocity", fails_on_rank_1)
        start = time.perf_counter()
        result = ex.submit_steps([good, bad], (0, 1), 2).result()
        assert time.perf_counter() - start < 10  # nobody waited for the 20 s timeout
        assert result[good].error is None and result[good].steps_done == 2
        assert result[bad].error == "rank 1 (cpu:1): RuntimeError: injected on rank 1"
        torch.testing.assert_close(ex.latent(good), reference)
        result = ex.submit_steps([flaky, other], (0, 1), 2).result()
        assert flaky_calls and result.errors == {}
        monkeypatch.setattr(runtime.adapter, "velocity", velocity)
        torch.testing.assert_close(ex.latent(flaky), reference)
        torch.testing.assert_close(ex.latent(other), reference)


@pytest.mark.parametrize("model,devices", [("tiny", (0, 1, 2, 3)), ("tiny-sd3", (2, 0))])
def test_catch_up_matches_every_exchange_of_the_forward(model, devices, monkeypatch):
    """The exchange plan each adapter declares is the forward's real sequence (padded streams, SD3.5's
    image-only attention, classifier-free guidance rows): the last rank fails a batched forward at its
    second attention, catches up, the batch is retried request by request and both requests succeed."""
    runtime = load_runtime(model, DEVICES)
    with Executor(runtime, DEVICES, ops.CommCache(timeout_s=20.0)) as ex:
        alone = [run_schedule(ex, [(devices, 1)], width=48, height=80, seed=s)[0] for s in (1, 2)]
        a, b = encode(ex, width=48, height=80, seed=1), encode(ex, width=48, height=80, seed=2)
        real = ulysses.sp_attention
        batch_rows = 2 * (1 if model == "tiny" else 2)
        calls = []

        def fails_midway(query, key, value, streams, *options):
            if ulysses.current_context().rank == len(devices) - 1 and query.shape[0] == batch_rows:
                calls.append(streams)
                if len(calls) == 2:
                    raise RuntimeError("injected midway")
            return real(query, key, value, streams, *options)

        monkeypatch.setattr(f"tetri_engine.model.{'flux' if model == 'tiny' else 'sd3'}.sp_attention", fails_midway)
        start = time.perf_counter()
        result = ex.submit_steps([a, b], devices, 1).result()
        assert time.perf_counter() - start < 10  # nobody waited for the timeout
        assert len(calls) == 2 and result.errors == {}
        torch.testing.assert_close(ex.latent(a), alone[0])
        torch.testing.assert_close(ex.latent(b), alone[1])


def test_steps_submitted_while_the_encode_runs_do_not_wait_forever(ex, runtime, monkeypatch):
    """The steps job takes the request over from the encode job: it must be released by the
    encode's own completion, not wait on an event the encode never sets."""
    slow_prepare = runtime.prepare

    def prepare(**kwargs):
        time.sleep(0.3)  # the steps job is queued while the encode is still running
        return slow_prepare(**kwargs)

    monkeypatch.setattr(runtime, "prepare", prepare)
    encoded = ex.submit_encode("race", GenerationRequest(prompt="race", width=64, height=64,
                                                         num_inference_steps=2, seed=3))
    steps = ex.submit_steps(["race"], (0,), 2)
    encoded.result(timeout=30)
    result = steps.result(timeout=30)  # before the fix: blocked for good
    assert result.requests["race"].steps_done == 2
    ex.release("race")


# ---- cancellation (Executor.cancel): every rank stops the request at the same step boundary ----

def cancel_at(ex, victim, at_step):
    """An on_step callback that cancels `victim` once it has done `at_step` steps."""
    def on_step(request_id, step):
        if request_id == victim and step == at_step:
            assert ex.cancel(victim)
    return on_step


@pytest.mark.parametrize("devices", [(0,), (1, 2), (0, 1, 2, 3)])
def test_cancel_mid_call_stops_the_request_and_its_batch_mate_goes_on(ex, devices):
    """Cancelled after its first step (from on_step, i.e. between two steps): the request stops at the
    next step boundary on every rank (no timeout), the call's result says so, and the other request of
    the batch runs all its steps, exactly as it would alone."""
    alone, alone_id = run_schedule(ex, [(devices, 40)], seed=2, prompt="a dog", steps=40)
    victim, peer = encode(ex, seed=1, prompt="a cat", steps=40), encode(ex, seed=2, prompt="a dog", steps=40)
    result = ex.submit_steps([victim, peer], devices, 40, on_step=cancel_at(ex, victim, 1)).result(timeout=60)
    v = result[victim]
    # The cancel lands after step 1's barrier; rank 0 reports it at step 2's: 2 steps, on every rank.
    assert (v.steps_done, v.step, v.cancelled, v.error, v.finished) == (2, 2, True, "cancelled", False)
    p = result[peer]
    assert (p.steps_done, p.error, p.cancelled, p.finished) == (40, None, False, True)
    torch.testing.assert_close(ex.latent(peer), alone)
    stats = ex.request_stats(victim)
    assert stats["cancelled"] and stats["step"] == 2 and stats["steps_at_degree"] == {len(devices): 2}
    # Cancelled for good: a later call does nothing for it, and does not move its latent.
    again = ex.submit_steps([victim], (3,), 5).result(timeout=60)[victim]
    assert (again.steps_done, again.cancelled, again.error, again.regrouped) == (0, True, "cancelled", False)
    assert ex.placement(victim) == devices
    for rid in (victim, peer, alone_id):
        ex.release(rid)


@pytest.mark.parametrize("cache", ["off", "auto"])
def test_cancelling_every_request_ends_the_call_early(ex, cache):
    """With all of its requests cancelled, the whole group stops (step cache on or off); its devices
    then serve the next call."""
    rids = []
    for seed in (1, 2):
        rid = f"all-cancelled-{cache}-{seed}"
        ex.submit_encode(rid, GenerationRequest(prompt="a cat", width=64, height=64, seed=seed,
                                                num_inference_steps=40, cache=cache)).result()
        rids.append(rid)

    def on_step(request_id, step):
        if step == 3:
            ex.cancel(request_id)

    result = ex.submit_steps(rids, (0, 1), 40, on_step=on_step).result(timeout=60)
    for rid in rids:
        assert result[rid].cancelled and result[rid].steps_done == 4
    fine = encode(ex, seed=3)
    assert ex.submit_steps([fine], (0, 1), 2).result(timeout=60).errors == {}
    for rid in (*rids, fine):
        ex.release(rid)


def test_cancel_before_the_call_and_after_the_last_step(ex):
    assert ex.cancel("no-such-request") is False
    # Cancelled while its call waits in the queue: no steps at all.
    early = encode(ex, steps=4)
    ex.cancel(early)
    r = ex.submit_steps([early], (0, 1), 4).result(timeout=60)[early]
    assert (r.steps_done, r.cancelled, r.regrouped) == (0, True, False) and ex.placement(early) is None
    # Cancelled at its last step with decode_after: the steps are done, the decode is skipped.
    late = encode(ex, steps=3)
    r = ex.submit_steps([late], (0,), 3, on_step=cancel_at(ex, late, 3), decode_after=True).result(timeout=60)[late]
    assert (r.steps_done, r.cancelled, r.image) == (3, True, None)
    # Cancelled at its last step without a decode: it simply finished.
    done = encode(ex, steps=3)
    r = ex.submit_steps([done], (0,), 3, on_step=cancel_at(ex, done, 3)).result(timeout=60)[done]
    assert (r.steps_done, r.cancelled, r.finished) == (3, False, True)
    for rid in (early, late, done):
        ex.release(rid)


EXIT_SCRIPT = """
from tetri_engine.executor import Executor
from tetri_engine.model import load_runtime
from tetri_engine.request import GenerationRequest

devices = ["cpu:0", "cpu:1"]
ex = Executor(load_runtime("tiny", devices), devices)
ex.submit_encode("a", GenerationRequest(prompt="x", width=256, height=256, num_inference_steps=400, seed=1)).result()
assert ex.submit_steps(["a"], (0, 1), 1).result().errors == {}
ex.submit_steps(["a"], (0, 1), 399)  # still running (inside a collective or a torch op) at exit
print("exiting without shutdown", flush=True)
"""


def test_exit_without_shutdown_is_clean():
    """A program that never calls shutdown() exits with 0; before the atexit hook, a worker thread still
    inside C++ at interpreter finalisation aborted it ("terminate called without an active exception")."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True, timeout=300)
    assert "terminate called" not in proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exiting without shutdown" in proc.stdout
