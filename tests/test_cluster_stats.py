"""The replicas' stats folded into one engine's (cluster/stats.py), as /health and /metrics read them,
and the cluster's command-line flags. No Ray needed."""
from __future__ import annotations

import argparse

import pytest

from tetri_engine.cluster import ClusterConfig
from tetri_engine.cluster.stats import ClusterStats
from tetri_engine.cluster.wire import ReplicaStatus
from tetri_engine.commands import serve as serve_command
from tetri_engine.request import SizeRule
from tetri_engine.server.metrics import LatencyHistograms


def status(replica: str, *, completed=0, met=0, total=0, waiting=0, running=0, steps=(), step_count=None,
           busy=()) -> ReplicaStatus:
    devices = (f"{replica}/cpu:0", f"{replica}/cpu:1")
    stats = {"states": {"completed": completed, "failed": 0, "cancelled": 0, "rejected": 0,
                        "waiting": waiting, "running": running},
             "queue_depth": waiting, "running": running, "deadline_met": met, "deadline_total": total,
             "regroups": 0, "rounds": completed, "device_busy_fraction": {d: 0.5 for d in devices},
             "comm_cache": {"hits": 1, "misses": 1, "size": 1},
             "step_latency_s": list(steps), "step_latency_count": len(steps) if step_count is None else step_count,
             "step_latency_sum_s": sum(steps), "round_latency_s": [], "round_latency_count": 0,
             "round_latency_sum_s": 0.0}
    return ReplicaStatus(replica, 1, True, False, "tiny", "tetri", devices, tuple(busy), 20, SizeRule(), stats)


def test_gauges_sum_over_live_replicas_and_counters_never_go_back():
    book = ClusterStats()
    book.update([status("a", completed=3, met=2, total=3, waiting=1), status("b", completed=1, met=1, total=1,
                                                                            running=2, busy=("b/cpu:0",))])
    s = book.stats()
    assert s["states"]["completed"] == 4 and s["queue_depth"] == 1 and s["running"] == 2
    assert s["sar"] == pytest.approx(3 / 4) and len(s["devices"]) == 4 and len(s["device_busy_fraction"]) == 4
    assert s["comm_cache"]["hits"] == 2 and s["replicas"] == ["a", "b"]
    # "a" dies: its queue is gone, its counts stay (Prometheus counters must not go back).
    book.update([status("b", completed=2, met=2, total=2)])
    s = book.stats()
    assert s["states"]["completed"] == 5 and s["queue_depth"] == 0 and s["deadline_total"] == 5
    assert s["devices"] == ["b/cpu:0", "b/cpu:1"] and s["comm_cache"]["size"] == 1
    # A replica that missed one poll and answers again is counted once.
    book.update([status("a", completed=3, met=2, total=3), status("b", completed=2, met=2, total=2)])
    assert book.stats()["states"]["completed"] == 5


def test_latency_histograms_fold_each_new_sample_once():
    book, histograms = ClusterStats(), LatencyHistograms()
    book.update([status("a", steps=[0.002]), status("b", steps=[0.2, 0.3])])
    histograms.fold(book.stats())
    book.update([status("a", steps=[0.002, 0.004]), status("b", steps=[0.2, 0.3])])  # one new sample, on "a"
    histograms.fold(book.stats())
    assert histograms.step.count == 4 and histograms.step.sum_s == pytest.approx(0.506)
    cumulative = dict(histograms.step.cumulative())
    assert cumulative["0.0025"] == 1 and cumulative["0.005"] == 2 and cumulative["0.25"] == 3
    # "b" restarts (its counters start again): its new samples count, the totals keep growing.
    book.update([status("a", steps=[0.002, 0.004]), status("b", steps=[0.01])])
    histograms.fold(book.stats())
    assert histograms.step.count == 5 and dict(histograms.step.cumulative())["0.01"] == 3


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cluster_flags():
    config = ClusterConfig.from_args(parse("--replicas", "3", "--devices-per-replica", "8", "--routing", "pow2",
                                           "--ray-address", "10.0.0.1:6379"))
    assert (config.replicas, config.devices_per_replica, config.routing, config.ray_address) == \
        (3, 8, "pow2", "10.0.0.1:6379") and config.enabled
    assert not ClusterConfig.from_args(parse()).enabled  # make serve: one host, no Ray
    with pytest.raises(SystemExit):
        parse("--routing", "random")
    with pytest.raises(ValueError, match="replicas"):
        ClusterConfig(replicas=0)
    assert serve_command.run(parse("--replicas", "0")) == 2


def test_a_cluster_takes_devices_per_replica_not_a_device_list():
    from tetri_engine.cluster.engine import ClusterEngine
    from tetri_engine.config import EngineConfig

    with pytest.raises(ValueError, match="--devices-per-replica"):
        ClusterEngine(EngineConfig(devices=["cpu:0", "cpu:1"]), ClusterConfig(replicas=2))
    with pytest.raises(ValueError, match="unknown policy"):
        ClusterEngine(EngineConfig(policy="nope"), ClusterConfig(replicas=2))
