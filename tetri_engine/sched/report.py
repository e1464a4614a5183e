"""SLO report: sweep policies x SLO scales over a trace, the SAR table (with the `bound` row: the
LP upper bound no schedule can beat, bound.py), slowdown percentiles, gains, and the plots.

Plots use matplotlib with the Agg backend, imported only when a plot is drawn, so the rest of the
package (and `tetri-engine simulate --no-plots`) never needs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from tetri_engine.sched.cost import CostModel
from tetri_engine.sched.simulator import SimResult, simulate
from tetri_engine.sched.trace import TraceRequest

BASELINE_PREFIXES = ("fixed", "edf", "rssp")


@dataclass
class Sweep:
    """SAR of each policy at each SLO scale on one trace."""

    label: str
    num_devices: int
    scales: list[float]
    sar: dict[str, list[float]] = field(default_factory=dict)  # policy -> SAR per scale
    summaries: dict[str, list[dict]] = field(default_factory=dict)  # policy -> SimResult.summary() per scale
    gantt: SimResult | None = None  # one run kept for the Gantt plot
    bound: list[float] | None = None  # upper bound on SAR per scale (bound.sar_bound), if computed
    bound_note: str = ""  # how it was computed, or why it is missing

    def gains(self) -> dict:
        """TetriServe's relative SAR gain over the best fixed degree and over the best baseline,
        per scale and on average (relative: (tetri - best) / best)."""
        if "tetri" not in self.sar:
            return {}
        out: dict = {}
        for label, names in (("best_fixed", [p for p in self.sar if p.startswith("fixed")]),
                             ("best_baseline", [p for p in self.sar if p != "tetri"])):
            if not names:
                continue
            per_scale = []
            for i, _ in enumerate(self.scales):
                best_name = max(names, key=lambda p: self.sar[p][i])
                best = self.sar[best_name][i]
                t = self.sar["tetri"][i]
                per_scale.append({"best": best_name, "best_sar": best, "tetri_sar": t,
                                  "relative_gain": (t - best) / best if best > 0 else None,
                                  "absolute_gain": t - best})
            rel = [g["relative_gain"] for g in per_scale if g["relative_gain"] is not None]
            out[label] = {"per_scale": per_scale,
                          "mean_relative_gain": sum(rel) / len(rel) if rel else None,
                          "mean_absolute_gain": sum(g["absolute_gain"] for g in per_scale) / len(per_scale),
                          "tetri_ge_best_everywhere": all(g["tetri_sar"] >= g["best_sar"] for g in per_scale)}
        return out

    def table(self) -> str:
        head = f"{'policy':<12}" + "".join(f"{'x' + format(s, 'g'):>8}" for s in self.scales)
        lines = [f"SAR, {self.label}, {self.num_devices} devices", head]
        if self.bound is not None:
            lines.append(f"{'bound':<12}" + "".join(f"{v:>8.3f}" for v in self.bound) + f"   ({self.bound_note})")
        elif self.bound_note:
            lines.append(f"{'bound':<12}  {self.bound_note}")
        for p, row in self.sar.items():
            lines.append(f"{p:<12}" + "".join(f"{v:>8.3f}" for v in row))
        if self.bound is not None and "tetri" in self.sar:
            ratios = [t / b if b > 0 else 1.0 for t, b in zip(self.sar["tetri"], self.bound)]
            lines.append(f"{'tetri/bound':<12}" + "".join(f"{v:>8.3f}" for v in ratios))
        lines.append(f"slowdown (latency / fastest alone) p50 / p90 / p99, per scale")
        for p, runs in self.summaries.items():
            cells = [f"{r['slowdown']['p50']:.1f}/{r['slowdown']['p90']:.1f}/{r['slowdown']['p99']:.1f}"
                     if r["slowdown"]["count"] else "-" for r in runs]
            lines.append(f"{p:<12}" + "".join(f"{c:>16}" for c in cells))
        g = self.gains()
        for label in ("best_fixed", "best_baseline"):
            if label in g and g[label]["mean_relative_gain"] is not None:
                lines.append(f"tetri vs {label.replace('_', ' ')}: mean relative gain "
                             f"{100 * g[label]['mean_relative_gain']:+.1f}%, mean absolute "
                             f"{100 * g[label]['mean_absolute_gain']:+.1f} points")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"label": self.label, "num_devices": self.num_devices, "scales": self.scales, "sar": self.sar,
                "bound": self.bound, "bound_note": self.bound_note, "gains": self.gains(), "runs": self.summaries}


def run_sweep(
    trace: Sequence[TraceRequest],
    cost: CostModel,
    num_devices: int,
    policies: Sequence[str],
    scales: Sequence[float],
    *,
    label: str = "",
    make: Callable | None = None,
    round_steps: int = 5,
    round_s: float | None = None,
    jitter_cv: float = 0.0,
    seed: int = 0,
    gantt_policy: str | None = "tetri",
    progress: Callable[[str], None] | None = None,
    bound: str | None = None,
) -> Sweep:
    """Simulate every policy at every SLO scale (a fresh policy per run). bound: "lp" or "mip" adds
    the upper bound on SAR per scale (bound.sar_bound; a clear note instead when highspy is missing)."""
    from tetri_engine.sched import make_policy

    make = make or make_policy
    sweep = Sweep(label, num_devices, list(scales))
    if bound:
        add_bound(sweep, trace, cost, integral=bound == "mip")
    for name in policies:
        sweep.sar[name] = []
        sweep.summaries[name] = []
        for scale in scales:
            policy = make(name, num_devices, cost, round_steps=round_steps, round_s=round_s)
            result = simulate(trace, policy, slo_scale=scale, jitter_cv=jitter_cv, seed=seed)
            sweep.sar[name].append(result.sar)
            sweep.summaries[name].append(result.summary())
            if name == gantt_policy and sweep.gantt is None:
                sweep.gantt = result
            if progress:
                progress(f"{label} {name} x{scale:g}: SAR {result.sar:.3f}")
    return sweep


def add_bound(sweep: Sweep, trace: Sequence[TraceRequest], cost: CostModel, integral: bool = False,
              time_limit_s: float = 60.0) -> None:
    """Fill sweep.bound (and bound_note) with the SAR upper bound at each of its scales."""
    from tetri_engine.sched.bound import BoundUnavailable, sar_bound

    try:
        bounds = [sar_bound(trace, cost, sweep.num_devices, scale, integral=integral, time_limit_s=time_limit_s)
                  for scale in sweep.scales]
    except BoundUnavailable as exc:
        sweep.bound, sweep.bound_note = None, f"not computed: {exc}"
        return
    sweep.bound = [b.sar for b in bounds]
    kind = "MIP dual bound" if integral else "LP relaxation"
    sweep.bound_note = f"{kind}, HiGHS, {sum(b.solve_s for b in bounds):.1f} s"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sar(path: str, sweeps: Sequence[Sweep]) -> None:
    """SAR vs SLO scale, one panel per sweep, one line per policy."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4.2), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        for name, row in sweep.sar.items():
            style = dict(lw=2.5, marker="o", color="black") if name == "tetri" else dict(lw=1.2, marker=".")
            ax.plot(sweep.scales, row, label=name, **style)
        if sweep.bound is not None:
            ax.plot(sweep.scales, sweep.bound, label="bound", lw=1.5, ls="--", color="grey")
        ax.set_title(f"{sweep.label} ({sweep.num_devices} devices)")
        ax.set_xlabel("SLO scale")
        ax.set_ylabel("SLO attainment ratio")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gantt(path: str, result: SimResult, window_s: tuple[float, float] | None = None) -> None:
    """Per-device timeline of one run (the "Tetris" view): a bar per group, coloured by resolution,
    hatched when the group ends with a decode. A group of k devices shows as k stacked bars."""
    plt = _pyplot()
    sizes = sorted({(r.width, r.height) for r in result.requests}, key=lambda s: s[0] * s[1])
    palette = ["#4C72B0", "#55A868", "#DD8452", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
    colour = {s: palette[i % len(palette)] for i, s in enumerate(sizes)}
    size_of = {r.request_id: (r.width, r.height) for r in result.requests}
    if window_s is None:
        start = min((b.start_s for b in result.busy), default=0.0)
        window_s = (start, start + 60.0)
    lo, hi = window_s
    fig, ax = plt.subplots(figsize=(13, 0.45 * result.num_devices + 1.6))
    for b in result.busy:
        if b.end_s < lo or b.start_s > hi:
            continue
        ax.barh(b.device_id, b.end_s - b.start_s, left=b.start_s, height=0.8,
                color=colour[size_of[b.request_ids[0]]], edgecolor="black", linewidth=0.3,
                hatch="//" if b.decode else None)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colour[s], edgecolor="black", label=f"{s[0]}x{s[1]}") for s in sizes]
    ax.set_xlim(lo, hi)
    ax.set_yticks(range(result.num_devices))
    ax.set_yticklabels([f"dev {d}" for d in range(result.num_devices)])
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title(f"{result.policy}, SLO scale {result.slo_scale:g}: SAR {result.sar:.3f} "
                 f"(hatched: group ends with a VAE decode)")
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, ncol=len(sizes))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
