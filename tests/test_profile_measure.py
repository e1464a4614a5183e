"""Step-time profiling (tetri_engine/engine/profiling.py) on the real tiny model and executor, and the
`tetri-engine profile` command."""
from __future__ import annotations

import json

import pytest

from tetri_engine.engine import profiling
from tetri_engine.sched import CostModel

DEVICES = ["cpu:0", "cpu:1"]


@pytest.fixture(scope="module")
def runtime_and_executor():
    from tetri_engine import ops
    from tetri_engine.executor import Executor
    from tetri_engine.model import load_runtime

    runtime = load_runtime("tiny", devices=DEVICES)
    executor = Executor(runtime, DEVICES, ops.CommCache())
    yield runtime, executor
    executor.shutdown()


SMALL = profiling.ProfileSettings(resolutions=((64, 64), (128, 128)), degrees=(1, 2, 4), batches=(1, 2), steps=2,
                                  warmup_steps=1, chunk_steps=1, decode_repeats=1, anchors=((64, 64), (512, 512)))


def test_measured_profile_covers_what_was_asked_and_loads_as_a_cost_model(runtime_and_executor):
    runtime, executor = runtime_and_executor
    profile = profiling.measure_profile(executor, SMALL, model_name="tiny")
    measured = {(e["width"], e["degree"], e["batch"]) for e in profile["step_ms"] if not e.get("extrapolated")}
    # Degree 4 needs 4 devices: skipped. Batch 2 only at degree 1.
    assert measured == {(64, 1, 1), (64, 2, 1), (128, 1, 1), (128, 2, 1), (64, 1, 2), (128, 1, 2)}
    assert all(e["ms"] > 0 for e in profile["step_ms"])
    assert all(e["n"] == 2 for e in profile["step_ms"] if not e.get("extrapolated"))
    extrapolated = {(e["width"], e["degree"]) for e in profile["step_ms"] if e.get("extrapolated")}
    assert extrapolated == {(512, 1), (512, 2)}  # 64x64 was measured: no anchor there
    assert {(e["width"], e["height"]) for e in profile["decode_ms"]} == {(64, 64), (128, 128)}
    assert profile["encode_ms"] > 0 and profile["num_devices"] == 2
    cost = CostModel.from_dict(profile)
    assert cost.degrees == (1, 2)
    ms_128 = cost.step_s(128, 128, 1)
    assert ms_128 <= cost.step_s(256, 256, 1) <= cost.step_s(512, 512, 1)  # interpolated between them
    assert executor.placement("__profile__/1") is None  # profiling requests are released


def test_extrapolated_anchors_are_bounded():
    entries = [{"width": 128, "height": 128, "degree": 1, "batch": 1, "ms": 10.0},
               {"width": 256, "height": 256, "degree": 1, "batch": 1, "ms": 20.0},
               {"width": 512, "height": 512, "degree": 1, "batch": 1, "ms": 60.0},
               {"width": 128, "height": 128, "degree": 2, "batch": 1, "ms": 30.0},
               {"width": 512, "height": 512, "degree": 2, "batch": 1, "ms": 31.0}]
    added = profiling._add_anchors(entries, [(64, 64), (2048, 2048)], [1, 2])
    by = {(a["width"], a["degree"]): a["ms"] for a in added}
    assert 5.0 <= by[(64, 1)] <= 10.0  # small: at most the smallest measured, at least half of it
    assert by[(2048, 1)] >= 60.0 * 16  # large: at least proportional to tokens from the largest measured
    assert by[(2048, 2)] >= by[(2048, 1)] / 2  # never more than linear speed-up, even extrapolated
    assert all(e["extrapolated"] for e in entries[5:])


def test_startup_profile_is_cached_on_disk(runtime_and_executor, tmp_path):
    from tetri_engine import ops
    from tetri_engine.config import EngineConfig
    from tetri_engine.executor import Executor

    runtime, executor = runtime_and_executor
    settings = profiling.ProfileSettings(resolutions=((64, 64), (128, 128)), degrees=(1, 2), steps=1,
                                         warmup_steps=0, chunk_steps=1, decode_repeats=1)
    size_rule = EngineConfig(max_width=2048, max_height=2048).size_rule()
    first = profiling.load_or_measure_profile(executor, "tiny", cache_dir=str(tmp_path), size_rule=size_rule,
                                              settings=settings)
    # A shut-down executor cannot measure anything: the second call must come from the cache.
    stopped = Executor(runtime, DEVICES, ops.CommCache())
    stopped.shutdown()
    second = profiling.load_or_measure_profile(stopped, "tiny", cache_dir=str(tmp_path), size_rule=size_rule,
                                               settings=settings)
    assert second == first
    # A corrupt cache file is measured over.
    path = profiling.cache_path(str(tmp_path), "tiny", DEVICES, "float32", settings,
                                {"compiled": False, "attention": "sdpa"})
    with open(path, "w") as f:
        f.write("{not json")
    third = profiling.load_or_measure_profile(executor, "tiny", cache_dir=str(tmp_path), size_rule=size_rule,
                                              settings=settings)
    assert {(e["width"], e["degree"]) for e in third["step_ms"]} == {(e["width"], e["degree"]) for e in first["step_ms"]}
    with open(path) as f:
        assert json.load(f)["created"] == third["created"]


def test_profile_command_writes_a_profile_the_scheduler_loads(tmp_path, capsys):
    from tetri_engine.cli import main

    output, table = tmp_path / "p.json", tmp_path / "p.md"
    rc = main(["profile", "--model", "tiny", "--devices", "cpu:0,cpu:1", "--resolutions", "64,128", "--degrees",
               "1,2", "--batches", "1", "--steps", "2", "--warmup-steps", "1", "--chunk-steps", "1",
               "--decode-repeats", "1", "--output", str(output), "--table", str(table)])
    assert rc == 0
    cost = CostModel.from_json(str(output))
    cost.check(64, 64)
    cost.check(2048, 2048)  # --extend 64,2048 by default: every size the engine admits can be costed
    text = table.read_text()
    assert "| 128x128 |" in text and "2048x2048" in text and "*" in text


def test_the_profile_measures_the_parallel_methods_the_model_offers():
    """tiny-sd3 (true CFG at its default guidance): each even degree again with the guidance branches side
    by side, and the decode on 2 devices; a model or settings without a method get no such rows."""
    from tetri_engine import ops
    from tetri_engine.executor import Executor
    from tetri_engine.model import load_runtime

    settings = profiling.ProfileSettings(resolutions=((64, 64),), degrees=(1, 2), batches=(1,), steps=1,
                                         warmup_steps=0, chunk_steps=1, decode_repeats=1)
    with Executor(load_runtime("tiny-sd3", DEVICES), DEVICES, ops.CommCache()) as executor:
        profile = profiling.measure_profile(executor, settings, model_name="tiny-sd3")
        only_sp = profiling.measure_profile(executor, profiling.ProfileSettings(
            **{**settings.__dict__, "methods": ("ulysses",)}), model_name="tiny-sd3")
    layouts = {(e["degree"], e.get("cfg", 1)) for e in profile["step_ms"]}
    assert layouts == {(1, 1), (2, 1), (2, 2)}
    assert {e.get("degree", 1) for e in profile["decode_ms"]} == {1, 2}
    cost = CostModel.from_dict(profile)
    assert cost.cfg_degrees == (2,) and cost.decode_degrees == (1, 2)
    assert "cfg 2 x sp 1" in profiling.format_table(profile) and "decode ms (2 dev)" in profiling.format_table(profile)
    assert {e.get("cfg", 1) for e in only_sp["step_ms"]} == {1} and {e.get("degree", 1) for e in only_sp["decode_ms"]} == {1}
    merged = profiling.merge_profiles(only_sp, profile)  # layout rows merge in beside the others
    assert len(merged["step_ms"]) == 3 and len(merged["decode_ms"]) == 2
