"""Cost model: how long a denoising step, a VAE decode and a prompt encode take.

Owns the profile JSON format (docs/ARCHITECTURE.md) and every question the scheduler asks about
time: `step_s(width, height, degree, batch, cfg=1)`, `decode_s(width, height, degree=1)`, `encode_s`,
the fastest a request can possibly run, and the GPU-time (degree x step time) of a step.

Parallel layouts (issue 16). A step on `degree` devices runs either as one sequence-parallel group
(Ulysses, cfg=1: the "step_ms" rows), or, for a request with true classifier-free guidance, as its two
guidance branches side by side, each on degree/2 devices (cfg=2: rows with "cfg": 2). A VAE decode runs
on one device, or patch-parallel on `degree` devices (decode rows with "degree": k). A profile without
such rows does not offer that option: `step_options` / `group_decode` only ever pick what was measured.

Resolutions that were not profiled are interpolated linearly in token count (H*W/16^2, the sequence
length a DiT sees) between the two nearest profiled resolutions at the same degree and batch size.
A resolution outside the profiled token range, or a degree/batch that was never profiled, is an
error that says what the profile covers: the scheduler must never guess a step time. VAE decode is
the exception: it is a convolutional network whose cost is proportional to the pixel count, so it is
extrapolated proportionally outside its profiled range (and is 0 when the profile has no decode data).

Step caching (`cache: auto`, model/step_cache.py): the profile's optional "cache_step_factor" is the
mean step time with the cache / without, measured by bench/cache_bench.py. When the profile lacks it
the factor is 1.0: a cached request is planned exactly like an uncached one, since a scheduler must
not count on a saving nobody measured (the cache plan's own `expected_step_factor` is an estimate and
is not used here). `step_s(..., cached=True)` (and `fastest_step` / `isolated_s` with cached=True)
apply it; the scheduler passes each request's `SchedRequest.cached`. `with_cache()` is the cost model
of a workload in which every request caches.

LoRA (issue 19): `lora_switch_s`, the seconds a group spends fusing another adapter set into its devices'
weights before its steps (the profile's optional "lora_switch_ms"; the engine measures it at start-up when it
serves adapters, `with_lora_switch_s`). 0 when absent: a profile without adapters switches nothing.
"""
from __future__ import annotations

import bisect
import json
import math
from typing import Any, Iterable

PATCH_PX = 16  # FLUX / SD3: one token per 16x16 pixels (8x VAE downsampling, 2x2 patches)


def num_tokens(width: int, height: int) -> int:
    """Image tokens of a width x height request (text tokens excluded)."""
    return max(1, (width * height) // (PATCH_PX * PATCH_PX))


def _interp(points: list[tuple[int, float]], x: int) -> float | None:
    """Linear interpolation on sorted (x, y) points; None outside [x_first, x_last]."""
    xs = [p[0] for p in points]
    i = bisect.bisect_left(xs, x)
    if i < len(xs) and xs[i] == x:
        return points[i][1]
    if i == 0 or i == len(xs):
        return None
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _curve(entries: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    """Sorted (tokens, ms) points; resolutions with the same token count are averaged."""
    by_tokens: dict[int, list[float]] = {}
    for tokens, ms in entries:
        by_tokens.setdefault(tokens, []).append(ms)
    return sorted((t, sum(v) / len(v)) for t, v in by_tokens.items())


class CostModel:
    """Step, decode and encode times of one model on one machine, from a profile.

    step_ms: (width, height, degree, batch) -> milliseconds for one denoising step of `batch`
    same-shape requests run together, sequence-parallel over `degree` devices. cfg_step_ms: the same
    keys, for the CFG-parallel layout (each guidance branch on degree/2 devices). decode_ms: (width,
    height) -> ms on one device; parallel_decode_ms: (width, height, degree) -> ms patch-parallel.
    """

    def __init__(
        self,
        step_ms: dict[tuple[int, int, int, int], float],
        decode_ms: dict[tuple[int, int], float] | None = None,
        encode_ms: float = 0.0,
        meta: dict[str, Any] | None = None,
        cache_step_factor: float = 1.0,
        cfg_step_ms: dict[tuple[int, int, int, int], float] | None = None,
        parallel_decode_ms: dict[tuple[int, int, int], float] | None = None,
        lora_switch_ms: float = 0.0,
    ):
        if not step_ms:
            raise ValueError("profile has no step times")
        if not cache_step_factor > 0:
            raise ValueError(f"profile cache_step_factor {cache_step_factor} is invalid: expected > 0")
        self.cache_step_factor = float(cache_step_factor)
        self.step_ms = dict(step_ms)
        self.cfg_step_ms = dict(cfg_step_ms or {})
        for cfg, table in ((1, self.step_ms), (2, self.cfg_step_ms)):
            for (w, h, degree, batch), ms in table.items():
                if degree < cfg or degree & (degree - 1):
                    raise ValueError(f"profile degree {degree} at {w}x{h} is not a power of two"
                                     + (" >= 2 (cfg 2)" if cfg > 1 else ""))
                if batch < 1 or not ms > 0:
                    raise ValueError(f"profile entry {w}x{h} degree {degree} batch {batch}: {ms} ms is invalid")
        self.decode_ms = dict(decode_ms or {})
        self.parallel_decode_ms = dict(parallel_decode_ms or {})
        for (w, h, degree), ms in self.parallel_decode_ms.items():
            if degree < 2 or degree & (degree - 1) or not ms > 0:
                raise ValueError(f"profile decode entry {w}x{h} degree {degree}: {ms} ms is invalid")
        self.encode_ms = float(encode_ms)
        self.meta = dict(meta or {})
        self.name = str(self.meta.get("model", "profile")) + "@" + str(self.meta.get("machine", "?"))
        # (degree, batch, cfg) -> sorted (tokens, ms) curve used for interpolation.
        curves: dict[tuple[int, int, int], list[tuple[int, float]]] = {}
        for cfg, table in ((1, self.step_ms), (2, self.cfg_step_ms)):
            for (w, h, degree, batch), ms in table.items():
                curves.setdefault((degree, batch, cfg), []).append((num_tokens(w, h), ms))
        self._curves = {key: _curve(points) for key, points in curves.items()}
        decode_points: dict[int, list[tuple[int, float]]] = {1: [(num_tokens(w, h), ms) for (w, h), ms
                                                                 in self.decode_ms.items()]}
        for (w, h, degree), ms in self.parallel_decode_ms.items():
            decode_points.setdefault(degree, []).append((num_tokens(w, h), ms))
        self._decode_curves = {d: _curve(points) for d, points in decode_points.items()}
        # Degrees profiled at batch 1, the ones a single request can run at (SP layout; cfg layout).
        self.degrees: tuple[int, ...] = tuple(sorted({d for d, b, c in self._curves if b == 1 and c == 1}))
        self.cfg_degrees: tuple[int, ...] = tuple(sorted({d for d, b, c in self._curves if b == 1 and c == 2}))
        # Degrees a decode was profiled at (1 always: no decode data means a decode costs 0).
        self.decode_degrees: tuple[int, ...] = tuple(sorted(self._decode_curves))
        if 1 not in self.degrees:
            # Every request must be able to run on one device (late requests, fixed1, baselines).
            raise ValueError(f"profile has no degree-1 step times (degrees: {self.degrees})")
        self._step_cache: dict[tuple[int, int, int, int, int], float] = {}
        if not lora_switch_ms >= 0:
            raise ValueError(f"profile lora_switch_ms {lora_switch_ms} is invalid: expected >= 0")
        self.lora_switch_s = float(lora_switch_ms) / 1e3

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CostModel":
        step_ms: dict[tuple[int, int, int, int], float] = {}
        cfg_step_ms: dict[tuple[int, int, int, int], float] = {}
        decode_ms: dict[tuple[int, int], float] = {}
        parallel_decode_ms: dict[tuple[int, int, int], float] = {}
        try:
            for e in data["step_ms"]:
                cfg = int(e.get("cfg", 1))
                if cfg not in (1, 2):
                    raise ValueError(f"step entry {e}: cfg must be 1 or 2")
                key = (int(e["width"]), int(e["height"]), int(e["degree"]), int(e.get("batch", 1)))
                (step_ms if cfg == 1 else cfg_step_ms)[key] = float(e["ms"])
            for e in data.get("decode_ms", []):
                degree = int(e.get("degree", 1))
                if degree == 1:
                    decode_ms[(int(e["width"]), int(e["height"]))] = float(e["ms"])
                else:
                    parallel_decode_ms[(int(e["width"]), int(e["height"]), degree)] = float(e["ms"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed profile: {exc!r} (format: docs/ARCHITECTURE.md, 'Profile JSON')") from exc
        meta = {k: v for k, v in data.items()
                if k not in ("step_ms", "decode_ms", "encode_ms", "cache_step_factor", "lora_switch_ms")}
        return cls(step_ms, decode_ms, float(data.get("encode_ms", 0.0)), meta,
                   cache_step_factor=float(data.get("cache_step_factor", 1.0)), cfg_step_ms=cfg_step_ms,
                   parallel_decode_ms=parallel_decode_ms, lora_switch_ms=float(data.get("lora_switch_ms", 0.0)))

    @classmethod
    def from_json(cls, path: str) -> "CostModel":
        with open(path, encoding="utf-8") as f:
            model = cls.from_dict(json.load(f))
        model.meta.setdefault("path", str(path))
        return model

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.meta.items() if k != "path"}
        out["step_ms"] = [
            {"width": w, "height": h, "degree": d, "batch": b, "ms": ms}
            for (w, h, d, b), ms in sorted(self.step_ms.items())
        ] + [{"width": w, "height": h, "degree": d, "batch": b, "cfg": 2, "ms": ms}
             for (w, h, d, b), ms in sorted(self.cfg_step_ms.items())]
        out["decode_ms"] = [{"width": w, "height": h, "ms": ms} for (w, h), ms in sorted(self.decode_ms.items())] + [
            {"width": w, "height": h, "degree": d, "ms": ms} for (w, h, d), ms in sorted(self.parallel_decode_ms.items())]
        out["encode_ms"] = self.encode_ms
        if self.cache_step_factor != 1.0:
            out["cache_step_factor"] = self.cache_step_factor
        if self.lora_switch_s:
            out["lora_switch_ms"] = self.lora_switch_s * 1e3
        return out

    def with_lora_switch_s(self, seconds: float) -> "CostModel":
        """This machine with an adapter-set switch costing `seconds` (measured: LoraDevices.measure_switch_s)."""
        return CostModel(self.step_ms, self.decode_ms, self.encode_ms, self.meta, self.cache_step_factor,
                         self.cfg_step_ms, self.parallel_decode_ms, lora_switch_ms=float(seconds) * 1e3)

    def with_cache(self) -> "CostModel":
        """This machine when every request runs with step caching: step times x cache_step_factor."""
        step_ms = {key: ms * self.cache_step_factor for key, ms in self.step_ms.items()}
        # (No CFG-parallel rows: the step cache does not run in that layout.)
        return CostModel(step_ms, self.decode_ms, self.encode_ms, {**self.meta, "cached": True},
                         parallel_decode_ms=self.parallel_decode_ms, lora_switch_ms=self.lora_switch_s * 1e3)

    def without_layouts(self) -> "CostModel":
        """This machine offering sequence parallelism only: no CFG-parallel steps, one-device decodes."""
        return CostModel(self.step_ms, self.decode_ms, self.encode_ms, {**self.meta, "layouts": "sp only"},
                         cache_step_factor=self.cache_step_factor, lora_switch_ms=self.lora_switch_s * 1e3)

    # ---- times ---------------------------------------------------------------------------------

    def step_s(self, width: int, height: int, degree: int, batch: int = 1, cached: bool = False,
               cfg: int = 1) -> float:
        """Seconds for one denoising step of `batch` width x height requests on `degree` devices;
        cached: of requests that run with step caching (x cache_step_factor); cfg=2: in the
        CFG-parallel layout (the guidance branches side by side, each on degree/2 devices)."""
        seconds = self._plain_step_s(width, height, degree, batch, cfg)
        return seconds * self.cache_step_factor if cached else seconds

    def _plain_step_s(self, width: int, height: int, degree: int, batch: int, cfg: int = 1) -> float:
        key = (width, height, degree, batch, cfg)
        cached = self._step_cache.get(key)
        if cached is not None:
            return cached
        ms = (self.step_ms if cfg == 1 else self.cfg_step_ms).get(key[:4])
        layout = f"degree {degree} batch {batch}" + (f" cfg {cfg}" if cfg != 1 else "")
        if ms is None:
            curve = self._curves.get((degree, batch, cfg))
            if curve is None:
                have = sorted((d, b) for d, b, c in self._curves if c == cfg)
                raise ValueError(
                    f"profile {self.name} has no step times for {layout}; "
                    f"profiled (degree, batch){' at cfg %d' % cfg if cfg != 1 else ''}: {have}"
                )
            tokens = num_tokens(width, height)
            ms = _interp(curve, tokens)
            if ms is None:
                raise ValueError(
                    f"{width}x{height} ({tokens} tokens) is outside the profiled range of {self.name} at "
                    f"{layout}: {curve[0][0]}..{curve[-1][0]} tokens"
                )
        seconds = ms / 1000.0
        self._step_cache[key] = seconds
        return seconds

    def step_options(self, width: int, height: int, max_degree: int, cached: bool = False,
                     cfg: bool = False) -> dict[int, tuple[float, int]]:
        """degree -> (seconds per step, cfg degree) of the fastest profiled layout on that many devices
        (batch 1). cfg: the request has true classifier-free guidance, so the CFG-parallel layout is an
        option where profiled (never with step caching: the cache does not run in that layout)."""
        options = {d: (self.step_s(width, height, d, cached=cached), 1) for d in self.degrees_upto(max_degree)}
        if cfg and not cached:
            for d in self.cfg_degrees:
                if d <= max_degree and self.supports(width, height, d, cfg=2):
                    t = self.step_s(width, height, d, cfg=2)
                    if d not in options or t < options[d][0]:
                        options[d] = (t, 2)
        return options

    def supports(self, width: int, height: int, degree: int = 1, batch: int = 1, cfg: int = 1) -> bool:
        try:
            self.step_s(width, height, degree, batch, cfg=cfg)
        except ValueError:
            return False
        return True

    def check(self, width: int, height: int) -> None:
        """Raise ValueError (with what the profile covers) unless width x height can be costed."""
        self.step_s(width, height, 1, 1)

    def max_batch(self, width: int, height: int, degree: int = 1) -> int:
        """Largest profiled batch size for this resolution and degree (1 when none larger)."""
        best = 1
        for d, b, c in self._curves:
            if d == degree and c == 1 and b > best and self.supports(width, height, degree, b):
                best = b
        return best

    def batch_sizes(self, width: int, height: int, degree: int = 1) -> list[int]:
        return sorted(b for d, b, c in self._curves
                      if d == degree and c == 1 and self.supports(width, height, degree, b))

    def decode_s(self, width: int, height: int, degree: int = 1) -> float:
        """Seconds for the VAE decode of one image on `degree` devices (patch-parallel when > 1; a
        ValueError for a degree > 1 never profiled). 0 when the profile has no decode times."""
        curve = self._decode_curves.get(degree)
        if curve is None:
            raise ValueError(f"profile {self.name} has no decode times at degree {degree} "
                             f"(profiled: {self.decode_degrees})")
        if not curve:
            return 0.0
        ms = self.decode_ms.get((width, height)) if degree == 1 else self.parallel_decode_ms.get((width, height, degree))
        if ms is None:
            tokens = num_tokens(width, height)
            ms = _interp(curve, tokens)
            if ms is None:  # proportional to pixels beyond the profiled range
                t_ref, ms_ref = curve[0] if tokens < curve[0][0] else curve[-1]
                ms = ms_ref * tokens / t_ref
        return ms / 1000.0

    def group_decode(self, width: int, height: int, degree: int) -> tuple[int, float]:
        """(devices, seconds) of the fastest profiled decode a group of `degree` devices can run: on
        its first d devices, d <= degree (1 when the profile has no parallel decode rows)."""
        return min(((d, self.decode_s(width, height, d)) for d in self.decode_degrees if d <= degree),
                   key=lambda option: (option[1], option[0]))

    def encode_s(self, width: int | None = None, height: int | None = None) -> float:
        """Seconds for the prompt encode (text encoders + initial noise), independent of size."""
        return self.encode_ms / 1000.0

    def degrees_upto(self, max_degree: int) -> tuple[int, ...]:
        return tuple(d for d in self.degrees if d <= max_degree)

    def fastest_step(self, width: int, height: int, max_degree: int, cached: bool = False,
                     cfg: bool = False) -> tuple[int, float]:
        """(degree, seconds) of the fastest single-request step using at most max_degree devices
        (cached: of a request that runs with step caching; cfg: one that may run CFG-parallel)."""
        options = self.step_options(width, height, max_degree, cached, cfg)
        if not options:
            raise ValueError(f"profile {self.name} has no degree <= {max_degree}: {self.degrees}")
        degree = min(options, key=lambda d: (options[d][0], d))
        return degree, options[degree][0]

    def isolated_s(self, width: int, height: int, num_steps: int, max_degree: int, cached: bool = False,
                   cfg: bool = False) -> float:
        """Fastest service time of one request alone: steps at the fastest degree, then the fastest
        decode on at most max_degree devices (cached: with step caching; cfg: CFG parallel allowed)."""
        return (num_steps * self.fastest_step(width, height, max_degree, cached, cfg)[1]
                + self.group_decode(width, height, max_degree)[1])

    def typical_step_s(self) -> float:
        """Geometric mean of the profiled degree-1 step times: the 'typical request' step that
        sizes a round (DESIGN.md: a round holds ~5 steps of a typical request)."""
        times = [ms / 1000.0 for (_, _, d, b), ms in self.step_ms.items() if d == 1 and b == 1]
        if not times:
            times = [ms / 1000.0 for ms in self.step_ms.values()]
        return math.exp(sum(math.log(t) for t in times) / len(times))
