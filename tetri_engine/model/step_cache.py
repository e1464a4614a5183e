"""Step caching: first-block residual caching, per request (`GenerationRequest.cache = "auto"`), that
composes with sequence parallelism and with degree changes between steps.

The rule, for a request at step i:

    run the first transformer block; its residual r1 = (image hidden states after it) - (before it);
    change = ||r1 - r1_ref||_2 / ||r1_ref||_2, over every image token of the request (relative L2),
    where r1_ref is the first block's residual at the *last step that ran every block*;
    change < plan.threshold and i >= plan.warmup_steps:
        skip the other blocks: their output is (hidden states after the first block) + R_ref, R_ref
        being the other blocks' residual at that last computed step;
    otherwise run them, and this step's r1 and R become r1_ref and R_ref.

Why it is sound:
- The reference is the last *computed* step, not the previous step, so small changes cannot add up to a
  large drift unseen: every skip is judged against the very step whose residual it reuses.
- The first block runs on the step's real input (latent, timestep), so a skipped step still moves
  along the trajectory; only the other blocks' contribution is stale, by an amount the first block's
  change stands in for. How well it stands in is measured per model by the redundancy analysis
  (redundancy.py), which derives the threshold and checks it against uncached runs (PSNR), since
  DiTCacheAnalysis found the redundancy pattern model-specific but stable across prompts.
- Off (`cache="off"`) nothing here runs: the forward is the plain diffusers one, bit for bit.

Sequence parallelism:
- r1_ref and R_ref ([rows, L_local, D], image tokens only) are per rank, sharded along the tokens
  exactly like the latent (the `ops.shard` layout) and moved with it by `ops.regroup` when the
  request's group changes (`StepCache.place`).
- Every rank must decide the same (a rank that skips makes no more exchanges; the others would wait
  for ever). Each rank sums over its own real tokens, the ranks all_gather the partial sums over the
  group's communicator, and every rank adds the same numbers in rank order on the host: one decision.
- That collective is part of the forward's exchange sequence; a rank that fails mid-forward issues it
  too when it catches up (`CacheStep.catch_up`), so the group stays in step.

A batch decides per request: the other blocks run on the rows of the requests that compute (a batch
whose requests all skip runs only the first block).

Why not diffusers' own FirstBlockCache hook: its state lives on the (shared) model object, one per
model rather than per request, and its decision is per rank, which would split an SP group.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from tetri_engine.model.ulysses import AttentionCall, SPContext, exchange_shapes, valid_tokens

# Used when no analysis has been saved for a model: a conservative threshold (skip only when the first
# block's residual moved less than 5% since the last computed step) and the first two steps always
# computed (the steps where DiT activations change the most). A model's own plan replaces it.
DEFAULT_THRESHOLD = 0.05
DEFAULT_WARMUP_STEPS = 2


@dataclass(frozen=True)
class CachePlan:
    """How `cache: auto` caches one model's steps (saved as cache_plan.json by the redundancy analysis).

    threshold: skip the blocks after the first when the first block's residual changed less than this
        (relative L2) since the last computed step; 0 never skips.
    warmup_steps: the first steps always run every block.
    expected_skip_fraction: the lowest fraction of steps skipped over the analysis' prompts (what a
        scheduler can count on), None when not measured.
    expected_step_factor: estimated mean step time with the cache / without (the cost model's factor
        until bench/cache_bench.py has measured it on the machine).
    """

    threshold: float
    warmup_steps: int = 1
    model: str = ""
    source: str = ""
    expected_skip_fraction: float | None = None
    expected_step_factor: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.threshold >= 0 or self.warmup_steps < 0:
            raise ValueError(f"invalid cache plan: threshold {self.threshold}, warmup_steps {self.warmup_steps}")

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CachePlan:
        try:
            return cls(threshold=float(data["threshold"]), warmup_steps=int(data.get("warmup_steps", 1)),
                       model=str(data.get("model", "")), source=str(data.get("source", "")),
                       expected_skip_fraction=data.get("expected_skip_fraction"),
                       expected_step_factor=data.get("expected_step_factor"),
                       details=dict(data.get("details") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed cache plan ({exc!r}): needs at least 'threshold'") from exc

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> CachePlan:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def json_safe(value: Any) -> Any:
    """NaN / inf -> None, recursively, so that the JSON written is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def default_plan(model: str = "") -> CachePlan:
    return CachePlan(threshold=DEFAULT_THRESHOLD, warmup_steps=DEFAULT_WARMUP_STEPS, model=model,
                     source="default (no redundancy analysis saved for this model: run "
                            "`tetri-engine analyze-redundancy --model ...`)")


def analysis_dir(model: str, cache_dir: str | None = None) -> str:
    """Where `tetri-engine analyze-redundancy` writes a model's analysis and plan by default."""
    from tetri_engine.config import default_cache_dir

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model) or "model"
    return os.path.join(cache_dir or default_cache_dir(), "redundancy", safe)


def plan_path(model: str, cache_dir: str | None = None) -> str:
    return os.path.join(analysis_dir(model, cache_dir), "cache_plan.json")


def load_plan(model: str, cache_dir: str | None = None) -> CachePlan:
    """The model's saved plan, or the default plan when none is saved."""
    path = plan_path(model, cache_dir)
    if os.path.isfile(path):
        return CachePlan.load(path)
    return default_plan(model)


class StepCache:
    """One request's cache: its plan, the cached residuals of the ranks of its group, what it skipped.

    Only the job that owns the request touches it; within a job each rank writes its own slot.
    """

    def __init__(self, plan: CachePlan):
        self.plan = plan
        self.first_ref: list[torch.Tensor | None] | None = None  # per rank: r1_ref [rows, L_local, D]
        self.rest_ref: list[torch.Tensor | None] | None = None  # per rank: R_ref, same shape
        self.skipped_steps = 0
        self.computed_steps = 0
        self.skipped: list[int] = []  # step indices that skipped
        self.changes: list[tuple[int, float | None]] = []  # (step, measured change; None: no reference)

    def place(self, devices: Sequence[str], image_tokens: int) -> None:
        """Follow the latent onto `devices` (rank order): move the cached residuals as the latent moves."""
        from tetri_engine import ops

        if self.first_ref is None or any(t is None for t in self.first_ref):
            self.first_ref = [None] * len(devices)  # nothing cached yet
            self.rest_ref = [None] * len(devices)
            return
        self.first_ref = ops.regroup(self.first_ref, image_tokens, list(devices))
        self.rest_ref = ops.regroup(self.rest_ref, image_tokens, list(devices))

    def ready(self, rank: int) -> bool:
        """Whether this rank holds references. Every committed step sets every rank's slot, so all ranks
        agree; a rank looks at its own slot only (the others may still be committing)."""
        return self.first_ref is not None and self.first_ref[rank] is not None

    def stats(self) -> dict[str, Any]:
        return {"threshold": self.plan.threshold, "skipped_steps": self.skipped_steps,
                "computed_steps": self.computed_steps, "skipped": list(self.skipped)}


class CacheStep:
    """One rank's forward of a batch in which some requests cache.

    caches: per request of the batch, its StepCache or None (cache off: always computes); rows: the
    batch rows of each request (2 with classifier-free guidance); step_indices: each request's step.
    The adapter's forward calls `run_blocks`; the executor then calls `commit` if every rank agreed on
    the step, or `catch_up` on a rank whose forward failed.
    """

    def __init__(self, caches: Sequence[StepCache | None], rows: Sequence[int], step_indices: Sequence[int],
                 image_tokens: int, context: SPContext):
        self.caches = list(caches)
        self.rows = list(rows)
        self.step_indices = list(step_indices)
        self.image_tokens = image_tokens
        self.context = context
        self.rank, self.degree = context.rank, context.degree
        self.offsets = [sum(self.rows[:i]) for i in range(len(self.rows))]
        self.cached = [i for i, c in enumerate(self.caches) if c is not None]
        for i in self.cached:
            if self.caches[i].first_ref is None or len(self.caches[i].first_ref) != self.degree:
                raise RuntimeError("a request's step cache is not placed on this group (StepCache.place)")
        self.skip = [False] * len(self.caches)
        self.changes: dict[int, float | None] = {}
        self.gathered = False
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # request -> (r1, R) of this step
        self.hidden_out: torch.Tensor | None = None  # the image hidden states after the last block

    def rows_of(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i] + self.rows[i])

    # -- inside the forward
    def run_blocks(self, blocks: Sequence[torch.nn.Module],
                   call: Callable[[torch.nn.Module, torch.Tensor, Any, torch.Tensor], tuple[Any, torch.Tensor]],
                   hidden: torch.Tensor, encoder: Any, temb: torch.Tensor) -> torch.Tensor:
        """Run `blocks` (call(block, hidden, encoder, temb) -> (encoder, hidden)) on the batch, skipping
        all but the first for the requests whose first-block residual barely changed. Returns the image
        hidden states after the last block."""
        before = hidden
        encoder, hidden = call(blocks[0], hidden, encoder, temb)
        after_first = hidden
        first_residual = after_first - before
        self.decide(first_residual)

        computing = [i for i in range(len(self.caches)) if not self.skip[i]]
        if len(computing) == len(self.caches):  # the plain block loop, exactly
            for block in blocks[1:]:
                encoder, hidden = call(block, hidden, encoder, temb)
            out = hidden
        else:
            computed = None
            if computing:
                index = torch.tensor([r for i in computing for r in range(self.rows_of(i).start, self.rows_of(i).stop)],
                                     device=hidden.device)
                hidden = after_first.index_select(0, index)
                encoder = encoder.index_select(0, index) if encoder is not None else None
                sub_temb = temb.index_select(0, index)
                for block in blocks[1:]:
                    encoder, hidden = call(block, hidden, encoder, sub_temb)
                computed = hidden
            pieces, at = [], 0
            for i in range(len(self.caches)):
                if self.skip[i]:
                    pieces.append(after_first[self.rows_of(i)] + self.caches[i].rest_ref[self.rank])
                else:
                    pieces.append(computed[at:at + self.rows[i]])
                    at += self.rows[i]
            out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]

        self.hidden_out = out  # (read by the redundancy analysis)
        whole = len(self.caches) == 1
        for i in self.cached:
            if not self.skip[i]:
                rows = self.rows_of(i)
                first, rest = first_residual[rows], out[rows] - after_first[rows]
                # a batch's slices would keep the whole batch's tensors alive
                self.pending[i] = (first, rest) if whole else (first.clone(), rest)
        return out

    def decide(self, first_residual: torch.Tensor | None, device: torch.device | None = None) -> None:
        """Set `skip` for every caching request, identically on every rank. first_residual None: this
        rank failed before it had one (catching up on `device`): it contributes zeros, and the step is
        discarded anyway."""
        device = first_residual.device if first_residual is not None else device
        sums = torch.zeros(len(self.cached), 2, dtype=torch.float64, device=device)
        if first_residual is not None:
            valid = valid_tokens(self.image_tokens, self.degree, self.rank)  # padding is not compared
            for j, i in enumerate(self.cached):
                cache = self.caches[i]
                if cache.ready(self.rank):
                    current = first_residual[self.rows_of(i), :valid].float()
                    reference = cache.first_ref[self.rank][:, :valid].float()
                    sums[j, 0] = (current - reference).square().sum()
                    sums[j, 1] = reference.square().sum()
        gathered = self.context.all_gather(sums) if self.degree > 1 else sums
        self.gathered = True
        per_rank = gathered.view(self.degree, len(self.cached), 2).cpu().tolist()
        for j, i in enumerate(self.cached):
            cache = self.caches[i]
            num = sum(per_rank[r][j][0] for r in range(self.degree))  # rank order: the same sum everywhere
            den = sum(per_rank[r][j][1] for r in range(self.degree))
            change = math.sqrt(num / den) if cache.ready(self.rank) and den > 0 else None
            self.changes[i] = change
            self.skip[i] = (change is not None and self.step_indices[i] >= cache.plan.warmup_steps
                            and change < cache.plan.threshold)

    # -- after the forward (steps.py)
    def commit(self) -> None:
        """Every rank agreed on the step: keep this rank's new references; rank 0 counts."""
        for i in self.cached:
            cache = self.caches[i]
            if i in self.pending:
                cache.first_ref[self.rank], cache.rest_ref[self.rank] = self.pending[i]
            if self.rank == 0:
                step = self.step_indices[i]
                cache.changes.append((step, self.changes.get(i)))
                if self.skip[i]:
                    cache.skipped_steps += 1
                    cache.skipped.append(step)
                else:
                    cache.computed_steps += 1

    def catch_up(self, plan_per_block: list[list[AttentionCall]], heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        """After this rank failed mid-forward: issue, with zero buffers, the collectives of the cached
        forward that it did not reach: the first block's exchanges, the decision's all_gather, then
        the other blocks' exchanges for the rows that compute (known from the gathered sums, the same
        on every rank)."""
        ctx = self.context
        first = exchange_shapes(ctx, plan_per_block[0], sum(self.rows), heads, head_dim)
        for shape in first[len(ctx.exchange_log):]:
            ctx.exchange(torch.zeros(shape, dtype=dtype, device=device))
        if not self.gathered:
            self.decide(None, device)
        computing_rows = sum(r for r, skip in zip(self.rows, self.skip) if not skip)
        rest_plan = [call for block in plan_per_block[1:] for call in block]
        rest = exchange_shapes(ctx, rest_plan, computing_rows, heads, head_dim) if computing_rows else []
        for shape in rest[len(ctx.exchange_log) - len(first) - 1:]:
            ctx.exchange(torch.zeros(shape, dtype=dtype, device=device))
