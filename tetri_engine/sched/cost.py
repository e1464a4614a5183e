"""Cost model: how long a denoising step, a VAE decode and a prompt encode take.

Owns the profile JSON format (docs/ARCHITECTURE.md) and every question the scheduler asks about
time: `step_s(width, height, degree, batch)`, `decode_s`, `encode_s`, the fastest a request can
possibly run, and the GPU-time (degree x step time) of a step.

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
    same-shape requests run together, sequence-parallel over `degree` devices.
    """

    def __init__(
        self,
        step_ms: dict[tuple[int, int, int, int], float],
        decode_ms: dict[tuple[int, int], float] | None = None,
        encode_ms: float = 0.0,
        meta: dict[str, Any] | None = None,
        cache_step_factor: float = 1.0,
    ):
        if not step_ms:
            raise ValueError("profile has no step times")
        if not cache_step_factor > 0:
            raise ValueError(f"profile cache_step_factor {cache_step_factor} is invalid: expected > 0")
        self.cache_step_factor = float(cache_step_factor)
        for (w, h, degree, batch), ms in step_ms.items():
            if degree < 1 or degree & (degree - 1):
                raise ValueError(f"profile degree {degree} at {w}x{h} is not a power of two")
            if batch < 1 or not ms > 0:
                raise ValueError(f"profile entry {w}x{h} degree {degree} batch {batch}: {ms} ms is invalid")
        self.step_ms = dict(step_ms)
        self.decode_ms = dict(decode_ms or {})
        self.encode_ms = float(encode_ms)
        self.meta = dict(meta or {})
        self.name = str(self.meta.get("model", "profile")) + "@" + str(self.meta.get("machine", "?"))
        # (degree, batch) -> sorted (tokens, ms) curve used for interpolation.
        curves: dict[tuple[int, int], list[tuple[int, float]]] = {}
        for (w, h, degree, batch), ms in self.step_ms.items():
            curves.setdefault((degree, batch), []).append((num_tokens(w, h), ms))
        self._curves = {key: _curve(points) for key, points in curves.items()}
        self._decode_curve = _curve((num_tokens(w, h), ms) for (w, h), ms in self.decode_ms.items())
        # Degrees profiled at batch 1, the ones a single request can run at.
        self.degrees: tuple[int, ...] = tuple(sorted({d for d, b in self._curves if b == 1}))
        if 1 not in self.degrees:
            # Every request must be able to run on one device (late requests, fixed1, baselines).
            raise ValueError(f"profile has no degree-1 step times (degrees: {self.degrees})")
        self._step_cache: dict[tuple[int, int, int, int], float] = {}

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CostModel":
        try:
            step_ms = {
                (int(e["width"]), int(e["height"]), int(e["degree"]), int(e.get("batch", 1))): float(e["ms"])
                for e in data["step_ms"]
            }
            decode_ms = {(int(e["width"]), int(e["height"])): float(e["ms"]) for e in data.get("decode_ms", [])}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed profile: {exc!r} (format: docs/ARCHITECTURE.md, 'Profile JSON')") from exc
        meta = {k: v for k, v in data.items() if k not in ("step_ms", "decode_ms", "encode_ms", "cache_step_factor")}
        return cls(step_ms, decode_ms, float(data.get("encode_ms", 0.0)), meta,
                   cache_step_factor=float(data.get("cache_step_factor", 1.0)))

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
        ]
        out["decode_ms"] = [{"width": w, "height": h, "ms": ms} for (w, h), ms in sorted(self.decode_ms.items())]
        out["encode_ms"] = self.encode_ms
        if self.cache_step_factor != 1.0:
            out["cache_step_factor"] = self.cache_step_factor
        return out

    def with_cache(self) -> "CostModel":
        """This machine when every request runs with step caching: step times x cache_step_factor."""
        step_ms = {key: ms * self.cache_step_factor for key, ms in self.step_ms.items()}
        return CostModel(step_ms, self.decode_ms, self.encode_ms, {**self.meta, "cached": True})

    # ---- times ---------------------------------------------------------------------------------

    def step_s(self, width: int, height: int, degree: int, batch: int = 1, cached: bool = False) -> float:
        """Seconds for one denoising step of `batch` width x height requests on `degree` devices;
        cached: of requests that run with step caching (x cache_step_factor)."""
        seconds = self._plain_step_s(width, height, degree, batch)
        return seconds * self.cache_step_factor if cached else seconds

    def _plain_step_s(self, width: int, height: int, degree: int, batch: int) -> float:
        key = (width, height, degree, batch)
        cached = self._step_cache.get(key)
        if cached is not None:
            return cached
        ms = self.step_ms.get(key)
        if ms is None:
            curve = self._curves.get((degree, batch))
            if curve is None:
                have = sorted(self._curves)
                raise ValueError(
                    f"profile {self.name} has no step times for degree {degree} batch {batch}; "
                    f"profiled (degree, batch): {have}"
                )
            tokens = num_tokens(width, height)
            ms = _interp(curve, tokens)
            if ms is None:
                raise ValueError(
                    f"{width}x{height} ({tokens} tokens) is outside the profiled range of {self.name} at "
                    f"degree {degree} batch {batch}: {curve[0][0]}..{curve[-1][0]} tokens"
                )
        seconds = ms / 1000.0
        self._step_cache[key] = seconds
        return seconds

    def supports(self, width: int, height: int, degree: int = 1, batch: int = 1) -> bool:
        try:
            self.step_s(width, height, degree, batch)
        except ValueError:
            return False
        return True

    def check(self, width: int, height: int) -> None:
        """Raise ValueError (with what the profile covers) unless width x height can be costed."""
        self.step_s(width, height, 1, 1)

    def max_batch(self, width: int, height: int, degree: int = 1) -> int:
        """Largest profiled batch size for this resolution and degree (1 when none larger)."""
        best = 1
        for d, b in self._curves:
            if d == degree and b > best and self.supports(width, height, degree, b):
                best = b
        return best

    def batch_sizes(self, width: int, height: int, degree: int = 1) -> list[int]:
        return sorted(b for d, b in self._curves if d == degree and self.supports(width, height, degree, b))

    def decode_s(self, width: int, height: int) -> float:
        """Seconds for the VAE decode of one image (0 when the profile has no decode times)."""
        if not self._decode_curve:
            return 0.0
        ms = self.decode_ms.get((width, height))
        if ms is None:
            tokens = num_tokens(width, height)
            ms = _interp(self._decode_curve, tokens)
            if ms is None:  # proportional to pixels beyond the profiled range
                t_ref, ms_ref = self._decode_curve[0] if tokens < self._decode_curve[0][0] else self._decode_curve[-1]
                ms = ms_ref * tokens / t_ref
        return ms / 1000.0

    def encode_s(self, width: int | None = None, height: int | None = None) -> float:
        """Seconds for the prompt encode (text encoders + initial noise), independent of size."""
        return self.encode_ms / 1000.0

    def degrees_upto(self, max_degree: int) -> tuple[int, ...]:
        return tuple(d for d in self.degrees if d <= max_degree)

    def fastest_step(self, width: int, height: int, max_degree: int, cached: bool = False) -> tuple[int, float]:
        """(degree, seconds) of the fastest single-request step using at most max_degree devices
        (cached: of a request that runs with step caching)."""
        best: tuple[int, float] | None = None
        for d in self.degrees_upto(max_degree):
            s = self.step_s(width, height, d, cached=cached)
            if best is None or s < best[1]:
                best = (d, s)
        if best is None:
            raise ValueError(f"profile {self.name} has no degree <= {max_degree}: {self.degrees}")
        return best

    def isolated_s(self, width: int, height: int, num_steps: int, max_degree: int, cached: bool = False) -> float:
        """Fastest service time of one request alone: steps at the fastest degree, then decode
        (cached: with step caching; the decode is the same)."""
        return num_steps * self.fastest_step(width, height, max_degree, cached)[1] + self.decode_s(width, height)

    def typical_step_s(self) -> float:
        """Geometric mean of the profiled degree-1 step times: the 'typical request' step that
        sizes a round (DESIGN.md: a round holds ~5 steps of a typical request)."""
        times = [ms / 1000.0 for (_, _, d, b), ms in self.step_ms.items() if d == 1 and b == 1]
        if not times:
            times = [ms / 1000.0 for ms in self.step_ms.values()]
        return math.exp(sum(math.log(t) for t in times) / len(times))
