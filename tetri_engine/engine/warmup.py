"""Which shapes the engine warms up at start-up (and after `switch_policy`): every shape the policy can
plan, so that a compiled model never compiles on a request's critical path (executor/warmup.py runs
them; model/compile.py keeps compilation out of requests whatever happens).

The set: each (size, degree, batch) of the step-time profile (the sizes the scheduler prices, measured
or extrapolated) that the engine admits, at the degrees of the policy's candidate groups and degree 1,
plus `EngineConfig.warmup_sizes` at batch 1 and every such degree; each on a set of groups covering
every device (compiled code is per device and shard shape): degree 1 on each device, degree k on the
policy's aligned groups of k. Any other size runs eagerly until the engine restarts with it listed.

Worked example, 2 GPUs, tetri, the flux-dev profile (256, 512, 1024, 2048 at degrees 1 and 2; batches
2 and 4 at degree 1 up to 512): degree 1 on (0,) and (1,): 4 sizes + 4 batched shapes, x 2 devices;
degree 2 on (0, 1): 4 sizes. 20 warm-up steps, each compiling at most once per device and shape.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from tetri_engine.executor.warmup import WarmupShape
from tetri_engine.request import SizeRule


def plan_warmup(step_keys: Iterable[tuple[int, int, int, int]], groups: Sequence[Sequence[int]], num_devices: int,
                size_rule: SizeRule, extra_sizes: Sequence[tuple[int, int]] = (),
                cfg_keys: Iterable[tuple[int, int, int, int]] = ()) -> list[WarmupShape]:
    """step_keys: the profile's (width, height, degree, batch) entries; groups: the policy's candidate
    (multi-device) groups; cfg_keys: the profile's CFG-parallel entries when the policy plans that
    layout (warmed like the others, cfg 2: a branch's step has other shapes). Returns the shapes to
    warm, degree by degree, small sizes first."""
    by_degree: dict[int, list[tuple[int, ...]]] = {1: [(i,) for i in range(num_devices)]}
    for group in groups:
        if tuple(group) not in by_degree.setdefault(len(group), []):
            by_degree[len(group)].append(tuple(group))
    wanted = {(w, h, d, b) for w, h, d, b in step_keys if d in by_degree and _admits(size_rule, w, h)}
    wanted |= {(w, h, d, 1) for w, h in extra_sizes for d in by_degree if _admits(size_rule, w, h)}
    order = sorted(wanted, key=lambda k: (k[2], k[0] * k[1], k[3], k[0]))
    shapes = [WarmupShape(w, h, group, b) for w, h, d, b in order for group in by_degree[d]]
    cfg_wanted = sorted({(w, h, d, b) for w, h, d, b in cfg_keys if d in by_degree and _admits(size_rule, w, h)},
                        key=lambda k: (k[2], k[0] * k[1], k[3], k[0]))
    return shapes + [WarmupShape(w, h, group, b, cfg=2) for w, h, d, b in cfg_wanted for group in by_degree[d]]


def _admits(rule: SizeRule, width: int, height: int) -> bool:
    try:
        rule.check(width, height)
    except ValueError:
        return False
    return True
