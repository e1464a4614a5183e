"""The scheduler's data: the tracked request, the round plan handed to the executor, its result.

`SchedRequest` is mutable and owned by the policy once added (the tracker: steps done, devices its
latent is on, state). `RoundPlan`, `GroupAssignment`, `LatentMove` and `RoundResult` are frozen:
a plan is a value the engine hands to worker threads, never edited after `schedule()` returns it.
Device ids are indices 0..N-1 into the engine's device list.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from tetri_engine.sched.cost import num_tokens



class SchedState(str, enum.Enum):
    WAITING = "waiting"  # not in flight (may have steps done already)
    RUNNING = "running"  # part of a plan in flight
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def is_terminal(self) -> bool:
        return self in (SchedState.COMPLETED, SchedState.FAILED, SchedState.ABORTED)


@dataclass(eq=False)
class SchedRequest:
    """One request as the scheduler tracks it. deadline_s is absolute, on the clock of `now_s`
    (None: no deadline; it is then scheduled best effort, after every request with one).
    cached: the request runs with step caching (`GenerationRequest.cache == "auto"`): every policy
    costs its steps with `cost.step_s(..., cached=True)` (the profile's cache_step_factor, 1.0 when
    not measured).
    cfg: its steps can run CFG-parallel (true classifier-free guidance on a model that offers it, not
    cached): a policy may then run its two guidance branches side by side (`GroupAssignment.cfg`).
    adapters: its LoRA adapter set, ((name, scale), ...) in one canonical order (engine/lora.py); () for the
    plain model. A group runs one set: requests batch only with the same `batch_key`, and a group whose
    devices hold another set first switches (`cost.lora_switch_s`)."""

    request_id: str
    width: int
    height: int
    num_steps: int
    arrival_s: float
    deadline_s: float | None = None
    cached: bool = False
    cfg: bool = False
    adapters: tuple = ()
    # ---- tracked by the policy ----
    steps_done: int = 0
    device_ids: tuple[int, ...] = ()  # devices holding its latent (empty: not placed yet)
    state: SchedState = SchedState.WAITING
    finish_s: float | None = None
    error: str | None = None
    steps_at_degree: dict[int, int] = field(default_factory=dict)  # degree -> steps run at it
    rounds: int = 0
    regroups: int = 0  # rounds whose group differed from the devices its latent was on

    @property
    def remaining_steps(self) -> int:
        return self.num_steps - self.steps_done

    @property
    def batch_key(self) -> tuple:
        """What requests run as one batched forward must share: the shape and the weights (adapter set)."""
        return (self.width, self.height, self.adapters)

    @property
    def tokens(self) -> int:
        return num_tokens(self.width, self.height)

    @property
    def deadline(self) -> float:
        return math.inf if self.deadline_s is None else self.deadline_s

    @property
    def deadline_met(self) -> bool | None:
        if self.state is not SchedState.COMPLETED or self.finish_s is None:
            return None
        return self.finish_s <= self.deadline + 1e-9


@dataclass(frozen=True)
class GroupAssignment:
    """One device group for one round: `request_ids` (one, or several same-shape requests run as
    one batched forward) run `num_steps` steps on `device_ids`. With decode_after, each request that
    finishes its steps is VAE-decoded right after (sequentially), on device_ids[:decode_degree].

    The parallel layout of the group (issue 16): `cfg` guidance branches side by side (1, or 2 for
    requests with true classifier-free guidance), each sequence-parallel (Ulysses) over `sp_degree`
    devices: device_ids[c * sp : (c + 1) * sp] run branch c. On 4 devices, cfg 2 x sp 2:

        device_ids (0, 1, 2, 3):   branch 0 (uncond) on (0, 1), branch 1 (cond) on (2, 3)
        one step: Ulysses exchanges within (0, 1) and (2, 3); then (0, 2) and (1, 3) swap their
        velocity shards, and every device holds the guided velocity of its sequence shard.

    decode_degree > 1: the decode is patch-parallel over that many devices (rows of the image each).
    """

    device_ids: tuple[int, ...]
    request_ids: tuple[str, ...]
    num_steps: int
    decode_after: bool
    expected_s: float  # planned seconds for the steps plus any decodes
    cfg: int = 1
    decode_degree: int = 1

    @property
    def degree(self) -> int:
        return len(self.device_ids)

    @property
    def sp_degree(self) -> int:
        return len(self.device_ids) // self.cfg

    @property
    def layout(self) -> dict[str, int]:
        """{"cfg", "sp", "decode"}: what progress events report."""
        return {"cfg": self.cfg, "sp": self.sp_degree, "decode": self.decode_degree if self.decode_after else 0}


@dataclass(frozen=True)
class LatentMove:
    """A latent that must be regrouped before its group runs (src: where it is now)."""

    request_id: str
    src_device_ids: tuple[int, ...]
    dst_device_ids: tuple[int, ...]


@dataclass(frozen=True)
class RoundPlan:
    round_index: int
    start_s: float
    groups: tuple[GroupAssignment, ...] = ()
    moves: tuple[LatentMove, ...] = ()
    expected_s: float = 0.0  # the longest group's expected_s
    degrees: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # request_id -> degree this round
    late: frozenset[str] = frozenset()  # requests in this plan that can no longer meet their deadline (or are given up)
    backfill: bool = False  # planned mid-round on devices left idle; ends by the round's expected end
    # Requests this decision gave up (planned or not; an empty plan may carry some): they will not
    # be protected any more, only served best effort. Each id appears in one plan, once.
    given_up: frozenset[str] = frozenset()

    @property
    def is_empty(self) -> bool:
        return not self.groups

    @property
    def request_ids(self) -> tuple[str, ...]:
        return tuple(rid for g in self.groups for rid in g.request_ids)


@dataclass(frozen=True)
class RoundResult:
    """What the executor did with (part of) a plan. A group counts as finished when each of its
    requests appears in steps_done or failed; its devices are then free for the next plan. One
    result may cover the whole plan or only the groups that have finished so far."""

    end_s: float
    steps_done: Mapping[str, int] = field(default_factory=dict)  # request_id -> steps completed this round
    failed: frozenset[str] | set[str] = frozenset()  # request ids that failed (the engine holds the reason)
