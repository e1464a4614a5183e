"""bench/e2e_slo.py on this CPU: the tiny model on 4 virtual devices, one warm engine for every run,
policies switched in between, idle gaps skipped, deadline-blind policies run once for all scales."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from tetri_engine import AsyncEngine, EngineConfig
from tetri_engine.sched.trace import TraceRequest

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


def load_e2e():
    spec = importlib.util.spec_from_file_location("e2e_slo", ROOT / "bench" / "e2e_slo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replay_skips_idle_gaps_only(tmp_path):
    e2e = load_e2e()
    # Arrivals 1.5 s apart, each request done in well under that: the engine is empty at every arrival.
    trace = [TraceRequest(1.5 * i, 64, 64, 3, slo_ms=60_000, request_id=f"r{i}") for i in range(4)]

    async def run(compress: bool):
        config = EngineConfig(model="tiny", devices=DEVICES, cache_dir=str(tmp_path), profile=None)
        async with AsyncEngine(config) as engine:
            start = time.monotonic()
            records, skipped = await e2e.replay(engine, trace, 1.0, compress)
            return records, skipped, time.monotonic() - start

    plain, plain_skipped, plain_wall = asyncio.run(run(False))
    fast, fast_skipped, fast_wall = asyncio.run(run(True))
    assert plain_skipped == 0.0 and plain_wall >= 4.5  # slept through the gaps
    assert all(r["state"] == "completed" and r["met"] for r in plain + fast)
    # The skipped time is the idle time: the whole span but the requests' own service times.
    busy = sum(r["latency_s"] for r in fast)
    assert fast_skipped == pytest.approx(4.5 - busy, abs=0.5)
    assert fast_wall < plain_wall - 3.0


def test_overlapping_requests_are_not_compressed(tmp_path):
    """A gap is skipped only while nothing is outstanding: arrivals that overlap keep their spacing."""
    e2e = load_e2e()
    trace = [TraceRequest(0.0, 256, 256, 40, slo_ms=60_000, request_id="long"),
             TraceRequest(0.3, 64, 64, 2, slo_ms=60_000, request_id="short")]

    async def run():
        config = EngineConfig(model="tiny", devices=DEVICES, cache_dir=str(tmp_path))
        async with AsyncEngine(config) as engine:
            return await e2e.replay(engine, trace, 1.0, True)

    records, skipped = asyncio.run(run())
    long, short = records
    assert long["latency_s"] > 0.3, "the test needs the first request still running at the second arrival"
    assert skipped == 0.0
    # Not compressed: the second request goes out 0.3 s after the first, never sooner. (It may go out
    # a little later: on a loaded CPU the tiny model's eager steps hold the GIL and the loop wakes late.)
    assert 0.28 <= short["sent_engine_s"] - long["sent_engine_s"] <= 0.3 + 0.5


def test_harness_one_engine_all_runs(tmp_path):
    out = tmp_path / "e2e"
    cmd = [sys.executable, str(ROOT / "bench" / "e2e_slo.py"), "--model", "tiny", "--sides", "64,128",
           "--steps", "3", "--rate-per-min-per-8-gpus", "30", "--num-requests", "4", "--slo-scales", "1.0,1.5",
           "--policies", "tetri,fixed1", "--mix", "uniform", "--output", str(out)]
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("engine started") == 1  # one engine for the three runs
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["policy"], r["slo_scale"], r["shared_run"]) for r in runs] == [
        ("tetri", 1.0, False), ("tetri", 1.5, False), ("fixed1", 1.0, True), ("fixed1", 1.5, True)]
    assert all(r["completed"] == 4 for r in runs)
    assert all(r["skipped_idle_s"] > 0 for r in runs)  # 4 requests at 15/min: mostly idle
    reqs = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    fixed = [r for r in reqs if r["policy"] == "fixed1"]
    # fixed1 never reads deadlines: one run, scored twice with the same latencies.
    by_scale = {s: [r["latency_s"] for r in fixed if r["slo_scale"] == s] for s in (1.0, 1.5)}
    assert by_scale[1.0] == by_scale[1.5] and len(by_scale[1.0]) == 4
    assert sorted({round(r["deadline_s"] / r["slo_s"], 6) for r in fixed}) == [1.0, 1.5]
    assert (out / "gantt-uniform-1-tetri.png").stat().st_size > 0
    assert "| uniform | 1.5 | fixed1 |" in (out / "summary.md").read_text()
