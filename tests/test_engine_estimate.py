"""`AsyncEngine.estimate`: what taking a request now would do, from admission and the scheduler's own
model, without changing anything (the tiny model on 2 CPU devices; the profile is measured once and
cached, as in the other engine tests)."""
from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest
from tetri_engine.errors import EngineNotRunning, RejectionReason, RequestRejected

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    async with AsyncEngine(EngineConfig(model="tiny", devices=["cpu:0", "cpu:1"], max_width=256, max_height=256,
                                        max_steps=40, max_queue=3)) as started:
        yield started


def request(deadline_s: float | None = None, steps: int = 20, **fields) -> GenerationRequest:
    return GenerationRequest(prompt="a red fox", width=256, height=256, num_inference_steps=steps,
                             deadline_s=deadline_s, **fields)


def alone_s(engine: AsyncEngine, steps: int = 20, degree: int = 1) -> float:
    """Encode + steps at `degree` + decode, from the engine's own profile."""
    cost = engine.cost_model
    return cost.encode_s() + steps * cost.step_s(256, 256, degree) + cost.decode_s(256, 256)


async def test_an_idle_engine_takes_it_and_nothing_changes(engine):
    before = engine.stats()["states"]
    e = engine.estimate(request(deadline_s=60.0))
    assert e.accepts and e.fits and e.reason == "fits" and e.retry_after_s is None
    assert 0 < e.finish_s <= e.deadline_s == 60.0 and e.cost_s > 0 and e.delay_s == 0 and e.held == 0
    default = engine.estimate(request())  # no deadline given: the SLO table's, as admission sets it
    assert default.deadline_s > 0 and default.fits
    assert engine.stats()["states"] == before and engine.live_requests() == []


async def test_invalid_requests_raise_as_admission_does(engine):
    with pytest.raises(ValueError, match="multiple of 16"):
        engine.estimate(GenerationRequest(prompt="x", width=250, height=256))
    with pytest.raises(ValueError, match="num_inference_steps"):
        engine.estimate(request(steps=41))
    with pytest.raises(EngineNotRunning):
        AsyncEngine(EngineConfig(model="tiny", devices=["cpu:0"])).estimate(request())


async def test_requests_still_encoding_count_and_estimate_agrees_with_admission(engine):
    tight = 1.2 * alone_s(engine)  # each needs one device for most of its window
    held = [engine.generate(request(deadline_s=tight, seed=i)) for i in range(2)]
    try:
        for outputs in held:
            assert (await outputs.__anext__()).kind == "queued"
        # No await since: their prompts are still being encoded, the policy does not hold them yet,
        # and the estimate counts them anyway (a burst routed one by one sees the earlier ones).
        e = engine.estimate(request(deadline_s=tight))
        assert e.held == 2 and not e.fits and not e.accepts and e.reason == "busy"
        assert e.retry_after_s is not None and e.retry_after_s > 0
        for outputs in held:  # now the policy holds them (it may batch them): admission decides as
            while (await outputs.__anext__()).kind != "round":  # the estimate said, at the same instant
                pass
        e = engine.estimate(request(deadline_s=tight, seed=5))
        attempt = engine.generate(request(deadline_s=tight, seed=5))
        try:
            taken = (await attempt.__anext__()).kind == "queued"
        except RequestRejected as exc:
            taken = False
            assert exc.reason == RejectionReason(e.reason)
        finally:
            await attempt.aclose()
        assert taken == e.accepts == e.fits
        # A request with room to spare fits beside them, and says what it costs them.
        roomy = engine.estimate(request(deadline_s=60.0))
        assert roomy.accepts and roomy.fits and roomy.held == 2
        # The queue bound (max_queue=3): a third held request fills it.
        third = engine.generate(request(deadline_s=60.0, seed=9))
        await third.__anext__()
        full = engine.estimate(request(deadline_s=60.0))
        assert full.reason == "queue_full" and not full.accepts and full.retry_after_s > 0 and full.held == 3
        await third.aclose()
    finally:
        for outputs in held:
            await outputs.aclose()


async def test_admission_counts_requests_still_encoding_as_the_estimate_does(engine):
    """A burst sent within one encode: the later requests see the earlier ones (before, admission saw only
    what the policy held and took them all, leaving the scheduler to give some up)."""
    for _ in range(400):  # the requests the tests above cancelled have ended (bounded wait)
        if not engine.live_requests():
            break
        await asyncio.sleep(0.05)
    assert not engine.live_requests()
    tight = 1.2 * alone_s(engine)
    held = [engine.generate(request(deadline_s=tight, seed=i)) for i in range(2)]
    try:
        for outputs in held:
            assert (await outputs.__anext__()).kind == "queued"
        e = engine.estimate(request(deadline_s=tight, seed=7))
        assert not e.fits and e.reason == "busy"
        third = engine.generate(request(deadline_s=tight, seed=7))
        with pytest.raises(RequestRejected) as info:  # admission agrees, at the same instant
            await third.__anext__()
        assert info.value.reason == RejectionReason.BUSY and info.value.retry_after_s > 0
    finally:
        for outputs in held:
            await outputs.aclose()
