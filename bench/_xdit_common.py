"""Pure-Python helpers of the xDiT baseline harness (`bench/xdit_baseline.py`).

Owns what the harness can decide without a GPU, without torch and without xfuser, so that it is tested
on a CPU machine: the FLUX.1-dev configs (transformer and VAE), the trace format and its loader, the
flow-match sigma schedule FLUX uses, the FCFS one-request-at-a-time replay model (xDiT's HTTP service
runs one request at a time at a fixed degree), and the summary (SAR, latency percentiles) and tables.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository (bench/ runs uninstalled)
from tetri_engine.sched.metrics import percentile  # noqa: E402  (pure Python: no torch here either)

# NVLink multicast stays off on the lent H200 machines; reported by the dry run and in every run's metadata.
XDIT_ENV_VARS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")

# FLUX.1-dev transformer, as in black-forest-labs/FLUX.1-dev/transformer/config.json (11.9 B parameters).
FLUX_DEV_TRANSFORMER_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

# FLUX.1 VAE, as in black-forest-labs/FLUX.1-dev/vae/config.json (AutoencoderKL, 16 latent channels).
FLUX_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}

# Same architecture, tiny: only for exercising the harness on a CPU (`--model tiny --device cpu`).
TINY_TRANSFORMER_CONFIG: dict = {
    **FLUX_DEV_TRANSFORMER_CONFIG,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
    "axes_dims_rope": (4, 6, 6),
}
TINY_VAE_CONFIG: dict = {
    **FLUX_VAE_CONFIG,
    "block_out_channels": (8, 8, 8, 8),
    "layers_per_block": 1,
    "norm_num_groups": 4,
}

MODEL_CONFIGS = {
    "flux-dev": (FLUX_DEV_TRANSFORMER_CONFIG, FLUX_VAE_CONFIG),
    "tiny": (TINY_TRANSFORMER_CONFIG, TINY_VAE_CONFIG),
}

PATCH_PX = 16          # FLUX: 8x VAE downsampling, then 2x2 latent patches -> one token per 16x16 pixels
VAE_SCALE_FACTOR = 8   # pixels per latent pixel
DEFAULT_GUIDANCE = 3.5

# Rough Ulysses-2 step times (ms) on 2xH200 for the dry-run's plan only: diffusers' own context
# parallelism on the same model (DESIGN.md, "Measured facts"); 256² not measured, assumed = 512².
# A real estimate comes from this harness's own `step` output (`--estimate-from`).
DEFAULT_STEP_MS_ESTIMATE = {256 * 256: 102.2, 512 * 512: 102.2, 1024 * 1024: 112.2, 2048 * 2048: 475.7}


# ----------------------------------------------------------------------------------------------- trace



@dataclass(frozen=True)
class TraceRequest:
    """One line of the project's trace format (tetri_engine/sched/trace.py: JSON lines with arrival_s,
    width, height, steps, slo_ms; slo_ms is the deadline after arrival at SLO scale 1.0)."""

    index: int            # position in the trace (FCFS order is arrival order, ties by index)
    request_id: str
    arrival_s: float      # seconds after the replay starts
    width: int
    height: int
    steps: int
    slo_ms: float         # at SLO scale 1.0: deadline = arrival_s + scale * slo_ms / 1000

    def deadline_at(self, slo_scale: float = 1.0) -> float:
        return self.arrival_s + slo_scale * self.slo_ms / 1000.0

    @property
    def image_tokens(self) -> int:
        return image_tokens(self.width, self.height)


def image_tokens(width: int, height: int) -> int:
    """Transformer image tokens of a FLUX image: one per 16x16 pixels."""
    return (width // PATCH_PX) * (height // PATCH_PX)


def check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0 or width % PATCH_PX or height % PATCH_PX:
        raise ValueError(f"image size {width}x{height}: width and height must be positive multiples of {PATCH_PX}")


def load_trace(path: str) -> list[TraceRequest]:
    """The trace through the project's one reader (tetri_engine/sched/trace.py: validation, arrival
    order), each request numbered in that order (FCFS ties keep it)."""
    from tetri_engine.sched.trace import read_trace

    return [TraceRequest(i, r.request_id, r.arrival_s, r.width, r.height, r.steps, r.slo_ms)
            for i, r in enumerate(read_trace(path))]


def apply_overrides(requests: Sequence[TraceRequest], steps_override: int | None = None,
                    max_requests: int | None = None) -> list[TraceRequest]:
    """`--steps-override` (a short smoke: every request runs that many steps; arrivals and SLOs kept)
    and `--max-requests` (the first N by arrival)."""
    out = list(requests)
    if max_requests is not None:
        out = out[:max_requests]
    if steps_override is not None:
        out = [TraceRequest(r.index, r.request_id, r.arrival_s, r.width, r.height, steps_override, r.slo_ms)
               for r in out]
    return out


def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """'256,512,1024x768' -> [(256, 256), (512, 512), (1024, 768)] as (width, height)."""
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        if "x" in item:
            w, h = item.split("x", 1)
            width, height = int(w), int(h)
        else:
            width = height = int(item)
        check_size(width, height)
        sizes.append((width, height))
    if not sizes:
        raise ValueError("no resolutions given")
    return sizes


# ---------------------------------------------------------------------------------- FLUX sigma schedule

def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FluxPipeline's resolution-dependent shift (diffusers `calculate_shift`, FLUX.1-dev scheduler config)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux_sigmas(num_steps: int, image_seq_len: int) -> list[float]:
    """The sigmas FluxPipeline gives FlowMatchEulerDiscreteScheduler (dynamic exponential shift),
    with the terminal 0 appended: num_steps + 1 values, 1.0 first, strictly decreasing to 0."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    # np.linspace(1.0, 1 / num_steps, num_steps), then the exponential time shift exp(mu) / (exp(mu) + (1/t - 1)).
    mu = flux_mu(image_seq_len)
    if num_steps == 1:
        ts = [1.0]
    else:
        ts = [1.0 - i * (1.0 - 1.0 / num_steps) / (num_steps - 1) for i in range(num_steps)]
    return [math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0)) for t in ts] + [0.0]


# ------------------------------------------------------------------------------------ FCFS replay model

def scale_key(slo_scale: float) -> str:
    return f"{slo_scale:g}"


def parse_scales(text: str) -> list[float]:
    """'1.0,1.1,1.2,1.5' -> [1.0, 1.1, 1.2, 1.5]; the first is the primary scale."""
    scales = [float(x) for x in text.split(",") if x.strip()]
    if not scales or any(not (math.isfinite(x) and x > 0) for x in scales):
        raise ValueError("SLO scales must be positive numbers")
    return scales


@dataclass
class RequestRecord:
    """What the replay records per request (one JSON line). xDiT's FCFS run does not depend on the
    deadlines, so one replay gives the outcome at every SLO scale: `met_by_scale`; `deadline_s` and
    `deadline_met` are at the primary (first) scale."""

    kind: str
    request_index: int
    request_id: str
    width: int
    height: int
    steps: int
    slo_ms: float                       # at SLO scale 1.0, as in the trace
    arrival_s: float
    slo_scale: float
    deadline_s: float
    status: str                         # completed | failed | not_run_budget
    start_s: float | None = None        # replay clock: seconds since the replay started
    finish_s: float | None = None
    latency_s: float | None = None      # finish - arrival
    queue_s: float | None = None        # start - arrival
    service_s: float | None = None      # finish - start
    transformer_s: float | None = None  # the denoising steps (transformer + scheduler update)
    decode_s: float | None = None       # VAE decode
    deadline_met: bool = False
    met_by_scale: dict = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)


NOT_RUN_ERROR = "wall-clock budget (--max-seconds) ran out before this request could start"


def make_record(r: TraceRequest, scales: Sequence[float], status: str, start_s: float | None = None,
                finish_s: float | None = None, transformer_s: float | None = None,
                decode_s: float | None = None, error: str | None = None) -> RequestRecord:
    """A request's record; a deadline is met only by a completed request finishing by it."""
    done = status == "completed" and finish_s is not None
    met = {scale_key(x): bool(done and finish_s <= r.deadline_at(x) + 1e-9) for x in scales}
    return RequestRecord(
        "request", r.index, r.request_id, r.width, r.height, r.steps, r.slo_ms, r.arrival_s, scales[0],
        r.deadline_at(scales[0]), status, start_s=start_s, finish_s=finish_s,
        latency_s=(finish_s - r.arrival_s) if done else None,
        queue_s=(start_s - r.arrival_s) if start_s is not None else None,
        service_s=(finish_s - start_s) if (start_s is not None and finish_s is not None) else None,
        transformer_s=transformer_s, decode_s=decode_s, deadline_met=met[scale_key(scales[0])],
        met_by_scale=met, error=error if error is not None else (NOT_RUN_ERROR if status == "not_run_budget" else None))


def simulate_fcfs(requests: Sequence[TraceRequest], service_s: Callable[[TraceRequest], float],
                  scales: Sequence[float] = (1.0,), budget_s: float | None = None) -> list[RequestRecord]:
    """One request at a time, first come first served, non-preemptive (xDiT's HTTP service).
    A request whose predicted finish would pass `budget_s` (replay clock) is not run, nor is any
    after it: they are marked not_run_budget (missed) — the same rule the live replay uses."""
    records = []
    clock = 0.0
    stopped = False
    for r in requests:
        start = max(clock, r.arrival_s)
        s = service_s(r)
        if stopped or (budget_s is not None and start + s > budget_s):
            stopped = True
            records.append(make_record(r, scales, "not_run_budget"))
            continue
        clock = start + s
        records.append(make_record(r, scales, "completed", start_s=start, finish_s=clock))
    return records


def summarize(records: Sequence[RequestRecord], scales: Sequence[float] = (1.0,),
              replay_span_s: float | None = None) -> dict:
    """SAR = met / all requests in the trace (not run and failed count as missed), at every SLO scale
    (`sar` is the primary, first, scale); also the SAR of the requests that ran, latency of completed
    requests, and the server's busy fraction over the replay."""
    total = len(records)
    by_status: dict[str, int] = {}
    for rec in records:
        by_status[rec.status] = by_status.get(rec.status, 0) + 1
    ran = [r for r in records if r.status != "not_run_budget"]
    keys = [scale_key(x) for x in scales]
    met = {k: sum(1 for r in records if r.met_by_scale.get(k)) for k in keys}
    latencies = [r.latency_s for r in records if r.status == "completed" and r.latency_s is not None]
    busy = sum(r.service_s for r in ran if r.service_s is not None)
    if replay_span_s is None:
        finishes = [r.finish_s for r in ran if r.finish_s is not None]
        replay_span_s = max(finishes) if finishes else 0.0
    per_res: dict[str, dict] = {}
    for rec in records:
        d = per_res.setdefault(f"{rec.width}x{rec.height}", {"requests": 0, "completed": 0, "met_by_scale": {}})
        d["requests"] += 1
        d["completed"] += int(rec.status == "completed")
        for k in keys:
            d["met_by_scale"][k] = d["met_by_scale"].get(k, 0) + int(bool(rec.met_by_scale.get(k)))
    for d in per_res.values():
        d["sar_by_scale"] = {k: v / d["requests"] for k, v in d["met_by_scale"].items()}
        d["sar"] = d["sar_by_scale"][keys[0]]
    return {
        "requests": total,
        "completed": by_status.get("completed", 0),
        "failed": by_status.get("failed", 0),
        "not_run_budget": by_status.get("not_run_budget", 0),
        "slo_scale": scales[0],
        "deadline_met": met[keys[0]],
        "sar": met[keys[0]] / total if total else None,
        "sar_of_run": (met[keys[0]] / len(ran)) if ran else None,
        "sar_by_scale": {k: (met[k] / total if total else None) for k in keys},
        "sar_of_run_by_scale": {k: (met[k] / len(ran) if ran else None) for k in keys},
        "latency_mean_s": (sum(latencies) / len(latencies)) if latencies else None,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "busy_s": busy,
        "replay_span_s": replay_span_s,
        "busy_fraction": (busy / replay_span_s) if replay_span_s else None,
        "by_resolution": per_res,
    }


def step_ms_estimator(table: dict[int, float]) -> Callable[[int, int], float]:
    """Step time (ms) for an image size from a {pixels: ms} table: exact, else the nearest size
    scaled by the token count (transformer cost grows at least linearly in tokens)."""
    if not table:
        raise ValueError("empty step-time table")

    def est(width: int, height: int) -> float:
        px = width * height
        if px in table:
            return table[px]
        nearest = min(table, key=lambda p: abs(math.log(p / px)))
        return table[nearest] * max(px / nearest, 1.0) if px > nearest else table[nearest]

    return est


def load_step_table(path: str) -> dict[int, float]:
    """{pixels: median_ms} from this harness's `step` output (JSON lines with width, height, median_ms)."""
    table = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            if row.get("kind") == "step" and row.get("median_ms") is not None:
                table[int(row["width"]) * int(row["height"])] = float(row["median_ms"])
    if not table:
        raise ValueError(f"{path}: no step rows with median_ms")
    return table


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Plain-text table; columns are (key, header); floats get 3 significant decimals, None -> '-'."""
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
        return str(v)

    body = [[cell(row.get(k)) for k, _ in columns] for row in rows]
    headers = [h for _, h in columns]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)
