"""Step-to-step redundancy of a DiT's activations (after DiTCacheAnalysis, arXiv 2411.13588) and the
per-model cache plan derived from it (`tetri-engine analyze-redundancy`).

What is measured, on one device, for several prompts denoised from the same seed:
- every attention call of every block (`ulysses.attention_observer`), at every step: the distance
  between this step's and the previous step's K, V and attention output (before the output
  projection), image and text tokens apart;
- the two quantities the step cache works with (step_cache.py): the change of the first block's
  residual (what it decides from), and the reuse error: how far the previous step's residual of the
  other blocks is from this step's, relative to this step's output hidden states,
  ||R_t - R_{t-1}|| / ||h_t|| (what reusing it would do to the transformer's last hidden states).

Distance = relative L2: ||x_t - x_{t-1}||_2 / ||x_{t-1}||_2 over the whole tensor of one token
stream (rows, tokens, heads, channels); 0 means identical, 1 means a change as large as the tensor.
K is taken after the rotary embedding, a fixed rotation per token, which leaves L2 distances as they
are. Step 0 has no previous step (NaN), nor has the text stream of an image-only attention (SD3.5's
attn2).

Stability: for every (step, layer, tensor) the coefficient of variation over prompts (std / mean);
DiTCacheAnalysis' point is that it is small within a model, so a plan tuned on a few prompts holds for
others. The summary gives its median per tensor and overall, and calls the pattern stable when the
overall median is below STABLE_CV (a convention, not a statistical test).

The plan (step_cache.CachePlan), derived so that what is skipped is bounded and then checked:
1. kappa = the 90th percentile over prompts and steps of (reuse error) / (first block's change): how
   much error reusing costs per unit of the decision quantity.
2. threshold = max_output_error / kappa: skipping only when the first block moved less than the
   threshold keeps the error put into the last hidden states within ~max_output_error (relative).
3. warmup_steps: the leading steps at which some analysed prompt's first block moved by more than the
   threshold (the early, most dissimilar steps) always compute.
4. validation: each prompt is denoised again with the plan; the threshold is halved (at most 6 times,
   then 0: no caching) until every prompt keeps min_psnr_db of displacement PSNR against its
   uncached run. The displacement is (final latent - initial noise), what the model contributed:
   PSNR of the final latent itself would credit the noise both runs share (a random-weight model
   barely moves the latent, so every plan would look lossless). expected_skip_fraction is the lowest
   fraction of steps skipped over the prompts (what a scheduler can count on); expected_step_factor
   estimates the step-time ratio from it (bench/cache_bench.py measures the real one).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tetri_engine.model.adapter import PreparedRequest, flow_match_euler_step
from tetri_engine.model.runtime import ModelRuntime
from tetri_engine.model.step_cache import CachePlan, CacheStep, StepCache, json_safe
from tetri_engine.model.ulysses import SPContext, attention_observer, sequence_parallel

DEFAULT_PROMPTS = (
    "a red bicycle leaning against a brick wall",
    "a lighthouse on a cliff at sunset, oil painting",
    "portrait of an old fisherman, black and white photograph",
    "a bowl of ramen seen from above, studio lighting",
)
TENSORS = ("k", "v", "out")
STREAMS = ("image", "text")
STABLE_CV = 0.2
RATIO_QUANTILE = 0.9
MAX_HALVINGS = 6


def relative_l2(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """||current - previous|| / ||previous|| in float32, as a 0-dim tensor on their device."""
    diff = torch.linalg.vector_norm((current - previous).float())
    return diff / torch.linalg.vector_norm(previous.float()).clamp_min(1e-30)


def psnr_db(test: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of `test` against `reference`, the peak being the reference's value range (max - min)."""
    reference, test = reference.double().cpu(), test.double().cpu()
    mse = float((test - reference).square().mean())
    peak = float(reference.max() - reference.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def displacement_psnr_db(test: torch.Tensor, reference: torch.Tensor, noise: torch.Tensor) -> float:
    """PSNR of what the model moved the latent by (final - initial noise), test vs reference."""
    noise = noise.to(reference.device, reference.dtype)
    return psnr_db(test.to(reference.device) - noise, reference - noise)


def layer_names(runtime: ModelRuntime) -> list[str]:
    """One name per attention call of a forward: "block{b}", or "block{b}.{c}" for a block with several."""
    names = []
    for b, calls in enumerate(runtime.adapter.exchange_plan_per_block()):
        names.extend([f"block{b}"] if len(calls) == 1 else [f"block{b}.{c}" for c in range(len(calls))])
    return names


def denoise(runtime: ModelRuntime, prepared: PreparedRequest, device_index: int = 0, cache: StepCache | None = None,
            observer: Callable[..., None] | None = None,
            on_step: Callable[[int, CacheStep | None], None] | None = None) -> torch.Tensor:
    """All steps of one request on one device, the executor's arithmetic at degree 1 (same forward, same
    Euler step); with `cache`, through the step cache. on_step(i, cache_step) runs after the forward
    of step i, before the cache commits. Returns the final latent [1, L, C] on the device."""
    device = runtime.torch_device(device_index)
    adapter = runtime.adapter
    context = SPContext(None, 0, 1, {"image": prepared.image_tokens, "text": prepared.text_tokens})
    transformer = runtime.transformer_on(device)
    latent = prepared.noise.to(device)
    with torch.no_grad():
        inputs = adapter.rank_inputs([prepared], device, 0, 1)
        sigmas = prepared.on(device)["sigmas"]
        if cache is not None:
            cache.place([runtime.devices[device_index]], prepared.image_tokens)
        for i in range(prepared.num_steps):
            cache_step = None
            kwargs = {}
            if cache is not None:
                cache_step = CacheStep([cache], [prepared.rows], [i], prepared.image_tokens, context)
                kwargs["cache_step"] = cache_step
            with sequence_parallel(context), attention_observer(observer):
                velocity = adapter.velocity(transformer, [latent], [prepared], [i], inputs, **kwargs)[0]
            if on_step is not None:
                on_step(i, cache_step)
            if cache_step is not None:
                cache_step.commit()
            latent = flow_match_euler_step(latent, velocity, sigmas, i)
    return latent


@dataclass
class RedundancyProfile:
    """What `analyze` measured. distances[f"{tensor}_{stream}"]: [prompts, steps, layers]; residual
    arrays: [prompts, steps]; NaN where there is no previous step or no such stream."""

    model: str
    width: int
    height: int
    num_steps: int
    seed: int
    prompts: list[str]
    layers: list[str]
    distances: dict[str, np.ndarray]
    first_block: np.ndarray  # relative change of the first block's residual (the cache's decision quantity)
    reuse_error: np.ndarray  # ||R_t - R_{t-1}|| / ||h_t||: reusing the other blocks' residual (module docstring)
    final_latents: list[torch.Tensor] = field(default_factory=list, repr=False)  # uncached, CPU
    seconds: float = 0.0

    # -- stability across prompts
    def cv(self) -> dict[str, np.ndarray]:
        """Coefficient of variation over prompts, [steps, layers] per tensor (NaN where undefined)."""
        out = {}
        for key, arr in self.distances.items():
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = arr.mean(axis=0)
                out[key] = np.where(mean > 0, arr.std(axis=0, ddof=1) / mean, np.nan) if arr.shape[0] > 1 \
                    else np.full(mean.shape, np.nan)
        return out

    def summary(self) -> dict[str, Any]:
        cv = self.cv()
        per_tensor = {k: _nanmedian(v) for k, v in cv.items()}
        overall = _nanmedian(np.concatenate([v.ravel() for v in cv.values()]))
        mean_distance = {k: _nanmean(v) for k, v in self.distances.items()}
        return {
            "model": self.model, "width": self.width, "height": self.height, "num_steps": self.num_steps,
            "seed": self.seed, "prompts": list(self.prompts), "layers": len(self.layers),
            "metric": "relative L2 to the previous step",
            "mean_distance": mean_distance,
            "cv_median": per_tensor, "cv_median_overall": overall,
            "stable": bool(overall < STABLE_CV) if not math.isnan(overall) else None,
            "stable_rule": f"median cross-prompt CV < {STABLE_CV}",
            "first_block_change_mean_by_step": _nanmean_axis0(self.first_block),
            "reuse_error_mean_by_step": _nanmean_axis0(self.reuse_error),
            "seconds": self.seconds,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        out = {key: arr for key, arr in self.distances.items()}
        out.update({f"cv_{key}": arr for key, arr in self.cv().items()})
        out["first_block_residual"] = self.first_block
        out["reuse_error"] = self.reuse_error
        out["layers"] = np.array(self.layers)
        out["prompts"] = np.array(self.prompts)
        return out


def _nanmedian(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else math.nan


def _nanmean(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def _nanmean_axis0(a: np.ndarray) -> list[float | None]:
    return [None if math.isnan(x) else float(x) for x in _mean_over_prompts(a)]


def analyze(runtime: ModelRuntime, prompts: Sequence[str] = DEFAULT_PROMPTS, *, width: int = 512, height: int = 512,
            num_steps: int | None = None, seed: int = 0, device_index: int = 0,
            log: Callable[[str], None] | None = None) -> RedundancyProfile:
    """Denoise every prompt (same seed) on one device and record the distances (module docstring)."""
    start = time.perf_counter()
    names = layer_names(runtime)
    num_layers = len(names)
    distances: dict[str, list[np.ndarray]] = {f"{t}_{s}": [] for t in TENSORS for s in STREAMS}
    first_block, reuse_error, finals = [], [], []
    steps = None
    for n, prompt in enumerate(prompts):
        prepared = runtime.prepare(prompt=prompt, width=width, height=height, seed=seed, num_steps=num_steps)
        steps = prepared.num_steps
        per_prompt = {key: np.full((steps, num_layers), np.nan) for key in distances}
        first = np.full(steps, np.nan)
        reuse = np.full(steps, np.nan)
        previous: list[dict[str, torch.Tensor] | None] = [None] * num_layers
        step_values: list[tuple[str, int, torch.Tensor]] = []
        call = [0]

        def observe(query, key, value, out, streams):
            layer = call[0]
            call[0] += 1
            lengths = [prepared.image_tokens if s == "image" else prepared.text_tokens for s in streams]
            current = {}
            for name, tensor in (("k", key), ("v", value), ("out", out)):
                for stream, part in zip(streams, tensor.split(lengths, dim=1)):
                    current[f"{name}_{stream}"] = part
            if previous[layer] is not None:
                for k, tensor in current.items():
                    step_values.append((k, layer, relative_l2(tensor, previous[layer][k])))
            previous[layer] = current

        def on_step(i: int, cache_step: CacheStep) -> None:
            if call[0] != num_layers:
                raise RuntimeError(f"expected {num_layers} attention calls in a forward, saw {call[0]}")
            call[0] = 0
            values = torch.stack([v for _, _, v in step_values]).cpu().tolist() if step_values else []
            for (k, layer, _), value in zip(step_values, values):
                per_prompt[k][i, layer] = value
            step_values.clear()
            change = cache_step.changes[0]
            if change is not None:
                first[i] = change
                _, rest = cache_step.pending[0]
                reuse[i] = float(torch.linalg.vector_norm((rest - cache.rest_ref[0]).float())
                                 / torch.linalg.vector_norm(cache_step.hidden_out.float()).clamp_min(1e-30))

        # threshold 0: every block runs, and the cache keeps the residuals of the previous step
        cache = StepCache(CachePlan(threshold=0.0))
        finals.append(denoise(runtime, prepared, device_index, cache, observe, on_step).cpu())
        for key in distances:
            distances[key].append(per_prompt[key])
        first_block.append(first)
        reuse_error.append(reuse)
        if log:
            log(f"prompt {n + 1}/{len(prompts)} analysed ({time.perf_counter() - start:.1f} s)")
    return RedundancyProfile(
        model=runtime.name, width=width, height=height, num_steps=steps, seed=seed, prompts=list(prompts),
        layers=names, distances={k: np.stack(v) for k, v in distances.items()},
        first_block=np.stack(first_block), reuse_error=np.stack(reuse_error), final_latents=finals,
        seconds=time.perf_counter() - start)


def derive_plan(runtime: ModelRuntime, profile: RedundancyProfile, *, max_output_error: float = 0.05,
                min_psnr_db: float = 30.0, device_index: int = 0,
                log: Callable[[str], None] | None = None) -> CachePlan:
    """The model's cache plan from a profile, validated against the profile's uncached runs (module
    docstring). The profile must come from `analyze` in this process (it holds the final latents)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = profile.reuse_error / profile.first_block
    ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
    if ratios.size == 0:
        raise ValueError("the profile has no step with a measured first-block change (at least 2 steps needed)")
    kappa = float(np.quantile(ratios, RATIO_QUANTILE))
    threshold = max_output_error / kappa
    num_blocks = len(runtime.adapter.exchange_plan_per_block())
    tries = []
    for _ in range(MAX_HALVINGS + 1):
        warmup = _warmup_steps(profile.first_block, threshold)
        psnrs, skipped = _validate(runtime, profile, CachePlan(threshold=threshold, warmup_steps=warmup), device_index,
                                   min_psnr_db)
        tries.append({"threshold": threshold, "warmup_steps": warmup, "min_psnr_db": min(psnrs),
                      "skipped_steps": skipped})
        if log:
            log(f"threshold {threshold:.4g} (warm-up {warmup}): skipped {skipped} of {profile.num_steps} steps, "
                f"displacement PSNR vs uncached >= {min(psnrs):.1f} dB")
        if min(psnrs) >= min_psnr_db:
            break
        threshold /= 2
    else:
        threshold, warmup, skipped = 0.0, 1, [0] * len(profile.prompts)
    skip_fraction = min(skipped) / profile.num_steps
    return CachePlan(
        threshold=threshold, warmup_steps=warmup, model=profile.model,
        source=(f"tetri-engine analyze-redundancy: {len(profile.prompts)} prompts, {profile.width}x{profile.height}, "
                f"{profile.num_steps} steps, seed {profile.seed}, max_output_error {max_output_error}, "
                f"min_psnr_db {min_psnr_db}"),
        expected_skip_fraction=skip_fraction,
        # a skipped step still runs one of num_blocks blocks (plus the embedders and the head, not counted)
        expected_step_factor=1.0 - skip_fraction * (1.0 - 1.0 / num_blocks),
        details={"kappa": kappa, "ratio_quantile": RATIO_QUANTILE, "max_output_error": max_output_error,
                 "min_psnr_db": min_psnr_db, "num_blocks": num_blocks, "tries": tries,
                 "stable": profile.summary()["stable"]})


def _warmup_steps(first_block: np.ndarray, threshold: float) -> int:
    """1 + the leading steps (from step 1) at which some prompt's first block moved by >= threshold."""
    warmup = 1
    for step in range(1, first_block.shape[1]):
        column = first_block[:, step]
        if np.all(np.isfinite(column)) and np.all(column < threshold):
            break
        warmup = step + 1
    return min(warmup, first_block.shape[1])


def _validate(runtime: ModelRuntime, profile: RedundancyProfile, plan: CachePlan, device_index: int,
              min_psnr_db: float) -> tuple[list[float], list[int]]:
    """Each prompt denoised with `plan`: (displacement PSNR vs uncached, skipped steps), stopping at the
    first prompt below min_psnr_db (the plan fails; the other prompts would not change that)."""
    psnrs, skipped = [], []
    for prompt, reference in zip(profile.prompts, profile.final_latents):
        prepared = runtime.prepare(prompt=prompt, width=profile.width, height=profile.height, seed=profile.seed,
                                   num_steps=profile.num_steps)
        cache = StepCache(plan)
        latent = denoise(runtime, prepared, device_index, cache)
        psnrs.append(displacement_psnr_db(latent, reference, prepared.noise))
        skipped.append(cache.skipped_steps)
        if psnrs[-1] < min_psnr_db:
            break
    return psnrs, skipped


# --- output files ----------------------------------------------------------------------------------------


def save(profile: RedundancyProfile, plan: CachePlan | None, output_dir: str, plots: bool = True) -> dict[str, str]:
    """redundancy.npz, summary.json, cache_plan.json and (plots) heatmap.png, layers.png in output_dir."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"arrays": os.path.join(output_dir, "redundancy.npz"), "summary": os.path.join(output_dir, "summary.json")}
    np.savez_compressed(paths["arrays"], **profile.arrays())
    summary = profile.summary()
    if plan is not None:
        summary["plan"] = plan.to_dict()
        paths["plan"] = os.path.join(output_dir, "cache_plan.json")
        plan.save(paths["plan"])
    with open(paths["summary"], "w", encoding="utf-8") as f:
        json.dump(json_safe(summary), f, indent=1)
        f.write("\n")
    if plots:
        paths.update(plot(profile, plan, output_dir))
    return paths


def _mean_over_prompts(arr: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN (without a warning) where every prompt is NaN (step 0)."""
    count = np.isfinite(arr).sum(axis=0)
    total = np.where(np.isfinite(arr), arr, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def plot(profile: RedundancyProfile, plan: CachePlan | None, output_dir: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = np.arange(profile.num_steps)
    # Heatmap: layers x steps, mean over prompts, one panel per tensor and stream.
    fig, axes = plt.subplots(len(STREAMS), len(TENSORS), figsize=(4.2 * len(TENSORS), 3.4 * len(STREAMS)),
                             squeeze=False)
    for row, stream in enumerate(STREAMS):
        for col, tensor in enumerate(TENSORS):
            ax = axes[row][col]
            mean = _mean_over_prompts(profile.distances[f"{tensor}_{stream}"]).T  # [layers, steps]
            image = ax.imshow(mean, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
            ax.set_title(f"{tensor.upper() if tensor != 'out' else 'attention out'} ({stream} tokens)")
            ax.set_xlabel("step")
            ax.set_ylabel("attention layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if len(profile.layers) <= 16:
                ax.set_yticks(range(len(profile.layers)), profile.layers, fontsize=7)
            else:
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            fig.colorbar(image, ax=ax, label="rel. L2 to previous step")
    fig.suptitle(f"{profile.model} {profile.width}x{profile.height}: step-to-step change, mean of "
                 f"{len(profile.prompts)} prompts")
    fig.tight_layout()
    heatmap = os.path.join(output_dir, "heatmap.png")
    fig.savefig(heatmap, dpi=110)
    plt.close(fig)

    # Per-layer curves (image stream) and the cache's two residuals.
    fig, axes = plt.subplots(1, len(TENSORS) + 1, figsize=(4.2 * (len(TENSORS) + 1), 3.6), squeeze=False)
    colors = plt.get_cmap("plasma")(np.linspace(0, 0.9, len(profile.layers)))
    for col, tensor in enumerate(TENSORS):
        ax = axes[0][col]
        mean = _mean_over_prompts(profile.distances[f"{tensor}_image"])
        for layer in range(len(profile.layers)):
            ax.plot(steps, mean[:, layer], color=colors[layer], lw=1)
        ax.set_title(f"{tensor.upper() if tensor != 'out' else 'attention out'} (image), per layer\n"
                     f"(dark: first layer ... yellow: last)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("rel. L2 to previous step")
    ax = axes[0][-1]
    for arr, label in ((profile.first_block, "first block residual change"), (profile.reuse_error, "reuse error")):
        for p in range(arr.shape[0]):
            ax.plot(steps, arr[p], lw=1, alpha=0.8, label=label if p == 0 else None,
                    color="tab:blue" if label.startswith("first") else "tab:orange")
    if plan is not None and plan.threshold > 0:
        ax.axhline(plan.threshold, color="k", ls="--", lw=1, label=f"cache threshold {plan.threshold:.3g}")
    ax.set_title("step cache quantities (each prompt)")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    layers = os.path.join(output_dir, "layers.png")
    fig.savefig(layers, dpi=110)
    plt.close(fig)
    return {"heatmap": heatmap, "layers": layers}
