"""The one metrics library (tetri_engine/sched/metrics.py): stated conventions, checked."""
import math
import random

import pytest

from tetri_engine.sched.metrics import distribution, percentile, sar, slowdown


def test_percentile_interpolates_like_numpy_linear():
    np = pytest.importorskip("numpy")
    rng = random.Random(3)
    for n in (1, 2, 3, 7, 100):
        xs = [rng.uniform(0, 10) for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 100):
            assert math.isclose(percentile(xs, q), float(np.percentile(xs, q)), rel_tol=1e-12)


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([4.0], 99) == 4.0
    assert percentile([1.0, 3.0], 50) == 2.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_sar_counts_every_request_in_the_denominator():
    assert sar([True, False, None, True]) == 0.5  # None (rejected, not run) counts as missed
    assert sar([]) is None


def test_slowdown_and_distribution():
    assert slowdown(6.0, 2.0) == 3.0
    with pytest.raises(ValueError):
        slowdown(1.0, 0.0)
    d = distribution([1.0, 2.0, 3.0, 4.0])
    assert d["count"] == 4 and d["mean"] == 2.5 and d["max"] == 4.0 and d["p50"] == 2.5
    assert distribution([])["p99"] is None
