"""`tetri-engine simulate` smoke test: a small sweep prints the SAR table and writes its files."""
from __future__ import annotations

import json
import os

from tetri_engine.cli import main
from tetri_engine.sched.trace import generate_trace, write_trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H200 = os.path.join(REPO, "bench", "profiles", "flux-dev-h200-modelled.json")


def test_simulate_sweep_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["simulate", "--profile", H200, "--gpus", "4", "--mix", "uniform,skewed", "--rate", "8",
               "--num-requests", "25", "--slo-scale", "1.0,1.5", "--policies", "tetri,fixed1,fixed8,rssp",
               "--output", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr()
    assert "SAR, uniform-8rpm, 4 devices" in text.out and "tetri" in text.out
    assert "bound" in text.out and "LP relaxation" in text.out and "slowdown" in text.out
    assert "skipping policy fixed8" in text.err  # needs 8 devices
    for name in ("results.json", "sar.png", "gantt-uniform-8rpm.png", "gantt-skewed-8rpm.png",
                 "trace-uniform-8rpm.jsonl", "trace-skewed-8rpm.jsonl"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["policies"] == ["tetri", "fixed1", "rssp"]
    sweep = results["sweeps"][0]
    assert set(sweep["sar"]) == {"tetri", "fixed1", "rssp"} and len(sweep["sar"]["tetri"]) == 2
    assert "best_fixed" in sweep["gains"]
    assert len(sweep["bound"]) == 2 and all(b >= max(sweep["sar"][p][i] for p in sweep["sar"]) - 1e-9
                                            for i, b in enumerate(sweep["bound"]))
    assert set(sweep["runs"]["tetri"][0]["slowdown"]) >= {"p50", "p90", "p99"}


def test_simulate_replays_a_trace_file(tmp_path, capsys):
    trace = tmp_path / "mine.jsonl"
    write_trace(str(trace), generate_trace(10, 6, "uniform", seed=3))
    rc = main(["simulate", "--profile", H200, "--gpus", "2", "--trace", str(trace), "--slo-scale", "2",
               "--policies", "tetri,fixed2", "--output", str(tmp_path / "o"), "--no-plots", "--quiet"])
    assert rc == 0
    assert "SAR, mine, 2 devices" in capsys.readouterr().out
    assert not (tmp_path / "o" / "sar.png").exists()


def test_simulate_bad_profile_is_an_error(tmp_path, capsys):
    rc = main(["simulate", "--profile", str(tmp_path / "missing.json"), "--output", str(tmp_path), "--quiet"])
    assert rc == 2
    assert "cannot load profile" in capsys.readouterr().err
