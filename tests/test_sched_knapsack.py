"""Group knapsack DP against brute force, and placement on aligned groups."""
from __future__ import annotations

import itertools
import random

import pytest

from tetri_engine.sched.knapsack import group_knapsack
from tetri_engine.sched.placement import aligned_blocks, all_groups, place


def brute_force(items, capacity):
    best = float("-inf")
    for combo in itertools.product(*[range(len(opts)) for opts in items]):
        width = sum(items[i][j][0] for i, j in enumerate(combo))
        if width <= capacity:
            best = max(best, sum(items[i][j][1] for i, j in enumerate(combo)))
    return best


def test_dp_matches_brute_force_on_random_instances():
    rng = random.Random(7)
    for _ in range(300):
        capacity = rng.randint(0, 8)
        items = []
        for _ in range(rng.randint(1, 6)):
            opts = [(0, float(rng.randint(0, 1)))]
            for _ in range(rng.randint(1, 3)):
                opts.append((rng.choice([1, 2, 4, 8]), rng.randint(0, 2) + rng.random() * 0.3))
            items.append(opts)
        value, chosen = group_knapsack(items, capacity)
        assert value == pytest.approx(brute_force(items, capacity))
        # The back-pointers describe a feasible choice with that value.
        assert sum(items[i][j][0] for i, j in enumerate(chosen)) <= capacity
        assert sum(items[i][j][1] for i, j in enumerate(chosen)) == pytest.approx(value)


def test_dp_known_answer():
    # 4 devices: A needs 4 to survive, B and C need 2 each: saving B and C beats saving A.
    items = [[(0, 0.0), (4, 1.0)], [(0, 0.0), (2, 1.0)], [(0, 0.0), (2, 1.0)]]
    value, chosen = group_knapsack(items, 4)
    assert value == 2.0 and chosen == [0, 1, 1]


def test_dp_without_skip_option_that_cannot_fit():
    with pytest.raises(ValueError):
        group_knapsack([[(4, 1.0)]], 2)


def test_aligned_blocks():
    assert aligned_blocks(8, 4) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert aligned_blocks(4, 2) == [(0, 1), (2, 3)]
    assert len(all_groups(8, (1, 2, 4, 8))) == 7


def test_place_keeps_requests_on_their_devices():
    out = place([("a", 2, (2, 3)), ("b", 2, (0, 1)), ("c", 1, (5,))], range(8), 8)
    assert out == {"a": (2, 3), "b": (0, 1), "c": (5,)}


def test_place_grows_around_current_devices_and_avoids_others():
    # a grows from (4,5) to 4 devices: the aligned block containing it, not b's block.
    out = place([("a", 4, (4, 5)), ("b", 2, (0, 1))], range(8), 8)
    assert out["a"] == (4, 5, 6, 7) and out["b"] == (0, 1)


def test_place_prefers_existing_communicator():
    # New request (no latent yet): prefer a group whose communicator exists.
    out = place([("a", 2, ())], range(8), 8, known_groups={(4, 5)})
    assert out["a"] == (4, 5)


def test_place_widest_first_never_fragments():
    rng = random.Random(3)
    for _ in range(200):
        widths = []
        free = 8
        while free:
            w = rng.choice([d for d in (1, 2, 4, 8) if d <= free])
            widths.append(w)
            free -= w
        reqs = [(i, w, tuple(rng.sample(range(8), rng.choice([0, 1, 2])))) for i, w in enumerate(widths)]
        out = place(reqs, range(8), 8)
        assert len(out) == len(widths)
        used = [d for devs in out.values() for d in devs]
        assert len(used) == len(set(used)) == 8
        for key, w, _ in reqs:
            assert len(out[key]) == w and out[key][0] % w == 0
