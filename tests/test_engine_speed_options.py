"""The speed options at the engine's level (issue 17): which shapes the start-up warm-up compiles, the
options as EngineConfig fields and `serve` flags, an engine started with them on CPU devices, and the
profile refresh that merges one GPU's degree-1 rows into a 2-GPU profile."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from tetri_engine import AsyncEngine, EngineConfig, GenerationRequest
from tetri_engine.engine.profiling import merge_profiles
from tetri_engine.engine.warmup import plan_warmup
from tetri_engine.executor.warmup import WarmupShape
from tetri_engine.request import SizeRule
from tetri_engine.sched import CostModel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLUX_PROFILE = os.path.join(REPO_ROOT, "bench", "profiles", "flux-dev-2xH200.json")


def test_warmup_covers_every_shape_the_policy_can_plan_on_every_device():
    """The worked example of engine/warmup.py: the flux-dev 2xH200 profile, 2 GPUs, tetri's groups."""
    cost = CostModel.from_json(FLUX_PROFILE)
    rule = SizeRule(multiple_px=16, min_px=256, max_width=2048, max_height=2048)  # (the 64x64 anchor: left out)
    shapes = plan_warmup(cost.step_ms, [(0, 1)], 2, rule)
    degree1 = [s for s in shapes if len(s.group) == 1]
    degree2 = [s for s in shapes if len(s.group) == 2]
    assert len(degree1) == 2 * 8 and len(degree2) == 4 and len(shapes) == 20
    assert {s.group for s in degree1} == {(0,), (1,)} and {s.group for s in degree2} == {(0, 1)}
    assert {(s.width, s.batch) for s in degree1} == {(256, 1), (256, 2), (256, 4), (512, 1), (512, 2), (512, 4),
                                                     (1024, 1), (2048, 1)}
    assert shapes[0] == WarmupShape(256, 256, (0,), 1) and shapes[-1] == WarmupShape(2048, 2048, (0, 1), 1)


def test_warmup_adds_configured_sizes_and_drops_what_cannot_run():
    rule = SizeRule(multiple_px=16, min_px=64, max_width=1024, max_height=1024)
    keys = [(512, 512, 1, 1), (2048, 2048, 1, 1), (512, 512, 2, 1), (512, 512, 4, 1)]
    shapes = plan_warmup(keys, [(0, 1), (2, 3)], 4, rule, extra_sizes=[(1024, 768), (4096, 64)])
    # 2048 is beyond the size rule, degree 4 is not among the policy's groups, 4096 is too wide
    assert {(s.width, s.height, len(s.group)) for s in shapes} == {(512, 512, 1), (512, 512, 2), (1024, 768, 1),
                                                                   (1024, 768, 2)}
    assert sorted({s.group for s in shapes if len(s.group) == 2}) == [(0, 1), (2, 3)]
    assert len(shapes) == 2 * (4 + 2)


def test_speed_options_are_checked_engine_config_fields():
    config = EngineConfig(dtype="fp8", compile=False, attention="cudnn", ulysses_chunks=4,
                          warmup_sizes=["1024x768", "768X1024"])
    assert config.warmup_size_list() == [(1024, 768), (768, 1024)]
    assert EngineConfig().compile is True and EngineConfig().attention == "auto"
    for fields, words in ((dict(ulysses_chunks=0), "ulysses_chunks"), (dict(warmup_sizes=["big"]), "not a size WxH"),
                          (dict(warmup_sizes=["1000x1000"]), "not a multiple of 16"),
                          (dict(warmup_sizes=["4096x512"]), "beyond the maximum")):
        with pytest.raises(ValueError, match=words):
            EngineConfig(**fields)


def test_serve_has_a_flag_for_each_speed_option():
    out = subprocess.run([sys.executable, "-m", "tetri_engine", "serve", "--help"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for flag in ("--compile", "--no-compile", "--attention", "--ulysses-chunks", "--warmup-sizes"):
        assert flag in text
    assert "fp8" in text and "cudnn" in text


async def test_an_engine_on_cpu_devices_takes_the_options_and_says_what_it_ignores(caplog):
    config = EngineConfig(model="tiny", devices=["cpu:0", "cpu:1"], compile=True, attention="auto",
                          ulysses_chunks=2, profile=FLUX_PROFILE,
                          max_width=512, max_height=512)
    with caplog.at_level(logging.INFO, logger="tetri_engine.model"):
        async with AsyncEngine(config) as engine:
            assert not engine.executor.model.compiled and engine.warmup_report is None
            assert engine.executor.model.attention == "sdpa"
            outputs = [o async for o in engine.generate(GenerationRequest("a fox", 64, 64, 2, seed=1,
                                                                          deadline_s=60.0))]
    assert outputs[-1].state == "completed"
    assert any("torch.compile is for GPU runs" in r.getMessage() for r in caplog.records)


def test_degree_1_rows_merge_into_a_two_gpu_profile():
    base = {"model": "flux-dev", "machine": "2xH200", "num_devices": 2, "dtype": "bfloat16",
            "created": "2026-11-23T04:01:08Z", "source": "old", "settings": {"degrees": [1, 2]},
            "step_ms": [{"width": 1024, "height": 1024, "degree": 1, "batch": 1, "ms": 170.9},
                        {"width": 1024, "height": 1024, "degree": 2, "batch": 1, "ms": 105.8},
                        {"width": 64, "height": 64, "degree": 1, "batch": 1, "ms": 21.1, "extrapolated": True},
                        {"width": 64, "height": 64, "degree": 2, "batch": 1, "ms": 22.8, "extrapolated": True}],
            "decode_ms": [{"width": 1024, "height": 1024, "ms": 277.0}, {"width": 2048, "height": 2048, "ms": 1112.5}],
            "encode_ms": 15.9}
    new = {"model": "flux-dev", "machine": "1xH200", "num_devices": 1, "dtype": "bfloat16", "compiled": True,
           "attention": "cudnn", "created": "2026-12-05T00:00:00Z", "source": "new", "settings": {"degrees": [1]},
           "step_ms": [{"width": 1024, "height": 1024, "degree": 1, "batch": 1, "ms": 137.0},
                       {"width": 64, "height": 64, "degree": 1, "batch": 1, "ms": 18.0, "extrapolated": True}],
           "decode_ms": [{"width": 1024, "height": 1024, "ms": 270.0}], "encode_ms": 15.0}
    merged = merge_profiles(base, new)
    by = {(e["width"], e["degree"]): e for e in merged["step_ms"]}
    assert by[(1024, 1)]["ms"] == 137.0 and by[(1024, 1)]["measured"] == "2026-12-05T00:00:00Z"
    assert by[(1024, 2)]["ms"] == 105.8 and by[(1024, 2)]["measured"] == "2026-11-23T04:01:08Z"
    assert by[(64, 1)]["ms"] == 18.0 and by[(64, 2)]["ms"] == 22.8
    assert merged["machine"] == "2xH200" and merged["num_devices"] == 2 and merged["settings"] == {"degrees": [1, 2]}
    assert merged["compiled"] is True and merged["encode_ms"] == 15.0
    assert {(e["width"], e["ms"]) for e in merged["decode_ms"]} == {(1024, 270.0), (2048, 1112.5)}
    assert [run["created"] for run in merged["merged"]] == [base["created"], new["created"]]
    assert merged["merged"][-1]["degrees"] == [1]
    assert sorted((e["width"], e["degree"]) for e in merged["extrapolated"]) == [(64, 1), (64, 2)]
    cost = CostModel.from_dict(json.loads(json.dumps(merged)))  # still a profile the scheduler loads
    assert cost.step_s(1024, 1024, 1) == pytest.approx(0.137)


def test_profile_command_refreshes_rows_of_an_existing_profile(tmp_path, capsys):
    from tetri_engine.cli import main

    base, output = tmp_path / "base.json", tmp_path / "out.json"
    assert main(["profile", "--model", "tiny", "--devices", "cpu:0,cpu:1", "--resolutions", "64", "--degrees", "1,2",
                 "--batches", "1", "--steps", "1", "--warmup-steps", "0", "--chunk-steps", "1", "--decode-repeats",
                 "1", "--output", str(base)]) == 0
    assert main(["profile", "--model", "tiny", "--devices", "cpu:0", "--resolutions", "64", "--degrees", "1",
                 "--batches", "1", "--steps", "1", "--warmup-steps", "0", "--chunk-steps", "1", "--decode-repeats",
                 "1", "--attention", "math", "--merge-into", str(base), "--output", str(output)]) == 0
    before, after = json.loads(base.read_text()), json.loads(output.read_text())
    degree2 = [e for e in after["step_ms"] if e["degree"] == 2 and not e.get("extrapolated")]
    assert degree2 and all(e["measured"] == before["created"] for e in degree2)
    degree1 = [e for e in after["step_ms"] if e["degree"] == 1 and not e.get("extrapolated")]
    assert degree1 and all(e["measured"] == after["created"] for e in degree1)
    assert [run["degrees"] for run in after["merged"][1:]] == [[1]]  # (created: both runs may share the second)
    assert after["attention"] == "math" != before["attention"] and after["num_devices"] == 2
    CostModel.from_dict(after)
