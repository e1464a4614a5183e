"""Routing over replicas (engine hosts): which one gets a request. The one place the rules are written;
the live cluster (tetri_engine.cluster) and the N-host simulator (cluster_sim.py) both call them.

    deadline      ask every replica what taking the request would do (`Offer`: its scheduler's
                  `Policy.estimate`, and whether its admission would take it); send it to a replica
                  where it meets its deadline (fits) at the least cost (device-seconds the plan grows
                  by, within COST_TOLERANCE; then the delay it adds to the requests held, then the
                  fewest held, then chance);
                  when none fits, to the earliest finish among the replicas that would take it; when
                  every replica refuses, refuse it, with the soonest retry any replica estimated.
    pow2          power of two choices on queue length (Ray Serve's default): two replicas at random,
                  the one holding fewer requests; its admission decides.
    round-robin   the next replica in turn; its admission decides.

Pure Python: offers come in, a decision goes out; time and randomness are the caller's.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Hashable, Sequence

ROUTING_POLICIES = ("deadline", "pow2", "round-robin")
# Costs this close count as equal: replicas measure their own profiles, and a few percent of measurement
# noise must not send every request to the replica that happened to measure fastest.
COST_TOLERANCE = 0.1


@dataclass(frozen=True)
class Quote:
    """What an engine host would do if it took a request now (`AsyncEngine.estimate`; the N-host
    simulator's hosts answer the same). Times are seconds from now, so quotes of hosts on different
    clocks compare.

    accepts: its admission would take it now (it fits, or admission is best_effort; not draining, queue
    not full). fits: it meets its deadline alongside the requests held, none of them given up.
    finish_s: when it would end, as the scheduler plans now (given up: best effort on one device).
    cost_s: device-seconds the scheduler's plan grows by; delay_s: seconds it pushes back the planned
    ends of the requests held, summed (both from `sched.Estimate`). retry_after_s: for a refusal, when
    it would be taken (None: no estimate, or never). reason: fits | busy | deadline_impossible |
    queue_full | draining. deadline_s: its deadline (its own, or the SLO table's). held: requests the
    host holds (waiting or running)."""

    accepts: bool
    fits: bool
    finish_s: float
    cost_s: float
    delay_s: float
    retry_after_s: float | None
    reason: str
    deadline_s: float
    held: int


@dataclass(frozen=True)
class Offer(Quote):
    """One replica's Quote, named."""

    replica: Hashable = field(kw_only=True)


@dataclass(frozen=True)
class Refusal:
    """No replica takes the request. reason: "busy" (some replica would later: retry_after_s is the
    soonest), "deadline_impossible" (not even alone on any replica), "queue_full" or "draining"."""

    reason: str
    retry_after_s: float | None


def choose_by_deadline(offers: Sequence[Offer], rng: random.Random | None = None) -> Offer | Refusal:
    """The deadline-aware rule (module docstring). Raises ValueError for no offers at all."""
    if not offers:
        raise ValueError("no replica answered")
    rng = rng or random.Random()
    fitting = [o for o in offers if o.fits and o.accepts]
    if fitting:
        cheapest = min(o.cost_s for o in fitting)
        # (A cost may be negative: a plan with the request in it can be cheaper; the heuristic is not monotone.)
        near = [o for o in fitting if o.cost_s <= cheapest + COST_TOLERANCE * abs(cheapest) + 1e-9]
        return min(near, key=lambda o: (o.delay_s, o.held, rng.random()))
    taking = [o for o in offers if o.accepts]
    if taking:
        return min(taking, key=lambda o: (o.finish_s, o.cost_s, rng.random()))
    return refusal(offers)


def refusal(offers: Sequence[Offer]) -> Refusal:
    """Why every replica refused, and the soonest retry any of them estimated."""
    retries = [o.retry_after_s for o in offers if o.retry_after_s is not None and math.isfinite(o.retry_after_s)]
    reasons = {o.reason for o in offers}
    for reason in ("busy", "queue_full"):
        if reason in reasons:
            return Refusal(reason, min(retries) if retries else None)
    if reasons == {"draining"}:
        return Refusal("draining", None)
    return Refusal("deadline_impossible", None)


def choose_pow2(held: dict[Hashable, int], rng: random.Random) -> Hashable:
    """Power of two choices: two distinct replicas at random, the one holding fewer requests (ties:
    the first drawn). `held`: replica -> requests it holds."""
    if not held:
        raise ValueError("no replica")
    keys = list(held)
    picks = rng.sample(keys, min(2, len(keys)))
    return min(picks, key=lambda k: held[k])


class RoundRobin:
    """The next replica in turn, over the replicas given at each call (they may change)."""

    def __init__(self, start: int = 0):
        self._next = start

    def choose(self, replicas: Sequence[Hashable]) -> Hashable:
        if not replicas:
            raise ValueError("no replica")
        replica = replicas[self._next % len(replicas)]
        self._next += 1
        return replica
