"""AsyncEngine end to end on the tiny model, 4 virtual CPU devices, the real scheduler and executor.

One engine serves the whole module (start-up loads the model and measures its profile once); tests
that shut an engine down start their own, reusing the profile cached by the first.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import time

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest, RequestRejected, RequestState
from tetri_engine.errors import EngineNotRunning

pytestmark = pytest.mark.asyncio(loop_scope="module")

DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("engine-cache"))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(cache_dir):
    engine = AsyncEngine(EngineConfig(model="tiny", devices=DEVICES, cache_dir=cache_dir, max_queue=64))
    async with engine:
        yield engine


async def run_to_final(engine, request):
    """All outputs of a request, with the client-side time from submission to its final output."""
    outputs = []
    start = time.monotonic()
    async for out in engine.generate(request):
        outputs.append(out)
    return outputs, time.monotonic() - start


async def first_output(agen, kind):
    """Read outputs until one of `kind` (the request is then queued / running)."""
    async for out in agen:
        if out.kind == kind:
            return out
        assert out.kind != "final", f"ended before a {kind!r} output: {out.state} {out.error}"
    raise AssertionError("stream ended")


async def test_twelve_concurrent_mixed_resolutions(engine):
    sizes = [(64, 64), (128, 128), (256, 256), (256, 128), (128, 64), (192, 192)]
    requests = [GenerationRequest(prompt=f"request {i}", width=w, height=h, num_inference_steps=4 + i % 3, seed=i)
                for i, (w, h) in enumerate(sizes * 2)]
    before = engine.stats()["states"]["completed"]
    results = await asyncio.gather(*(run_to_final(engine, r) for r in requests))

    for request, (outputs, client_s) in zip(requests, results):
        kinds = [o.kind for o in outputs]
        assert kinds[0] == "queued" and outputs[0].queue_position is not None
        assert kinds[-1] == "final" and kinds.count("final") == 1
        final = outputs[-1]
        assert final.state == RequestState.COMPLETED, final.error
        assert final.image.size == (request.width, request.height)
        assert Image.open(io.BytesIO(final.png)).size == (request.width, request.height)
        assert final.seed == request.seed
        steps = [o.step for o in outputs if o.kind == "step"]
        assert steps == list(range(1, request.num_inference_steps + 1))
        assert all(o.degree == len(o.devices) >= 1 for o in outputs if o.kind in ("round", "step"))
        m = final.metrics
        assert sum(m.steps_at_degree.values()) == request.num_inference_steps
        # Honest deadline report: the engine's arrival is after our submission and its finish before
        # we got the final output, so its total is at most what we saw; met <=> total <= deadline.
        assert m.total_s <= client_s
        assert m.deadline_met == (m.total_s <= m.deadline_s)
        if client_s <= m.deadline_s:
            assert m.deadline_met
        assert m.denoise_s > 0 and m.decode_s > 0 and m.encode_s > 0

    stats = engine.stats()
    assert stats["states"]["completed"] - before == len(requests)
    assert stats["queue_depth"] == 0 and stats["running"] == 0
    assert stats["rounds"] >= 1 and stats["step_latency_s"]
    assert set(stats["device_busy_fraction"]) == set(DEVICES)


async def test_invalid_input_raises_value_error_with_what_to_change(engine):
    cases = [
        (dict(width=100), "multiple of 16"),
        (dict(width=4096), "maximum"),
        (dict(height=32), "minimum"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=1000), "num_inference_steps"),
        (dict(deadline_s=-1.0), "deadline_s"),
        (dict(cache="always"), "cache"),
        # What an embedded caller can send that JSON never would, and the bounds the HTTP API has too.
        (dict(guidance_scale=1e308), "guidance_scale"),
        (dict(guidance_scale=True), "guidance_scale"),
        (dict(deadline_s=True), "deadline_s"),
        (dict(slo_scale=True), "slo_scale"),
        (dict(preview_every=True), "preview_every"),
        (dict(prompt="a \ud800 b"), "lone surrogate"),
        (dict(negative_prompt="\udfff"), "negative_prompt"),
        (dict(prompt="x" * 32_001), "at most 32000"),
        (dict(prompt=b"bytes"), "prompt must be a string"),
    ]
    before = engine.stats()["states"]
    for fields, words in cases:
        fields = {"prompt": "x", **fields}
        with pytest.raises(ValueError, match=words):
            await engine.generate(GenerationRequest(**fields)).__anext__()
    stats = engine.stats()
    assert stats["queue_depth"] == 0
    # Bad input is refused before anything is queued: it fails no request and misses no deadline.
    assert stats["states"]["failed"] == before["failed"] and stats["states"]["rejected"] == before["rejected"]


async def test_impossible_deadline_is_rejected_or_best_effort(engine, monkeypatch):
    request = GenerationRequest(prompt="x", width=256, height=256, num_inference_steps=6, deadline_s=1e-4)
    with pytest.raises(RequestRejected) as info:
        await engine.generate(request).__anext__()
    assert info.value.reason == "deadline_impossible" and info.value.retry_after_s is None

    monkeypatch.setattr(engine.config, "admission", "best_effort")
    outputs, _ = await run_to_final(engine, request)
    final = outputs[-1]
    assert final.state == RequestState.COMPLETED
    assert final.metrics.deadline_met is False
    # The scheduler gives it up at its first decision and says so once, before its steps run.
    kinds = [o.kind for o in outputs]
    assert kinds.count("late") == 1 and kinds.index("late") < kinds.index("step")
    assert all(o.late for o in outputs[kinds.index("late"):]) and final.metrics.late is True


async def test_a_request_that_fits_alone_but_not_alongside_is_refused_with_an_estimate(engine, monkeypatch):
    cost = engine.cost_model
    # Four long requests, one per device at degree 1, each with a quarter of its time to spare: none
    # can wait for a newcomer to use its device first.
    long = [GenerationRequest(prompt="long", width=256, height=256, num_inference_steps=100, seed=i,
                              request_id=f"busy-{i}", deadline_s=1.25 * cost.isolated_s(256, 256, 100, 1))
            for i in range(4)]
    streams = [engine.generate(r) for r in long]
    try:
        for stream in streams:
            await first_output(stream, "round")
        # Alone the newcomer would make it on any device; behind the four it cannot: refused, with an
        # estimate of when it would fit.
        steps = 40
        fastest_s = min(cost.isolated_s(256, 256, steps, d) for d in (1, 2, 4))
        newcomer = GenerationRequest(prompt="newcomer", width=256, height=256, num_inference_steps=steps,
                                     deadline_s=1.3 * fastest_s)
        with pytest.raises(RequestRejected) as info:
            await engine.generate(newcomer).__anext__()
        assert info.value.reason == "busy" and info.value.retry_after_s > 0
        # best_effort takes it; the scheduler then decides whom to give up, and every request still ends.
        monkeypatch.setattr(engine.config, "admission", "best_effort")
        outputs, _ = await run_to_final(engine, newcomer)
        assert outputs[-1].state == RequestState.COMPLETED
    finally:  # the long requests never outlive the test, whatever failed
        for r, stream in zip(long, streams):
            await engine.abort(r.request_id)
            await stream.aclose()


async def test_queue_full_rejection(engine, monkeypatch):
    monkeypatch.setattr(engine.config, "max_queue", 2)
    long = [GenerationRequest(prompt="long", width=256, height=256, num_inference_steps=60, seed=i,
                              request_id=f"queue-full-{i}", deadline_s=600) for i in range(2)]
    streams = [engine.generate(r) for r in long]
    for stream in streams:
        assert (await stream.__anext__()).kind == "queued"
    with pytest.raises(RequestRejected) as info:
        await engine.generate(GenerationRequest(prompt="one too many", width=64, height=64)).__anext__()
    assert info.value.reason == "queue_full" and info.value.retry_after_s > 0
    # Sent together (an HTTP request's n images), requests are taken all or none: a group of two
    # that does not fit is refused whole and counted as two rejected, none cancelled.
    await engine.abort(long[1].request_id)
    await streams[1].aclose()
    before = engine.stats()["states"]
    group = engine.generate(GenerationRequest(prompt="pair", width=64, height=64), group_size=2)
    with pytest.raises(RequestRejected, match="comes with 1 more"):
        await group.__anext__()
    after = engine.stats()["states"]
    assert after["rejected"] - before["rejected"] == 2 and after["cancelled"] == before["cancelled"]
    assert await engine.abort(long[0].request_id)
    await streams[0].aclose()
    assert engine.stats()["states"]["rejected"] >= 1


async def test_break_out_of_generate_cancels_and_frees_devices(engine):
    request = GenerationRequest(prompt="leave early", width=512, height=512, num_inference_steps=60, seed=3,
                                request_id="leaver", deadline_s=600)
    cancelled_before = engine.stats()["states"]["cancelled"]
    async with contextlib.aclosing(engine.generate(request)) as stream:
        step = await first_output(stream, "step")
        assert step.step >= 1
        assert engine.placement("leaver")  # its latent is on some devices
    # Left the stream: the request stops at its next step boundary (or round end) and is released.
    if engine.request_state("leaver") is not None:
        assert await engine.abort("leaver")  # waits for it to end
    assert engine.request_state("leaver") is None
    assert engine.placement("leaver") == ()
    assert engine.busy_devices() == [] and engine.stats()["running"] == 0
    assert engine.stats()["states"]["cancelled"] == cancelled_before + 1
    # The engine keeps serving on the freed devices.
    outputs, _ = await run_to_final(engine, GenerationRequest(prompt="after", width=128, height=128,
                                                              num_inference_steps=3))
    assert outputs[-1].state == RequestState.COMPLETED


async def test_cancelled_consumer_task_aborts_the_request(engine):
    request = GenerationRequest(prompt="task cancelled", width=512, height=512, num_inference_steps=60,
                                request_id="cancelled-task", deadline_s=600)
    running = asyncio.Event()

    async def consume():
        async for out in engine.generate(request):
            if out.kind == "step":
                running.set()

    task = asyncio.create_task(consume())
    await running.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    if engine.request_state("cancelled-task") is not None:
        await engine.abort("cancelled-task")
    assert engine.placement("cancelled-task") == ()


async def test_abort_ends_the_stream_with_cancelled(engine):
    request = GenerationRequest(prompt="abort me", width=512, height=512, num_inference_steps=60,
                                request_id="abort-me", deadline_s=600)
    stream = engine.generate(request)
    await first_output(stream, "round")
    assert await engine.abort("abort-me")
    rest = [out async for out in stream]
    final = rest[-1]
    assert final.kind == "final" and final.state == RequestState.CANCELLED
    assert "aborted" in final.error
    assert final.step < 60
    assert await engine.abort("abort-me") is False  # already ended
    assert engine.placement("abort-me") == ()


async def test_injected_step_failure_fails_one_request_only(engine, monkeypatch):
    adapter = engine.executor.runtime.adapter
    real_velocity = adapter.velocity
    victim_seed = 424242

    def velocity(transformer, latents, prepared, step_indices, inputs):
        if any(p.seed == victim_seed for p in prepared):
            raise RuntimeError("injected failure in the victim's step")
        return real_velocity(transformer, latents, prepared, step_indices, inputs)

    monkeypatch.setattr(adapter, "velocity", velocity)
    requests = [GenerationRequest(prompt=f"r{i}", width=128, height=128, num_inference_steps=5, seed=i,
                                  deadline_s=600) for i in range(5)]
    requests.append(GenerationRequest(prompt="victim", width=128, height=128, num_inference_steps=5,
                                      seed=victim_seed, request_id="victim", deadline_s=600))
    results = await asyncio.gather(*(run_to_final(engine, r) for r in requests))
    finals = {r.request_id or r.seed: outputs[-1] for r, (outputs, _) in zip(requests, results)}
    victim = finals.pop("victim")
    assert victim.state == RequestState.FAILED and "injected failure" in victim.error
    assert victim.metrics.deadline_met is False
    assert all(f.state == RequestState.COMPLETED for f in finals.values())
    assert engine.placement("victim") == ()
    monkeypatch.undo()
    outputs, _ = await run_to_final(engine, GenerationRequest(prompt="still serving", width=64, height=64,
                                                              num_inference_steps=2))
    assert outputs[-1].state == RequestState.COMPLETED


async def test_preview_outputs(engine):
    request = GenerationRequest(prompt="preview", width=256, height=128, num_inference_steps=12,
                                preview_every=1, deadline_s=600)
    outputs, _ = await run_to_final(engine, request)
    assert outputs[-1].state == RequestState.COMPLETED
    previews = [o for o in outputs if o.kind == "preview"]
    rounds = sum(o.kind == "round" for o in outputs)
    # One preview per round boundary before the end (previews come between rounds).
    assert len(previews) == rounds - 1
    assert all(p.image.size == (256 // 8, 128 // 8) for p in previews)


async def test_live_requests_show_deadline_slack_late_and_the_running_group(engine, monkeypatch):
    assert engine.live_requests() == []
    on_time = GenerationRequest(prompt="on time", width=256, height=256, num_inference_steps=40,
                                request_id="live-on-time", deadline_s=600)
    monkeypatch.setattr(engine.config, "admission", "best_effort")
    hopeless = GenerationRequest(prompt="hopeless", width=256, height=256, num_inference_steps=20,
                                 request_id="live-hopeless", deadline_s=1e-3)
    stream = engine.generate(on_time)
    await first_output(stream, "step")
    late_stream = engine.generate(hopeless)
    await first_output(late_stream, "queued")
    running = None
    for _ in range(500):  # until a snapshot catches it inside a group (bounded polls, not a timer)
        live = {r["request_id"]: r for r in engine.live_requests()}
        assert live["live-hopeless"]["slack_s"] < 0  # it cannot make it, even before its deadline passed
        if live["live-on-time"]["devices"] and live["live-hopeless"]["late"]:
            running = live["live-on-time"]
            break
        await asyncio.sleep(0.005)
    assert running is not None, live
    now_s = time.monotonic() - engine.started_s
    assert (running["width"], running["height"], running["num_steps"]) == (256, 256, 40)
    assert running["state"] == "running" and 0 <= running["steps_done"] < 40
    assert running["deadline_s"] - running["arrival_s"] == pytest.approx(600)
    assert 0 < running["slack_s"] < running["deadline_s"] - now_s  # remaining work is not free
    assert running["late"] is False
    assert set(running["devices"]) <= set(DEVICES) and running["group_start_s"] <= now_s

    outputs = [out async for out in stream] + [out async for out in late_stream]
    assert {o.state for o in outputs if o.kind == "final"} == {RequestState.COMPLETED}
    assert engine.live_requests() == []
    # The running group it showed is the one round_records() reports once it ends (same clock, same key).
    groups = [g for r in engine.round_records() for g in r.groups if "live-on-time" in g.request_ids]
    assert any(g.start_s == running["group_start_s"] and list(g.devices) == running["devices"] for g in groups)


# ---- a policy that moves a request across groups of every width, to check seeds survive regroups ----

def moving_policy(num_devices, cost):
    from tetri_engine.sched import GroupSpec, Policy

    pattern = [(0,), (1, 2), (0, 1, 2, 3), (3,), (2, 3), (1,)]

    class MovingPolicy(Policy):
        """Round-synchronous; "ref-*" requests stay on device 0 one step at a time, the others walk
        through `pattern`, two steps per group."""

        name = "moving"
        synchronous_rounds = True

        def _plan(self, now_s, idle, ready):
            specs, used = [], set()
            for req in ready:
                if req.request_id.startswith("ref-"):
                    group, steps = (0,), 1
                else:
                    group, steps = pattern[req.rounds % len(pattern)], 2
                if used.intersection(group):
                    continue
                used.update(group)
                specs.append(GroupSpec(group, (req.request_id,), min(steps, req.remaining_steps)))
            return specs

    return MovingPolicy(num_devices, cost)


async def test_same_seed_same_image_at_degree_1_and_regrouped(cache_dir):
    config = EngineConfig(model="tiny", devices=DEVICES, cache_dir=cache_dir)
    async with AsyncEngine(config, policy_factory=moving_policy) as engine:
        common = dict(prompt="a red fox", width=256, height=128, num_inference_steps=10, seed=7, deadline_s=600)
        (ref, _), (moved, _) = await asyncio.gather(
            run_to_final(engine, GenerationRequest(request_id="ref-1", **common)),
            run_to_final(engine, GenerationRequest(request_id="moved-1", **common)))
    ref_final, moved_final = ref[-1], moved[-1]
    assert ref_final.state == moved_final.state == RequestState.COMPLETED
    assert ref_final.metrics.steps_at_degree == {1: 10}
    assert set(moved_final.metrics.steps_at_degree) == {1, 2, 4}
    assert moved_final.metrics.regroups >= 4
    assert {o.degree for o in moved if o.kind == "round"} == {1, 2, 4}
    a = np.asarray(ref_final.image, dtype=np.int16)
    b = np.asarray(moved_final.image, dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # float round-off may flip the last bit of a pixel


async def test_shutdown_with_drain_finishes_accepted_and_refuses_new(cache_dir):
    engine = AsyncEngine(EngineConfig(model="tiny", devices=DEVICES, cache_dir=cache_dir))
    await engine.start()
    requests = [GenerationRequest(prompt=f"drain {i}", width=128, height=128, num_inference_steps=8, seed=i,
                                  deadline_s=600) for i in range(3)]
    streams = [engine.generate(r) for r in requests]
    for stream in streams:
        assert (await stream.__anext__()).kind == "queued"
    shutdown = asyncio.create_task(engine.shutdown(drain=True))
    await asyncio.sleep(0)  # the shutdown task starts: the engine is draining
    assert engine.is_draining and not engine.is_ready
    with pytest.raises(RequestRejected) as info:
        await engine.generate(GenerationRequest(prompt="too late", width=64, height=64)).__anext__()
    assert info.value.reason == "draining"
    finals = [[out async for out in stream][-1] for stream in streams]
    await shutdown
    assert all(f.state == RequestState.COMPLETED and f.image is not None for f in finals)
    with pytest.raises(EngineNotRunning):
        await engine.generate(GenerationRequest(prompt="stopped")).__anext__()


async def test_shutdown_without_drain_cancels_everything(cache_dir):
    engine = AsyncEngine(EngineConfig(model="tiny", devices=DEVICES, cache_dir=cache_dir))
    await engine.start()
    requests = [GenerationRequest(prompt=f"no drain {i}", width=512, height=512, num_inference_steps=80,
                                  seed=i, request_id=f"nodrain-{i}", deadline_s=600) for i in range(6)]
    streams = [engine.generate(r) for r in requests]
    for stream in streams:
        assert (await stream.__anext__()).kind == "queued"
    await first_output(streams[0], "step")  # at least one is running
    await engine.shutdown(drain=False)
    for r, stream in zip(requests, streams):
        final = [out async for out in stream][-1]
        assert final.kind == "final" and final.state == RequestState.CANCELLED
        assert "without draining" in final.error
        assert final.step < 80
        assert engine.placement(r.request_id) == ()
    stats = engine.stats()
    assert stats["states"]["cancelled"] == len(requests)
    assert stats["phase"] == "stopped"


def poison_policy(num_devices, cost):
    from tetri_engine.sched import GroupSpec, Policy

    class PoisonPolicy(Policy):
        """One device per request, all its steps; raises (a scheduler bug) when "poison" is waiting."""

        name = "poison"

        def _plan(self, now_s, idle, ready):
            if any(r.request_id == "poison" for r in ready):
                raise RuntimeError("scheduler bug on purpose")
            return [GroupSpec((d,), (r.request_id,), r.remaining_steps) for d, r in zip(idle, ready)]

    return PoisonPolicy(num_devices, cost)


async def test_an_exception_in_the_round_loop_fails_requests_instead_of_hanging(cache_dir):
    config = EngineConfig(model="tiny", devices=DEVICES, cache_dir=cache_dir)
    async with AsyncEngine(config, policy_factory=poison_policy) as engine:
        outputs, _ = await run_to_final(engine, GenerationRequest(prompt="p", width=64, height=64, request_id="poison",
                                                                  num_inference_steps=2, deadline_s=600))
        assert outputs[-1].state == RequestState.FAILED
        assert "internal error while planning" in outputs[-1].error and "on purpose" in outputs[-1].error
        outputs, _ = await run_to_final(engine, GenerationRequest(prompt="fine", width=64, height=64,
                                                                  num_inference_steps=2, deadline_s=600))
        assert outputs[-1].state == RequestState.COMPLETED


def pair_policy(num_devices, cost):
    from tetri_engine.sched import GroupSpec, Policy

    class PairPolicy(Policy):
        """Every step in one group on devices (0, 1): "pair-*" requests batched once both are ready,
        the others alone. A cancelled request can only end early if the executor stops it mid-group."""

        name = "pair"

        def group_s(self, *args, **kwargs):  # (the measured profile has no batches)
            return 1.0

        def _plan(self, now_s, idle, ready):
            if 0 not in idle or 1 not in idle:
                return []
            pair = [r for r in ready if r.request_id.startswith("pair-")]
            if len(pair) == 2:
                return [GroupSpec((0, 1), tuple(r.request_id for r in pair), pair[0].remaining_steps)]
            alone = [r for r in ready if not r.request_id.startswith("pair-")]
            return [GroupSpec((0, 1), (alone[0].request_id,), alone[0].remaining_steps)] if alone else []

    return PairPolicy(num_devices, cost)


async def test_leaving_generate_stops_the_request_mid_group(cache_dir):
    """Breaking out of generate() stops the request at the next step boundary, not at its group's end:
    the group that planned all 60 of its steps reports far fewer, the policy learns that and frees the
    devices. In a batch, the other request runs all of its steps and completes."""
    config = EngineConfig(model="tiny", devices=DEVICES, cache_dir=cache_dir)
    async with AsyncEngine(config, policy_factory=pair_policy) as engine:
        common = dict(width=512, height=512, num_inference_steps=60, deadline_s=600)
        async with contextlib.aclosing(engine.generate(GenerationRequest(
                prompt="leave", request_id="alone", seed=1, **common))) as stream:
            await first_output(stream, "step")
        if engine.request_state("alone") is not None:
            await engine.abort("alone")  # waits for its group to report
        group = engine.round_records()[-1].groups[0]
        assert group.request_ids == ("alone",) and group.planned_steps == 60
        assert group.steps_done["alone"] < 60 // 2  # (a group without cancel reports 60)
        assert engine.busy_devices() == [] and engine.placement("alone") == ()
        assert not engine._core.policy.busy_devices and not engine._core.policy.has_work()

        stay = asyncio.create_task(run_to_final(engine, GenerationRequest(
            prompt="stay", request_id="pair-stay", seed=2, **common)))
        async with contextlib.aclosing(engine.generate(GenerationRequest(
                prompt="leave", request_id="pair-leave", seed=3, **common))) as stream:
            await first_output(stream, "step")
        outputs, _ = await stay
        assert outputs[-1].state == RequestState.COMPLETED and outputs[-1].metrics.steps_at_degree == {2: 60}
        group = engine.round_records()[-1].groups[0]
        assert group.request_ids == ("pair-stay", "pair-leave") or group.request_ids == ("pair-leave", "pair-stay")
        assert group.steps_done["pair-stay"] == 60 and group.steps_done["pair-leave"] < 60 // 2
        assert engine.request_state("pair-leave") is None and engine.placement("pair-leave") == ()
        assert engine.busy_devices() == [] and engine.stats()["states"]["cancelled"] == 2


async def test_switch_policy_only_while_idle_and_keeps_serving(engine):
    before = engine.policy_name
    agen = engine.generate(GenerationRequest(prompt="busy", width=128, height=128, num_inference_steps=30))
    await first_output(agen, "queued")
    with pytest.raises(RuntimeError, match="idle"):
        await engine.switch_policy("fixed1")
    async for _ in agen:  # let it finish
        pass
    with pytest.raises(ValueError):
        await engine.switch_policy("nope")
    with pytest.raises(ValueError, match="exactly one"):
        await engine.switch_policy()
    assert engine.policy_name == before  # a refused switch changes nothing
    await engine.switch_policy("fixed1")
    try:
        assert engine.policy_name == "fixed1" and engine.stats()["rounds"] == 0  # counters start afresh
        outputs, _ = await run_to_final(engine, GenerationRequest(prompt="after", width=64, height=64,
                                                                   num_inference_steps=3))
        assert outputs[-1].state == RequestState.COMPLETED
        assert dict(outputs[-1].metrics.steps_at_degree) == {1: 3}  # fixed1: every step at degree 1
        assert engine.stats()["states"]["completed"] == 1
    finally:
        await engine.switch_policy(before)


async def test_an_unknown_policy_is_refused_before_anything_loads():
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        AsyncEngine(EngineConfig(model="tiny", devices=DEVICES, policy="nope"))
    AsyncEngine(EngineConfig(model="tiny", devices=DEVICES, policy="fixed16"))  # a known family, any degree


async def test_the_policy_is_told_of_cancels_but_never_asked_to_abort_a_completed_request(cache_dir):
    from tetri_engine.sched import make_policy

    aborted = []

    def recording_tetri(num_devices, cost):
        policy = make_policy("tetri", num_devices, cost)
        abort = policy.abort

        def record(request_id):
            aborted.append(request_id)
            return abort(request_id)

        policy.abort = record
        return policy

    config = EngineConfig(model="tiny", devices=DEVICES, cache_dir=cache_dir)
    async with AsyncEngine(config, policy_factory=recording_tetri) as engine:
        results = await asyncio.gather(*(run_to_final(engine, GenerationRequest(
            prompt=f"done {i}", width=64, height=64, num_inference_steps=3, seed=i, deadline_s=600))
            for i in range(3)))
        assert all(outputs[-1].state == RequestState.COMPLETED for outputs, _ in results)
        async with contextlib.aclosing(engine.generate(GenerationRequest(
                prompt="leave", width=512, height=512, num_inference_steps=60, request_id="leaves",
                deadline_s=600))) as stream:
            await first_output(stream, "step")
        if engine.request_state("leaves") is not None:
            await engine.abort("leaves")
    assert aborted == ["leaves"]  # its steps were not done: the policy still planned it
