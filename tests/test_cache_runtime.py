"""Step caching in the executor on 4 virtual CPU devices: off is the plain runtime bit for bit; on, it
skips work, gives valid images, and agrees across degrees, regroups, batches and rank failures.

The tiny model has random weights, so adjacent steps are far apart (the first block's residual moves
by ~25% a step; see tests/test_redundancy_analysis.py): its analysed plan skips nothing. The mechanism
is tested with plans whose threshold forces skips."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tetri_engine import ops
from tetri_engine.executor import Executor
from tetri_engine.model import flow_match_euler_step, load_runtime, ulysses, verify
from tetri_engine.model.step_cache import CachePlan, default_plan, load_plan, plan_path
from tetri_engine.request import GenerationRequest

DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
FORCE = CachePlan(threshold=1e9, warmup_steps=2)  # every step from step 2 on skips


@pytest.fixture(scope="module")
def runtime():
    return load_runtime("tiny", DEVICES)


@pytest.fixture(scope="module")
def sd3():
    return load_runtime("tiny-sd3", DEVICES)


def executor(runtime, plan):
    return Executor(runtime, DEVICES, ops.CommCache(timeout_s=20.0), cache_plan=plan)


_ids = iter(range(10**6))


def run(ex, schedule, cache="auto", width=48, height=80, seed=3, steps=6, prompt="a tree", decode=False):
    """schedule: [(device_indices, num_steps), ...] -> (latent, request id, last step result)."""
    rid = f"c{next(_ids)}"
    ex.submit_encode(rid, GenerationRequest(prompt=prompt, width=width, height=height, seed=seed,
                                            num_inference_steps=steps, cache=cache)).result()
    result = None
    for i, (devices, n) in enumerate(schedule):
        result = ex.submit_steps([rid], devices, n, decode_after=decode and i == len(schedule) - 1).result()
        assert result[rid].error is None, result[rid].error
    return ex.latent(rid), rid, result


def plain_loop(runtime, prepared, devices):
    """The runtime's forward and Euler step without the executor or any cache object."""
    latent = prepared.noise
    for i in range(prepared.num_steps):
        v = verify.sp_velocity(runtime, prepared, devices, ops.CommCache(timeout_s=20.0), i, latent)
        latent = flow_match_euler_step(latent, v, prepared.sigmas, i)
    return latent


@pytest.mark.parametrize("degree", [1, 2])
def test_cache_off_is_bit_identical_to_the_plain_runtime(runtime, degree):
    prepared = runtime.prepare(prompt="a tree", width=48, height=80, seed=3, num_steps=4)
    expected = plain_loop(runtime, prepared, DEVICES[:degree])
    with executor(runtime, FORCE) as ex:
        off, rid, _ = run(ex, [(tuple(range(degree)), 4)], cache="off", steps=4)
        assert ex.request_stats(rid)["cache"] is None
        # cache on with a plan that never skips runs the cached forward (first block, decision, the
        # rest): the same numbers as the diffusers forward, bit for bit
    with executor(runtime, CachePlan(threshold=0.0)) as ex:
        never, rid, _ = run(ex, [(tuple(range(degree)), 4)], cache="auto", steps=4)
        assert ex.request_stats(rid)["cache"]["computed_steps"] == 4
    assert torch.equal(off, expected)
    assert torch.equal(never, expected)


def test_cached_run_skips_work_and_agrees_across_degrees_and_regroups(runtime):
    with executor(runtime, FORCE) as ex:
        uncached, _, _ = run(ex, [((0,), 6)], cache="off")
        one, a, _ = run(ex, [((0,), 6)])
        # 1 -> 2 mid-run (the cached residuals move with the latent), then 2 -> 4 -> 1
        moved, b, _ = run(ex, [((0,), 2), ((1, 2), 2), ((3, 2, 1, 0), 1), ((2,), 1)])
        two, c, _ = run(ex, [((2, 3), 6)])
        stats = [ex.request_stats(r)["cache"] for r in (a, b, c)]
    assert stats[0]["skipped"] == [2, 3, 4, 5] and stats[0]["computed_steps"] == 2
    assert all(s["skipped"] == stats[0]["skipped"] for s in stats)
    torch.testing.assert_close(moved, one)
    torch.testing.assert_close(two, one)
    assert not torch.allclose(one, uncached, atol=1e-3)  # skipping did change the result


def test_threshold_from_measured_changes_gives_the_same_decisions_at_every_degree(runtime):
    """A threshold in the middle of the measured changes: some steps skip, some do not, and the
    decision (from the group-wide sums) is the same at degrees 1, 2 and 4."""
    with executor(runtime, CachePlan(threshold=0.0)) as ex:
        _, rid, _ = run(ex, [((0,), 8)], steps=8, seed=5)
        changes = sorted(c for _, c in ex._states[rid].cache.changes if c is not None)
    plan = CachePlan(threshold=(changes[3] + changes[4]) / 2, warmup_steps=1)
    with executor(runtime, plan) as ex:
        one, a, _ = run(ex, [((0,), 8)], steps=8, seed=5)
        two, b, _ = run(ex, [((0,), 3), ((0, 1), 5)], steps=8, seed=5)
        four, c, _ = run(ex, [((0, 1, 2, 3), 8)], steps=8, seed=5)
        stats = [ex.request_stats(r)["cache"] for r in (a, b, c)]
    assert 0 < stats[0]["skipped_steps"] < 7
    assert stats[1]["skipped"] == stats[0]["skipped"] and stats[2]["skipped"] == stats[0]["skipped"]
    torch.testing.assert_close(two, one)
    torch.testing.assert_close(four, one)


def test_cached_and_uncached_runs_both_give_valid_images(runtime):
    with executor(runtime, FORCE) as ex:
        images = {}
        for cache in ("off", "auto"):
            _, rid, result = run(ex, [((0, 1), 2), ((0,), 2)], cache=cache, width=96, height=64, steps=4,
                                 decode=True)
            r = result[rid]
            assert r.finished and r.image.size == (96, 64)
            assert Image.open(io.BytesIO(r.png)).size == (96, 64)
            images[cache] = np.asarray(r.image, dtype=np.int16)
        assert ex.request_stats(rid)["cache"]["skipped_steps"] == 2
    assert images["off"].std() > 0 and images["auto"].std() > 0
    assert not np.array_equal(images["off"], images["auto"])


def test_a_batch_decides_per_request(runtime):
    """A batch of a request that skips and one that does not (cache off) equals each run alone: the
    other blocks run on the rows that compute only."""
    with executor(runtime, FORCE) as ex:
        alone_cached, _, _ = run(ex, [((0, 1), 4)], steps=4, seed=1, prompt="a cat")
        alone_plain, _, _ = run(ex, [((0, 1), 4)], cache="off", steps=4, seed=2, prompt="a dog")
        a, b = f"c{next(_ids)}", f"c{next(_ids)}"
        ex.submit_encode(a, GenerationRequest("a cat", 48, 80, 4, seed=1, cache="auto")).result()
        ex.submit_encode(b, GenerationRequest("a dog", 48, 80, 4, seed=2, cache="off")).result()
        result = ex.submit_steps([a, b], (2, 3), 4).result()
        assert result.errors == {}
        torch.testing.assert_close(ex.latent(a), alone_cached)
        torch.testing.assert_close(ex.latent(b), alone_plain)
        assert ex.request_stats(a)["cache"]["skipped_steps"] == 2


def test_sd3_cached_with_guidance_rows_agrees_across_degrees_and_batches(sd3):
    with executor(sd3, FORCE) as ex:
        one, a, _ = run(ex, [((0,), 4)], steps=4)
        moved, _, _ = run(ex, [((0,), 2), ((1, 0), 2)], steps=4)
        x, y = f"c{next(_ids)}", f"c{next(_ids)}"
        for rid, seed in ((x, 3), (y, 4)):
            ex.submit_encode(rid, GenerationRequest("a tree", 48, 80, 4, seed=seed, cache="auto")).result()
        assert ex.submit_steps([x, y], (2, 3), 4).result().errors == {}
        alone_y, _, _ = run(ex, [((0,), 4)], steps=4, seed=4)
        assert ex.request_stats(a)["cache"]["skipped"] == [2, 3]
        torch.testing.assert_close(moved, one)
        torch.testing.assert_close(ex.latent(x), one)
        torch.testing.assert_close(ex.latent(y), alone_y)


@pytest.mark.parametrize("failing_call", [1, 3])  # block 0's attention (before the decision); block 2's (after)
def test_a_rank_failing_in_a_cached_forward_catches_up(runtime, monkeypatch, failing_call):
    """The last rank fails a batched cached forward before or after the skip decision's all_gather: it
    issues the collectives it missed (nobody waits for the timeout), the batch is retried request by
    request and both requests come out as when run alone."""
    with executor(runtime, CachePlan(threshold=1e9, warmup_steps=1)) as ex:
        alone = [run(ex, [((0, 1, 2, 3), 3)], steps=3, seed=s)[0] for s in (1, 2)]
        a, b = f"c{next(_ids)}", f"c{next(_ids)}"
        for rid, seed in ((a, 1), (b, 2)):
            ex.submit_encode(rid, GenerationRequest("a tree", 48, 80, 3, seed=seed, cache="auto")).result()
        real = ulysses.sp_attention
        calls = []

        def fails(query, key, value, streams, *options):
            if ulysses.current_context().rank == 3 and query.shape[0] == 2:
                calls.append(streams)
                if len(calls) == failing_call:
                    raise RuntimeError("injected")
            return real(query, key, value, streams, *options)

        monkeypatch.setattr("tetri_engine.model.flux.sp_attention", fails)
        start = time.perf_counter()
        # step 0 computes every block; step 1 (the batch fails, then each request alone) skips
        result = ex.submit_steps([a, b], (0, 1, 2, 3), 3).result()
        assert time.perf_counter() - start < 10
        assert result.errors == {}
        torch.testing.assert_close(ex.latent(a), alone[0])
        torch.testing.assert_close(ex.latent(b), alone[1])


def test_invalid_cache_mode_and_plans(tmp_path, runtime, monkeypatch):
    with executor(runtime, FORCE) as ex:
        with pytest.raises(ValueError, match="cache must be 'off' or 'auto'"):
            ex.submit_encode("x", GenerationRequest("a", 64, 64, 2, cache="always")).result()
    plan = CachePlan(threshold=0.07, warmup_steps=3, model="tiny", expected_skip_fraction=0.4,
                     details={"psnr": float("inf")})
    plan.save(str(tmp_path / "p.json"))
    assert CachePlan.load(str(tmp_path / "p.json")) == CachePlan(**{**plan.to_dict()})
    with pytest.raises(ValueError, match="malformed cache plan"):
        CachePlan.from_dict({"warmup_steps": 1})
    # no saved plan: the default; a saved one is found by model name
    assert load_plan("tiny", str(tmp_path)) == default_plan("tiny")
    plan.save(plan_path("tiny", str(tmp_path)))
    assert load_plan("tiny", str(tmp_path)).threshold == 0.07
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    plan.save(plan_path("tiny"))
    with Executor(runtime, DEVICES) as ex:
        assert ex.cache_plan().threshold == 0.07
