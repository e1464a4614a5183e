"""Request traces: the paper's workload generator and JSON-lines trace files.

The paper's workload (FLUX.1-dev, 8xH100): square 256/512/1024/2048 px images, 50 steps, the SLO
table of slo.py x an SLO scale, Poisson arrivals at a rate per minute, and two resolution mixes:
Uniform (equal shares) and Skewed (p proportional to exp(alpha * L / L_max), alpha = 1, with
L = H*W/16^2 tokens, so large images are the most frequent). Bursty traffic uses Gamma
inter-arrival times with a coefficient of variation > 1 (cv = 1 is Poisson). The "mixed" mix is
not the paper's: non-square aspect ratios (MIXED_SIZES_PX, portrait and landscape, 0.4 to 4.7
megapixels) and a step count per request (MIXED_STEPS), both drawn uniformly; its SLOs follow the
same rule (slo.py interpolates in token count and scales by steps).

A trace file has one JSON object per line: {"arrival_s", "width", "height", "steps", "slo_ms"}
(optionally "request_id", "cache": "off" | "auto", default "off": the request runs with step
caching and the policy costs it at the cached step time, and "cfg": true: it has true classifier-free
guidance, so a policy may run it CFG-parallel, SchedRequest.cfg). slo_ms is the deadline relative to
arrival at SLO scale 1.0; a replay multiplies it by the scale being tested.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from tetri_engine.sched.cost import PATCH_PX, num_tokens
from tetri_engine.sched.slo import REFERENCE_STEPS, slo_s

if TYPE_CHECKING:  # pragma: no cover
    from tetri_engine.sched.cost import CostModel

PAPER_SIDES_PX = (256, 512, 1024, 2048)
MIXES = ("uniform", "skewed", "mixed")
# (width, height) of the "mixed" workload: FLUX-style aspect ratios, multiples of 16.
MIXED_SIZES_PX = ((512, 512), (768, 512), (512, 768), (1024, 1024), (1344, 768), (768, 1344),
                  (1536, 640), (640, 1536), (2048, 1152), (1152, 2048), (2048, 2048))
MIXED_STEPS = (20, 28, 50)


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    width: int
    height: int
    steps: int
    slo_ms: float  # deadline after arrival, at SLO scale 1.0
    request_id: str = ""
    cache: str = "off"  # "auto": runs with step caching (SchedRequest.cached)
    cfg: bool = False  # true classifier-free guidance: may run CFG-parallel (SchedRequest.cfg)


def mix_probabilities(mix: str, sides_px: Sequence[int] = PAPER_SIDES_PX, alpha: float = 1.0) -> list[float]:
    """Share of each (square) resolution in a paper mix ("uniform", "skewed")."""
    if mix == "uniform":
        return [1.0 / len(sides_px)] * len(sides_px)
    if mix == "skewed":
        tokens = [num_tokens(s, s) for s in sides_px]
        weights = [math.exp(alpha * t / max(tokens)) for t in tokens]
        return [w / sum(weights) for w in weights]
    if mix == "mixed":
        raise ValueError("the mixed workload draws sizes from MIXED_SIZES_PX, not from a share per side")
    raise ValueError(f"unknown mix {mix!r}: choose from {', '.join(MIXES)}")


def generate_trace(
    num_requests: int,
    rate_per_min: float,
    mix: str = "uniform",
    seed: int = 0,
    *,
    steps: int = REFERENCE_STEPS,
    sides_px: Sequence[int] = PAPER_SIDES_PX,
    alpha: float = 1.0,
    arrival: str = "poisson",
    burstiness_cv: float = 2.0,
    cost: "CostModel | None" = None,
    max_degree: int | None = None,
) -> list[TraceRequest]:
    """A seeded trace of the paper's workload.

    arrival: "poisson" (exponential inter-arrival times) or "gamma" (bursty: Gamma inter-arrival
    times with the same mean and coefficient of variation burstiness_cv). slo_ms is slo.slo_s at
    scale 1.0, re-based on `cost` (on at most max_degree devices) when one is given.
    """
    if num_requests < 0 or rate_per_min <= 0:
        raise ValueError("num_requests must be >= 0 and rate_per_min > 0")
    rng = random.Random(seed)
    probs = mix_probabilities(mix, sides_px, alpha) if mix != "mixed" else []
    mean_gap_s = 60.0 / rate_per_min
    if arrival == "gamma":
        shape = 1.0 / (burstiness_cv ** 2)
    elif arrival != "poisson":
        raise ValueError(f"unknown arrival process {arrival!r}: poisson or gamma")
    slo_cache: dict[tuple[int, int, int], float] = {}
    out: list[TraceRequest] = []
    t = 0.0
    for i in range(num_requests):
        gap = rng.expovariate(1.0 / mean_gap_s) if arrival == "poisson" else rng.gammavariate(shape, mean_gap_s / shape)
        t += gap
        if mix == "mixed":
            (width, height), n = rng.choice(MIXED_SIZES_PX), rng.choice(MIXED_STEPS)
        else:
            side = rng.choices(sides_px, weights=probs)[0]
            width, height, n = side, side, steps
        key = (width, height, n)
        if key not in slo_cache:
            slo_cache[key] = 1000.0 * slo_s(width, height, n, cost, 1.0, max_degree)
        out.append(TraceRequest(round(t, 6), width, height, n, round(slo_cache[key], 3), f"req-{i:05d}"))
    return out


def write_trace(path: str, trace: Iterable[TraceRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in trace:
            d = asdict(r)
            if d["cache"] == "off":  # the defaults: traces without caching or CFG keep their format
                del d["cache"]
            if not d["cfg"]:
                del d["cfg"]
            f.write(json.dumps(d) + "\n")


TRACE_FIELDS = ("arrival_s", "width", "height", "steps", "slo_ms")


def read_trace(path: str) -> list[TraceRequest]:
    """The one trace reader (the engine's bench, the simulator and the xDiT harness all use it)."""
    with open(path, encoding="utf-8") as f:
        return parse_trace_lines(f, source=path)


def parse_trace_lines(lines: Iterable[str], source: str = "<trace>") -> list[TraceRequest]:
    """Trace JSON lines -> requests in arrival order (equal arrivals keep the file's order). Blank lines
    and lines starting with '#' are skipped; unknown keys are ignored (a trace may carry e.g. its mix);
    a missing or bad field is a ValueError naming the line. A request without request_id gets
    "req-NNNNN" from its position among the requests of the file."""
    out: list[TraceRequest] = []
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            out.append(_parse_line(text, len(out)))
        except ValueError as exc:
            raise ValueError(f"{source}:{lineno}: {exc}") from None
    out.sort(key=lambda r: r.arrival_s)  # stable: equal arrivals keep the file's order
    return out


def _parse_line(text: str, index: int) -> TraceRequest:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    if not isinstance(d, dict):
        raise ValueError("expected a JSON object")
    missing = [k for k in TRACE_FIELDS if k not in d]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)} (need {', '.join(TRACE_FIELDS)}; "
                         f"optional request_id, cache, cfg)")
    try:
        arrival_s, slo_ms = float(d["arrival_s"]), float(d["slo_ms"])
        width, height, steps = int(d["width"]), int(d["height"]), int(d["steps"])
    except (TypeError, ValueError):
        raise ValueError("arrival_s/slo_ms must be numbers, width/height/steps integers") from None
    if not (math.isfinite(arrival_s) and arrival_s >= 0):
        raise ValueError("arrival_s must be a finite number >= 0")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if not (math.isfinite(slo_ms) and slo_ms > 0):
        raise ValueError("slo_ms must be > 0")
    if width <= 0 or height <= 0 or width % PATCH_PX or height % PATCH_PX:
        raise ValueError(f"image size {width}x{height}: width and height must be positive multiples of {PATCH_PX}")
    cache = d.get("cache", "off")
    if cache not in ("off", "auto"):
        raise ValueError(f"cache {cache!r} is not 'off' or 'auto'")
    cfg = d.get("cfg", False)
    if not isinstance(cfg, bool):
        raise ValueError(f"cfg {cfg!r} is not true or false")
    request_id = str(d.get("request_id") or d.get("id") or f"req-{index:05d}")
    return TraceRequest(arrival_s, width, height, steps, slo_ms, request_id, cache, cfg)
