"""The xDiT baseline harness (bench/xdit_baseline.py) on a CPU: trace loading, the FLUX sigma schedule,
the FCFS replay model and summary, argument checks, and the dry run. Nothing here imports xfuser
(it needs triton and a GPU at import); the GPU paths run under torchrun on the lent machines."""
from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


common = _load("_xdit_common", "_xdit_common.py")
replay = _load("_xdit_replay", "_xdit_replay.py")
runners = _load("_xdit_runners", "_xdit_runners.py")
xdit = _load("xdit_baseline", "xdit_baseline.py")


def _write_trace(tmp_path: Path, rows: list, extra_lines: tuple[str, ...] = (), name: str = "trace.jsonl") -> str:
    path = tmp_path / name
    lines = list(extra_lines) + [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _req(arrival_s, size=512, steps=50, slo_ms=2000.0, **extra):
    return {"arrival_s": arrival_s, "width": size, "height": size, "steps": steps, "slo_ms": slo_ms, **extra}


# ------------------------------------------------------------------------------------------- trace

def test_trace_is_loaded_in_arrival_order_with_comments_and_extra_keys(tmp_path):
    path = _write_trace(tmp_path, [_req(2.0, 1024, slo_ms=3000, mix="skewed"), _req(0.5, 256, request_id="a"),
                                   _req(0.5, 512)], extra_lines=("# generated", ""))
    reqs = common.load_trace(path)
    assert [r.arrival_s for r in reqs] == [0.5, 0.5, 2.0]
    assert [r.width for r in reqs] == [256, 512, 1024]       # equal arrivals keep file order
    assert reqs[0].request_id == "a" and reqs[1].request_id == "req-00002"
    assert reqs[2].deadline_at(1.0) == pytest.approx(5.0) and reqs[2].deadline_at(1.5) == pytest.approx(6.5)
    assert reqs[2].image_tokens == 4096


@pytest.mark.parametrize("row, message", [
    ({"arrival_s": 0, "width": 512, "height": 512, "steps": 50}, r"missing field\(s\) slo_ms"),
    (_req(0, 500), "multiples of 16"),
    (_req(0, steps=0), "steps must be >= 1"),
    (_req(-1), "arrival_s"),
    (_req(0, slo_ms=0), "slo_ms must be > 0"),
])
def test_bad_trace_lines_name_the_line(tmp_path, row, message):
    path = _write_trace(tmp_path, [_req(0), row])
    with pytest.raises(ValueError, match=message) as info:
        common.load_trace(path)
    assert "trace.jsonl:2" in str(info.value)


def test_overrides_shorten_the_smoke_but_keep_arrivals_and_slos(tmp_path):
    reqs = common.load_trace(_write_trace(tmp_path, [_req(i, steps=50, slo_ms=1500) for i in range(5)]))
    short = common.apply_overrides(reqs, steps_override=2, max_requests=3)
    assert [(r.arrival_s, r.steps, r.slo_ms) for r in short] == [(0, 2, 1500), (1, 2, 1500), (2, 2, 1500)]


def test_resolutions_parse_squares_and_rectangles():
    assert common.parse_resolutions("256, 512,1024x768") == [(256, 256), (512, 512), (1024, 768)]
    with pytest.raises(ValueError):
        common.parse_resolutions("250")


# ----------------------------------------------------------------------------------- sigma schedule

def test_flux_sigmas_match_diffusers_flow_match_scheduler():
    np = pytest.importorskip("numpy")
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, seq = 28, 4096
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=common.flux_mu(seq))
    ours = common.flux_sigmas(steps, seq)
    assert len(ours) == steps + 1 and ours[0] == pytest.approx(1.0) and ours[-1] == 0.0
    assert ours == pytest.approx([float(s) for s in sched.sigmas], abs=1e-6)


# -------------------------------------------------------------------------------- FCFS and summary

def test_fcfs_queues_one_at_a_time_and_stops_at_the_budget(tmp_path):
    reqs = common.load_trace(_write_trace(tmp_path, [
        _req(0.0, steps=10, slo_ms=1500), _req(0.2, steps=10, slo_ms=1500), _req(5.0, steps=10, slo_ms=1500),
        _req(6.0, steps=10, slo_ms=1500)]))
    scales = common.parse_scales("1.0,1.5")
    recs = common.simulate_fcfs(reqs, lambda r: r.steps * 0.1, scales, budget_s=6.5)
    assert [(r.start_s, r.finish_s) for r in recs[:3]] == [(0.0, 1.0), (1.0, 2.0), (5.0, 6.0)]
    assert [r.deadline_met for r in recs] == [True, False, True, False]
    # the second request waits 0.8 s behind the first: late at scale 1.0 (1.7 s), in time at 1.5 (2.45 s)
    assert [r.met_by_scale for r in recs[:2]] == [{"1": True, "1.5": True}, {"1": False, "1.5": True}]
    assert recs[3].status == "not_run_budget" and recs[3].finish_s is None and "budget" in recs[3].error

    s = common.summarize(recs, scales)
    assert s["requests"] == 4 and s["deadline_met"] == 2 and s["not_run_budget"] == 1
    assert s["sar"] == pytest.approx(0.5)             # the request not run counts as missed
    assert s["sar_by_scale"] == pytest.approx({"1": 0.5, "1.5": 0.75})
    assert s["sar_of_run"] == pytest.approx(2 / 3)
    assert s["busy_s"] == pytest.approx(3.0) and s["replay_span_s"] == pytest.approx(6.0)
    assert s["by_resolution"]["512x512"]["sar"] == pytest.approx(0.5)


def test_a_failed_request_is_missed_at_every_scale(tmp_path):
    req = common.load_trace(_write_trace(tmp_path, [_req(0.0, slo_ms=9000)]))[0]
    rec = common.make_record(req, [1.0, 2.0], "failed", 0.0, 0.5, error="OOM")
    assert rec.met_by_scale == {"1": False, "2": False} and rec.latency_s is None and rec.error == "OOM"
    assert json.loads(rec.to_json())["status"] == "failed"


def test_percentiles_interpolate_like_numpy():
    assert common.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert common.percentile([5.0], 99) == 5.0
    assert common.percentile([], 50) is None


def test_unpack_latents_inverts_fluxs_2x2_packing():
    torch = pytest.importorskip("torch")
    b, c, h, w = 1, 16, 12, 8                      # latent of a 64x96 (w x h) image
    latents = torch.randn(b, c, h, w)
    packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    assert torch.equal(runners.unpack_latents(packed, width=w * 8, height=h * 8), latents)
    ids = runners.latent_image_ids(width=w * 8, height=h * 8)
    assert ids.shape == (packed.shape[1], 3) and ids[-1].tolist() == [0.0, h // 2 - 1, w // 2 - 1]


# ------------------------------------------------------------------------------------------- CLI

def test_serve_needs_a_budget_and_refuses_time_scaling(tmp_path, capsys):
    trace = _write_trace(tmp_path, [_req(0)])
    with pytest.raises(SystemExit):
        xdit.parse_args(["serve", "--trace", trace])                                   # no --max-seconds
    with pytest.raises(SystemExit):
        xdit.parse_args(["serve", "--trace", trace, "--max-seconds", "60", "--time-scale", "0.1"])
    with pytest.raises(SystemExit):
        xdit.parse_args(["serve", "--trace", trace, "--max-seconds", "60", "--steps-override", "0"])
    with pytest.raises(SystemExit):
        xdit.parse_args(["serve", "--trace", trace, "--max-seconds", "60", "--slo-scales", "1.0,-1"])
    args = xdit.parse_args(["serve", "--trace", trace, "--max-seconds", "60", "--steps-override", "2"])
    assert args.steps_override == 2 and args.dtype == "bf16" and args.output.endswith("xdit-serve.jsonl")


def test_step_defaults_cover_the_four_resolutions_with_ten_timed_forwards():
    args = xdit.parse_args(["step"])
    assert args.sizes == [(256, 256), (512, 512), (1024, 1024), (2048, 2048)]
    assert args.iters >= 10 and args.text_tokens == 512 and args.path == "auto"


def test_dry_runs_plan_without_xfuser_or_a_gpu(tmp_path, capsys):
    trace = _write_trace(tmp_path, [_req(0.0, 256, slo_ms=1500), _req(1.0, 2048, slo_ms=5000),
                                    _req(400.0, 512, slo_ms=2000)])
    out_path = tmp_path / "never-written.jsonl"
    assert xdit.main(["serve", "--trace", trace, "--max-seconds", "300", "--dry-run", "--output", str(out_path),
                      "--slo-scales", "1.0,1.5", "--no-compress-idle"]) == 0
    text = capsys.readouterr().out
    assert "would run 2 of 3" in text                      # waited out, the third arrives after the budget
    assert "not_run_budget" in text and "req-00001" in text and "@ 1.5" in text
    assert xdit.main(["serve", "--trace", trace, "--max-seconds", "300", "--dry-run", "--output", str(out_path)]) == 0
    assert "would run 3 of 3" in capsys.readouterr().out   # skipped, the 400 s gap costs no budget
    assert xdit.main(["step", "--resolutions", "256,2048", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "16896" in text                                 # 2048²: 16384 image + 512 text tokens
    assert "xfuser" not in sys.modules and not out_path.exists()
    torch = sys.modules.get("torch")
    assert torch is None or not torch.cuda.is_initialized()


# ------------------------------------------------------------------ idle-gap compression, several traces

GAPPED = [_req(0.0, 512, steps=2, slo_ms=1000), _req(100.0, 512, steps=2, slo_ms=1000),
          _req(200.0, 512, steps=2, slo_ms=1000)]     # 2 x 102.2 ms each (the dry run's estimate): 0.2044 s


def _plan(argv: list[str]) -> list[dict]:
    return replay.plan_serve(xdit.parse_args(["serve", "--dry-run", *argv]))


def test_idle_gaps_are_skipped_and_change_no_outcome(tmp_path, capsys):
    trace = _write_trace(tmp_path, GAPPED)
    service = 2 * 0.1022
    [fast] = _plan(["--trace", trace, "--slo-scales", "1.0,1.5"])
    [slow] = _plan(["--trace", trace, "--slo-scales", "1.0,1.5", "--no-compress-idle"])
    assert fast["summary"]["skipped_s"] == pytest.approx(200.0 - 2 * service)       # both gaps, minus service
    assert fast["summary"]["replay_wall_s"] == pytest.approx(3 * service)            # vs a 200 s trace span
    assert slow["summary"]["skipped_s"] == 0.0 and slow["summary"]["replay_wall_s"] == pytest.approx(200 + service)
    for key in ("arrival_s", "start_s", "finish_s", "latency_s"):
        assert [getattr(r, key) for r in fast["records"]] == pytest.approx([getattr(r, key) for r in slow["records"]])
    assert [r.met_by_scale for r in fast["records"]] == [r.met_by_scale for r in slow["records"]]
    assert [r.latency_s for r in fast["records"]] == pytest.approx([service] * 3)
    # the busy fraction is over the trace's own timeline (wall + skipped), so compression does not change it
    assert fast["summary"]["replay_span_s"] == pytest.approx(200 + service)
    assert fast["summary"]["busy_fraction"] == pytest.approx(slow["summary"]["busy_fraction"])
    assert fast["summary"]["busy_fraction"] == pytest.approx(3 * service / (200 + service))
    t = time.perf_counter()
    assert xdit.main(["serve", "--trace", trace, "--dry-run"]) == 0
    assert time.perf_counter() - t < 5.0                  # the dry run's clock is virtual: no sleeping
    assert "199.6 s idle skipped" in capsys.readouterr().out


def test_the_budget_counts_wall_time_not_skipped_time(tmp_path):
    trace = _write_trace(tmp_path, GAPPED)
    budget = ["--trace", trace, "--max-seconds", "130", "--dry-run-setup-s", "120"]   # 10 s of wall time
    [fast] = _plan(budget)
    [slow] = _plan(budget + ["--no-compress-idle"])
    assert [r.status for r in fast["records"]] == ["completed"] * 3
    assert [r.status for r in slow["records"]] == ["completed", "not_run_budget", "not_run_budget"]


def test_the_replay_matches_the_fcfs_model_without_compression(tmp_path):
    trace = _write_trace(tmp_path, [_req(0.0, 256), _req(0.5, 2048), _req(1.0, 512), _req(60.0, 1024),
                                    _req(61.0, 512), _req(500.0, 256)])
    [run] = _plan(["--trace", trace, "--no-compress-idle", "--max-seconds", "300", "--dry-run-setup-s", "100"])
    est = common.step_ms_estimator(dict(common.DEFAULT_STEP_MS_ESTIMATE))
    model = common.simulate_fcfs(common.load_trace(trace), lambda r: r.steps * est(r.width, r.height) / 1000,
                                 [1.0], budget_s=200.0)
    assert [(r.status, r.start_s, r.finish_s) for r in run["records"]] == \
        [(m.status, pytest.approx(m.start_s), pytest.approx(m.finish_s)) for m in model]
    assert run["records"][-1].status == "not_run_budget"


def test_several_traces_in_one_launch_are_told_apart_by_label(tmp_path, capsys):
    a = _write_trace(tmp_path, GAPPED, name="trace-uniform.jsonl")
    b = _write_trace(tmp_path, GAPPED[:2], name="trace-skewed.jsonl")
    runs = _plan(["--trace", f"{a},{b}", "--labels", "uniform,skewed", "--slo-scales", "1.0,1.5"])
    rows = [row for run in runs for row in run["rows"]]
    requests = [(r["label"], r["request_id"]) for r in rows if r["kind"] == "request"]
    assert requests == [("uniform", "req-00000"), ("uniform", "req-00001"), ("uniform", "req-00002"),
                        ("skewed", "req-00000"), ("skewed", "req-00001")]
    summaries = [r for r in rows if r["kind"] == "summary"]
    assert [(r["label"], r["slo_scale"]) for r in summaries] == [("uniform", 1.0), ("uniform", 1.5),
                                                                 ("skewed", 1.0), ("skewed", 1.5)]
    assert {r["trace"] for r in summaries} == {a, b} and all(r["skipped_s"] > 99 for r in summaries)
    # default labels are the file names; they must tell the traces apart
    assert xdit.parse_args(["serve", "--trace", f"{a},{b}", "--dry-run"]).labels == ["trace-uniform", "trace-skewed"]
    with pytest.raises(SystemExit):
        xdit.parse_args(["serve", "--trace", f"{a},{b}", "--labels", "one", "--dry-run"])
    with pytest.raises(SystemExit):
        xdit.parse_args(["serve", "--trace", f"{a},{a}", "--dry-run"])
    capsys.readouterr()
    assert xdit.main(["serve", "--trace", f"{a},{b}", "--labels", "uniform,skewed", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "[uniform]" in text and "[skewed]" in text and "5 request lines + 2 summary lines" in text


def test_a_summary_line_is_scored_at_its_own_slo_scale(tmp_path):
    # 2048² behind 256²: waits, late at scale 1.0, in time at 3.0
    trace = _write_trace(tmp_path, [_req(0.0, 256, steps=10, slo_ms=2000), _req(0.0, 2048, steps=10, slo_ms=5000)])
    [run] = _plan(["--trace", trace, "--slo-scales", "1.0,3.0"])
    one, three = [r for r in run["rows"] if r["kind"] == "summary"]
    assert (one["slo_scale"], one["deadline_met"], one["sar"]) == (1.0, 1, 0.5)
    assert (three["slo_scale"], three["deadline_met"], three["sar"]) == (3.0, 2, 1.0)
    assert one["by_resolution"]["2048x2048"]["sar"] == 0.0 and three["by_resolution"]["2048x2048"]["sar"] == 1.0


class _StubRunner:
    """Stands in for xfuser on a CPU: a few ms per forward, zero velocity."""
    path, detail, attention, degree = "stub", "stub runner (test)", "none", 1

    def forward(self, inputs):
        import torch

        time.sleep(0.005)
        return torch.zeros_like(inputs["hidden_states"])


def test_live_serve_skips_idle_gaps_in_real_time_and_writes_both_traces(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    with socket.socket() as sock:                         # a free port for the one-rank gloo group
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(sock.getsockname()[1]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(xdit, "select_runner", lambda args, ctx, tcfg: (_StubRunner(), []))
    a = _write_trace(tmp_path, [_req(0.0, 64, steps=2), _req(3.0, 64, steps=2), _req(6.0, 64, steps=2)], name="a.jsonl")
    b = _write_trace(tmp_path, [_req(0.0, 64, steps=2), _req(4.0, 64, steps=2)], name="b.jsonl")
    out = tmp_path / "out.jsonl"
    t = time.perf_counter()
    assert xdit.main(["serve", "--trace", f"{a},{b}", "--labels", "uniform,skewed", "--model", "tiny",
                      "--device", "cpu", "--text-tokens", "8", "--no-vae-decode", "--max-seconds", "3600",
                      "--slo-scales", "1.0,1.5", "--output", str(out)]) == 0
    assert time.perf_counter() - t < 5.0                  # the traces span 6 s + 4 s
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    reqs = [r for r in rows if r["kind"] == "request"]
    assert [r["label"] for r in reqs] == ["uniform"] * 3 + ["skewed"] * 2
    assert all(r["status"] == "completed" and r["latency_s"] < 1.0 and r["path"] == "stub" for r in reqs)
    assert [r["start_s"] for r in reqs] == pytest.approx([0.0, 3.0, 6.0, 0.0, 4.0], abs=0.5)
    summaries = {(r["label"], r["slo_scale"]): r for r in rows if r["kind"] == "summary"}
    assert list(summaries) == [("uniform", 1.0), ("uniform", 1.5), ("skewed", 1.0), ("skewed", 1.5)]
    for (label, _), s in summaries.items():
        assert s["skipped_s"] == pytest.approx(6.0 if label == "uniform" else 4.0, abs=0.5)
        assert s["replay_span_s"] == pytest.approx(s["replay_wall_s"] + s["skipped_s"])
        assert s["busy_fraction"] == pytest.approx(s["busy_s"] / s["replay_span_s"]) and s["sar"] == 1.0
