"""Placement: map group widths to concrete device ids (step 3 of a TetriServe round).

Groups are aligned contiguous blocks, like a buddy allocator: a group of k devices (k a power of
two) starts at a multiple of k. On 8 devices:

    degree 8: (0..7)
    degree 4: (0,1,2,3) (4,5,6,7)
    degree 2: (0,1) (2,3) (4,5) (6,7)
    degree 1: (0) (1) ... (7)

so there are only 2N-1 distinct groups (7 multi-device communicators on 8 GPUs, all of which the
engine can create at start-up), neighbours on NVLink/PCIe switches stay together, and placing
widths in decreasing order can never fragment: after the wider blocks are placed, the free devices
are still a union of aligned blocks of the current width.

Among the free aligned blocks a group prefers, in order: the exact devices its latent is on (no
move, warm communicator); the most devices already holding its LoRA adapter set (no switch: issue 19,
when the caller says what the devices hold and what each request wants); a block whose communicator
already exists; the most overlap with where its latent is (least data moved); not taking devices where
another request of this round sits; the lowest index.
"""
from __future__ import annotations

import functools
from typing import Iterable, Mapping, Sequence


@functools.lru_cache(maxsize=256)
def _blocks(num_devices: int, degree: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(range(start, start + degree)) for start in range(0, num_devices - degree + 1, degree))


def aligned_blocks(num_devices: int, degree: int) -> list[tuple[int, ...]]:
    """Every aligned contiguous block of `degree` devices among 0..num_devices-1."""
    return list(_blocks(num_devices, degree))


def all_groups(num_devices: int, degrees: Iterable[int]) -> list[tuple[int, ...]]:
    """Every multi-device group a policy using these degrees can form (communicators to warm up)."""
    out: list[tuple[int, ...]] = []
    for d in sorted(set(degrees)):
        if 1 < d <= num_devices:
            out.extend(aligned_blocks(num_devices, d))
    return out


def place(
    requests: Sequence[tuple[object, int, tuple[int, ...]]],
    free_devices: Iterable[int],
    num_devices: int,
    known_groups: set[tuple[int, ...]] | frozenset[tuple[int, ...]] = frozenset(),
    held: Mapping[int, object] | None = None,
    wants: Mapping[object, object] | None = None,
) -> dict[object, tuple[int, ...]]:
    """Place (key, degree, current_device_ids) items on free devices. held: device -> the LoRA adapter set
    its weights hold; wants: key -> the set that item runs (both, or neither).

    Returns key -> device tuple for every item that could be placed (all of them whenever the
    degrees are powers of two summing to at most the number of free aligned devices). Items are
    placed widest first; ties keep the caller's order.
    """
    free = set(free_devices)
    # Devices holding the latent of some request of this round: others avoid taking them.
    claimed: dict[int, object] = {}
    for key, _, current in requests:
        for d in current:
            claimed.setdefault(d, key)
    order = sorted(range(len(requests)), key=lambda i: -requests[i][1])
    out: dict[object, tuple[int, ...]] = {}
    for i in order:
        key, degree, current = requests[i]
        if len(current) == degree and current in _blocks(num_devices, degree) and free.issuperset(current):
            out[key] = current  # the common case: stay where the latent is
            free.difference_update(current)
            continue
        cur = set(current)
        best: tuple | None = None
        best_block: tuple[int, ...] | None = None
        for block in _blocks(num_devices, degree):
            if not free.issuperset(block):
                continue
            others = sum(1 for d in block if d in claimed and claimed[d] != key)
            holding = 0 if held is None else sum(1 for d in block if held.get(d, ()) == wants[key])
            score = (
                block == tuple(current),
                holding,
                degree == 1 or block in known_groups,
                len(cur.intersection(block)),
                -others,
                -block[0],
            )
            if best is None or score > best:
                best, best_block = score, block
        if best_block is None:
            # Only reachable with non-power-of-two device counts: any contiguous free run.
            for start in range(0, num_devices - degree + 1):
                block = tuple(range(start, start + degree))
                if free.issuperset(block):
                    best_block = block
                    break
        if best_block is None:
            continue
        out[key] = best_block
        free.difference_update(best_block)
    return out
