"""Group knapsack: choose exactly one option per item, total width <= capacity, maximum total value.

This is step 2 of a TetriServe round (Algorithm 1 of the paper): items are requests, options are
"do not run this round" (width 0) or "run the next segment at degree k" (width k), values are how
many requests can still meet their deadline (plus small tie-breaks). Dynamic programming over
capacity: O(items x capacity x options) time, O(capacity) for the values plus the back-pointers.
"""
from __future__ import annotations

from typing import Sequence

NEG_INF = float("-inf")


def group_knapsack(items: Sequence[Sequence[tuple[int, float]]], capacity: int) -> tuple[float, list[int]]:
    """items[i] is a list of (width, value) options; returns (best total value, option index per item).

    Every item must take one option; give it a (0, value) option to make "skip" possible. Ties go to
    the lower option index, and, between capacities, to the solution using less width. Raises
    ValueError when no choice fits (an item without a zero-width option and no room for it).
    """
    if capacity < 0:
        raise ValueError("capacity must be >= 0")
    # best[c]: best value of the items so far using at most c width.
    best = [0.0] * (capacity + 1)
    choices: list[list[int]] = []  # choices[i][c]: option taken by item i in the best solution within c
    for options in items:
        width0, value0 = options[0]
        if width0 == 0:  # the usual "skip" option first: a shifted copy, no inner loop
            new = [b + value0 for b in best]
            pick = [0] * (capacity + 1)
            rest = enumerate(options[1:], 1)
        else:
            new = [NEG_INF] * (capacity + 1)
            pick = [-1] * (capacity + 1)
            rest = enumerate(options)
        for j, (width, value) in rest:
            for c in range(width, capacity + 1):
                v = best[c - width] + value  # -inf stays -inf
                if v > new[c]:
                    new[c] = v
                    pick[c] = j
        best = new
        choices.append(pick)
    # Smallest capacity reaching the best value: the solution that leaves the most devices free.
    top = max(best)
    if top == NEG_INF:
        raise ValueError("no combination of options fits in the capacity")
    c = best.index(top)
    chosen = [0] * len(items)
    for i in range(len(items) - 1, -1, -1):
        j = choices[i][c]
        chosen[i] = j
        c -= items[i][j][0]
    return top, chosen
