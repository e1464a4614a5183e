"""Step-time profiling: the table T(resolution, degree, batch) the scheduler plans with, measured on the
real executor for one model on these devices. One implementation behind three users:

- the engine at start-up, when no profile is given (`load_or_measure_profile`, cached on disk under
  `cache_dir/profiles/`, keyed by model, devices, dtype and torch version): a short measurement;
- `tetri-engine profile` (commands/profile.py) and `bench/profile_steps.py`: the long measurement
  (median of >= 20 steps after warm-up per entry) that writes `bench/profiles/<model>-<machine>.json`.

How a step is timed. Steps run as the engine runs them: `submit_steps` calls of `chunk_steps` steps
(a round's worth); each call's `StepsResult.seconds` (the executor's wall time for the steps, devices
synchronised on GPUs, latent moves and decode excluded) divided by its steps is one sample; the entry
is the median over the samples, `steps` steps in all, after `warmup_steps` untimed steps at the same
shape. Decode: `submit_decode` after the steps, the executor's decode time (VAE + PNG). Encode: the
executor's prompt-encode time (text encoders + seeded noise), median over every request encoded.

Parallel methods (issue 16), measured where the model offers them and `ProfileSettings.methods` asks:
"cfg": each even degree again in the CFG-parallel layout (step entries with "cfg": 2; requests with the
model's default guidance, which must enable true CFG); "patch_vae": the decode at every degree > 1
(decode entries with "degree": k, `submit_decode` on the first k devices). A profile without them
offers only sequence parallelism and one-device decodes.

Covering every size the engine admits. The cost model refuses sizes outside the profiled token range
(it never guesses). A short start-up measurement therefore adds two *extrapolated* batch-1 entries per
degree, at the smallest and the largest admitted size, from a least-squares fit ms = a + b*T + c*T^2
in token count T (c, b >= 0) over the measured points, and above the largest measured size at least
proportional to T from it (small steps are launch-bound: a fit over them underestimates the slope);
they carry `"extrapolated": true` and the profile lists them under "extrapolated". Between measured
points the cost model interpolates.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tetri_engine.request import SizeRule
from tetri_engine.sched.cost import num_tokens

log = logging.getLogger("tetri_engine.profile")

PROFILE_CODE_VERSION = 3  # bump when the measurement changes meaning: cached profiles are re-measured
METHODS = ("ulysses", "cfg", "patch_vae")  # what `ProfileSettings.methods` may name


@dataclass(frozen=True)
class ProfileSettings:
    resolutions: tuple[tuple[int, int], ...]  # (width, height)
    degrees: tuple[int, ...]
    batches: tuple[int, ...] = (1,)
    steps: int = 20  # timed steps per entry
    warmup_steps: int = 2
    chunk_steps: int = 5  # steps per submit_steps call (one sample per call)
    decode_repeats: int = 3
    batch_max_px: int = 512  # batch > 1 only for sizes with both sides <= this, at degree 1
    decode_max_px: int | None = None  # decode measured only up to this side (None: every size)
    # Extrapolated batch-1 anchors at these (width, height) when outside the measured range.
    anchors: tuple[tuple[int, int], ...] = ()
    methods: tuple[str, ...] = METHODS  # parallel methods to measure where the model offers them

    def key_dict(self) -> dict:
        return {
            "resolutions": [list(r) for r in self.resolutions], "degrees": list(self.degrees),
            "batches": list(self.batches), "steps": self.steps, "warmup_steps": self.warmup_steps,
            "chunk_steps": self.chunk_steps, "decode_repeats": self.decode_repeats,
            "batch_max_px": self.batch_max_px, "decode_max_px": self.decode_max_px,
            "anchors": [list(a) for a in self.anchors], "methods": list(self.methods),
        }


def parse_resolutions(text: str) -> tuple[tuple[int, int], ...]:
    """"256,512,1024x768" -> ((256, 256), (512, 512), (1024, 768))."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        w, _, h = item.partition("x")
        out.append((int(w), int(h or w)))
    return tuple(out)


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def machine_name(devices: Sequence[str]) -> str:
    """A short machine label for file names: "2xH200", "4xcpu-2cores"."""
    n = len(devices)
    if devices and devices[0].startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(int(devices[0].split(":")[1]))
        short = name.replace("NVIDIA", "").strip().split()[0] if name else "gpu"
        return f"{n}x{short}"
    return f"{n}xcpu-{os.cpu_count()}cores"


def usable_degrees(requested: Sequence[int], num_devices: int, num_heads: int, cfg: int = 1) -> tuple[int, ...]:
    """The requested degrees that these devices and this model can run (power of two, <= devices,
    its sequence-parallel part dividing the head count for Ulysses; cfg 2: even)."""
    return tuple(sorted({d for d in requested if d >= cfg and d & (d - 1) == 0 and d <= num_devices
                         and num_heads % (d // cfg) == 0}))


def measured_layouts(executor: Any, settings: ProfileSettings, degrees: Sequence[int]) -> tuple[list[int], list[int]]:
    """(degrees to measure in the CFG-parallel layout, degrees > 1 to measure the decode at), as the
    settings ask and the model offers (CFG: with its default guidance)."""
    model = executor.model
    cfg = []
    if "cfg" in settings.methods and model.cfg_parallel(model.default_guidance):
        cfg = [d for d in usable_degrees(degrees, len(executor.devices), model.num_heads, cfg=2)]
    decode = [d for d in degrees if d > 1] if "patch_vae" in settings.methods and \
        "patch_vae" in model.parallel_methods else []
    return cfg, decode


def default_startup_settings(executor: Any, size_rule: SizeRule) -> ProfileSettings:
    """The short start-up measurement: a few sizes, every usable degree, batch 1, a few steps, and
    anchors at the smallest and largest size `size_rule` admits.

    CPU devices: 64/256/512/768 px, decode up to 512 px (it scales with pixels): about 3 s for the
    tiny model on 2 cores. GPUs: the paper's sizes up to the engine's maximum (a few steps each;
    2048^2 FLUX is ~1 s a step on one H200).
    """
    degrees = usable_degrees([2**i for i in range(8)], len(executor.devices), executor.model.num_heads)
    max_width, max_height = size_rule.max_width, size_rule.max_height
    if str(executor.devices[0]).startswith("cuda"):
        sides = [s for s in (256, 512, 1024, 2048) if s <= min(max_width, max_height)]
        settings = dict(steps=4, warmup_steps=2, chunk_steps=2, decode_repeats=1)
    else:
        sides = [s for s in (64, 256, 512, 768) if s <= min(max_width, max_height)]
        settings = dict(steps=2, warmup_steps=1, chunk_steps=2, decode_repeats=1, decode_max_px=512)
    anchors = ((size_rule.min_px, size_rule.min_px), (max_width, max_height))
    return ProfileSettings(resolutions=tuple((s, s) for s in sides), degrees=degrees, anchors=anchors, **settings)


def measure_profile(executor: Any, settings: ProfileSettings, *, model_name: str,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Measure a profile on `executor`'s devices. Returns the profile dict (docs/ARCHITECTURE.md,
    "Profile JSON"), with a per-entry "n" (samples) and "cv" (spread)."""
    say = progress or (lambda message: log.info("%s", message))
    devices, num_heads = executor.devices, executor.model.num_heads
    degrees = usable_degrees(settings.degrees, len(devices), num_heads)
    skipped = sorted(set(settings.degrees) - set(degrees))
    if skipped:
        say(f"skipping degrees {skipped}: not a power of two <= {len(devices)} devices dividing "
            f"{num_heads} heads")
    if not degrees:
        raise ValueError(f"no usable degree among {list(settings.degrees)} on {len(devices)} devices")
    cfg_degrees, decode_degrees = measured_layouts(executor, settings, degrees)
    run = _Measurement(executor, settings, say, decode_degrees)
    for width, height in settings.resolutions:
        for degree in degrees:
            batches = [1] + [b for b in settings.batches if b > 1 and degree == 1
                             and max(width, height) <= settings.batch_max_px]
            for batch in batches:
                run.measure(width, height, degree, batch)
            if degree in cfg_degrees:
                run.measure(width, height, degree, 1, cfg=2)
    extrapolated = _add_anchors(run.step_entries, settings.anchors, degrees)
    extrapolated += _add_anchors(run.step_entries, settings.anchors, cfg_degrees, cfg=2)
    profile = {
        "model": model_name,
        "machine": machine_name(devices),
        "dtype": executor.model.dtype,
        "compiled": executor.model.compiled,
        "attention": executor.model.attention,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "num_devices": len(devices),
        "devices": list(devices),
        "torch": _torch_version(),
        "source": (f"measured by tetri_engine.engine.profiling: median of {settings.steps} steps after "
                   f"{settings.warmup_steps} warm-up steps, {settings.chunk_steps} steps per call"),
        "settings": settings.key_dict(),
        "step_ms": run.step_entries,
        "decode_ms": run.decode_entries,
        "encode_ms": round(statistics.median(run.encode_samples_s) * 1e3, 4) if run.encode_samples_s else 0.0,
    }
    if extrapolated:
        profile["extrapolated"] = extrapolated
    return profile


class _Measurement:
    """The entries of one profile run, measured one (size, degree, batch) at a time."""

    def __init__(self, executor: Any, settings: ProfileSettings, say: Callable[[str], None],
                 decode_degrees: Sequence[int] = ()):
        self.executor, self.settings, self.say = executor, settings, say
        self.decode_degrees = list(decode_degrees)  # patch-parallel decodes to measure, besides one device
        self.step_entries: list[dict] = []
        self.decode_entries: list[dict] = []
        self.encode_samples_s: list[float] = []
        self._decoded: set[tuple[int, int]] = set()
        self._counter = 0

    def measure(self, width: int, height: int, degree: int, batch: int, cfg: int = 1) -> None:
        """One step entry (warm-up, then the timed steps); the size's decodes once, at batch 1."""
        settings = self.settings
        ids = self._encode(width, height, batch)
        try:
            if settings.warmup_steps:
                self._run_steps(ids, degree, settings.warmup_steps, cfg)
            samples = self._run_steps(ids, degree, settings.steps, cfg)
            median_s = statistics.median(samples)
            cv = statistics.pstdev(samples) / statistics.mean(samples) if len(samples) > 1 else 0.0
            entry = {"width": width, "height": height, "degree": degree, "batch": batch,
                     "ms": round(median_s * 1e3, 4), "n": settings.steps, "calls": len(samples), "cv": round(cv, 4)}
            self.step_entries.append({**entry, "cfg": cfg} if cfg > 1 else entry)
            self.say(f"{width}x{height} degree {degree} batch {batch}{f' cfg {cfg}' if cfg > 1 else ''}: "
                     f"{median_s * 1e3:.2f} ms/step")
            wants_decode = settings.decode_max_px is None or max(width, height) <= settings.decode_max_px
            if (width, height) not in self._decoded and batch == 1 and wants_decode:
                self._measure_decode(ids[0], width, height)
        finally:
            for rid in ids:
                self.executor.release(rid)

    def _encode(self, width: int, height: int, count: int) -> list[str]:
        from tetri_engine.request import GenerationRequest

        ids = []
        for _ in range(count):
            self._counter += 1
            rid = f"__profile__/{self._counter}"
            request = GenerationRequest(prompt="a profile of the step time", width=width, height=height,
                                        num_inference_steps=self.settings.warmup_steps + self.settings.steps,
                                        seed=self._counter, request_id=rid)
            self.encode_samples_s.append(self.executor.submit_encode(rid, request).result().encode_s)
            ids.append(rid)
        return ids

    def _run_steps(self, ids: list[str], degree: int, steps: int, cfg: int = 1) -> list[float]:
        """Per-step seconds of each call, `chunk_steps` steps at a time."""
        samples = []
        left = steps
        while left > 0:
            n = min(self.settings.chunk_steps, left)
            result = self.executor.submit_steps(ids, list(range(degree)), n, cfg=cfg).result()
            if result.errors:
                raise RuntimeError(f"profiling step failed: {result.errors}")
            samples.append(result.seconds / n)
            left -= n
        return samples

    def _measure_decode(self, rid: str, width: int, height: int) -> None:
        """The decode on one device, then patch-parallel on the first k devices for each decode degree k."""
        for degree in [1] + [d for d in self.decode_degrees if d <= (height // 8)]:
            devices = 0 if degree == 1 else tuple(range(degree))
            decode_s = []
            for _ in range(max(1, self.settings.decode_repeats)):
                before = self.executor.progress(rid).decode_s
                self.executor.submit_decode(rid, devices).result()
                decode_s.append(self.executor.progress(rid).decode_s - before)
            entry = {"width": width, "height": height, "ms": round(statistics.median(decode_s) * 1e3, 4)}
            self.decode_entries.append({**entry, "degree": degree} if degree > 1 else entry)
            self.say(f"{width}x{height} decode on {degree} device(s): {statistics.median(decode_s) * 1e3:.2f} ms")
        self._decoded.add((width, height))


def _fit_ms(points: list[tuple[int, float]]) -> Callable[[int], float]:
    """ms(T) = a + b*T + c*T^2 through (tokens, ms) points, least squares with b, c >= 0 (a step
    never gets cheaper with more tokens); fewer points: a lower-order fit."""
    import numpy as np

    xs = np.array([p[0] for p in points], dtype=float)
    ys = np.array([p[1] for p in points], dtype=float)
    best = None
    for cols in ((0, 1, 2), (0, 1), (0, 2), (0,)):
        if len(points) < len(cols):
            continue
        design = np.stack([xs**k for k in cols], axis=1)
        coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
        if any(c < 0 for k, c in zip(cols, coef) if k > 0):
            continue
        err = float(np.sum((design @ coef - ys) ** 2))
        if best is None or err < best[0] - 1e-12:
            best = (err, cols, coef)
    _, cols, coef = best
    return lambda t: float(sum(c * float(t) ** k for k, c in zip(cols, coef)))


def _add_anchors(step_entries: list[dict], anchors: Sequence[tuple[int, int]], degrees: Sequence[int],
                 cfg: int = 1) -> list[dict]:
    """Append extrapolated batch-1 entries at `anchors` outside each degree's measured token range (of
    the `cfg` layout). An extrapolated degree-k step is never taken to be more than k times faster than
    degree 1 there."""
    added = []
    degree1_ms: dict[tuple[int, int], float] = {(e["width"], e["height"]): e["ms"] for e in step_entries
                                                if e["degree"] == 1 and e["batch"] == 1 and e.get("cfg", 1) == 1}
    for degree in sorted(degrees):
        points = sorted((num_tokens(e["width"], e["height"]), e["ms"]) for e in step_entries
                        if e["degree"] == degree and e["batch"] == 1 and e.get("cfg", 1) == cfg
                        and not e.get("extrapolated"))
        if not points:
            continue
        fit = _fit_ms(points)
        lo, hi = points[0][0], points[-1][0]
        for width, height in anchors:
            tokens = num_tokens(width, height)
            if lo <= tokens <= hi:
                continue
            if tokens > hi:  # at least proportional to tokens from the largest measured step (small
                # steps are launch-bound, so a fit over them underestimates the slope)
                ms = max(fit(tokens), points[-1][1] * tokens / hi)
            else:  # small steps are launch-bound: at most the smallest measured, at least half of it
                ms = min(points[0][1], max(fit(tokens), 0.5 * points[0][1]))
            if degree == 1 and cfg == 1:
                degree1_ms[(width, height)] = ms
            elif (width, height) in degree1_ms:
                ms = max(ms, degree1_ms[(width, height)] / degree)
            entry = {"width": width, "height": height, "degree": degree, "batch": 1, "ms": round(ms, 4),
                     "extrapolated": True, **({"cfg": cfg} if cfg > 1 else {})}
            step_entries.append(entry)
            added.append({k: entry[k] for k in ("width", "height", "degree", "ms", "cfg") if k in entry})
    return added


def _torch_version() -> str:
    import torch

    return torch.__version__


def cache_path(cache_dir: str, model_name: str, devices: Sequence[str], dtype: str, settings: ProfileSettings,
               variant: dict | None = None) -> str:
    """variant: what else changes step times (compiled, attention kernel, Ulysses chunks, ...)."""
    key = json.dumps({"model": model_name, "devices": list(devices), "dtype": dtype, "torch": _torch_version(),
                      "python": platform.python_version(), "code": PROFILE_CODE_VERSION,
                      "machine": machine_name(devices), "settings": settings.key_dict(), **(variant or {})},
                     sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(model_name.rstrip("/")))
    return os.path.join(cache_dir, "profiles", f"{safe_model}-{digest}.json")


def load_or_measure_profile(executor: Any, model_name: str, *, cache_dir: str, size_rule: SizeRule,
                            settings: ProfileSettings | None = None, variant: dict | None = None) -> dict:
    """The start-up profile of `executor`'s model on its devices: from the disk cache when this
    model/devices/dtype/torch/compile/attention (+ `variant`) was measured before, else measured now
    (short) and cached. A corrupt cache file is measured over. size_rule: the sizes the engine admits
    (the profile covers them)."""
    settings = settings or default_startup_settings(executor, size_rule)
    devices = executor.devices
    variant = {"compiled": executor.model.compiled, "attention": executor.model.attention, **(variant or {})}
    path = cache_path(cache_dir, model_name, devices, executor.model.dtype, settings, variant)
    try:
        with open(path, encoding="utf-8") as f:
            profile = json.load(f)
        log.info("step-time profile from cache %s", path)
        return profile
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable profile cache %s: %s", path, exc)
    start = time.perf_counter()
    profile = measure_profile(executor, settings, model_name=model_name, progress=lambda m: log.debug("profile: %s", m))
    log.info("measured the step-time profile of %s on %s in %.1f s (cached at %s)", model_name,
             ",".join(devices), time.perf_counter() - start, path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(profile, f, indent=1)
        os.replace(tmp, path)  # atomic: a concurrent start-up never reads half a file
    except OSError as exc:
        log.warning("could not cache the profile at %s: %s", path, exc)
    return profile


def profile_model(model_name: str, devices: Sequence[str], settings: ProfileSettings, *, dtype: str = "auto",
                  progress: Callable[[str], None] | None = None, **model_options: Any) -> dict:
    """Load `model_name` on `devices` (`model_options`: compile, attention, ulysses_chunks, cache_dir,
    cuda_graphs, as the engine takes them), start an executor, measure, shut down: the whole profile
    run of `tetri-engine profile` and bench/profile_steps.py. A compiled model compiles each shape in
    its warm-up steps, so the timed steps run as the engine's requests will."""
    from tetri_engine.executor import Executor

    executor = Executor.load(model_name, list(devices), dtype=dtype, **model_options)
    try:
        with executor.compiling():
            profile = measure_profile(executor, settings, model_name=model_name, progress=progress)
        profile["ulysses_chunks"] = model_options.get("ulysses_chunks", 1)
        return profile
    finally:
        executor.shutdown()


def merge_profiles(base: dict, new: dict) -> dict:
    """`base` with every entry that `new` measured replaced by new's (step entries by (size, degree,
    batch), decode by size, encode): how a one-GPU run refreshes the degree-1 rows of a 2-GPU profile.
    Every step entry says when it was measured ("measured": the created time of its run); "merged"
    lists the runs in it. The machine-wide fields (dtype, compiled, attention, ...) become new's."""
    def stamped(entries: list[dict], created: str) -> list[dict]:
        return [{**e, "measured": e.get("measured", created)} for e in entries]

    key = lambda e: (e["width"], e["height"], e["degree"], e.get("batch", 1), e.get("cfg", 1))  # noqa: E731
    decode_key = lambda e: (e["width"], e["height"], e.get("degree", 1))  # noqa: E731
    fresh = {key(e): e for e in stamped(new["step_ms"], new.get("created", "?"))}
    steps = [e for e in stamped(base["step_ms"], base.get("created", "?")) if key(e) not in fresh]
    decode_new = {decode_key(e): e for e in new.get("decode_ms", [])}
    decode = [e for e in base.get("decode_ms", []) if decode_key(e) not in decode_new]
    merged = {**base, **{k: v for k, v in new.items() if k not in ("step_ms", "decode_ms", "extrapolated",
                                                                     "num_devices", "devices", "machine", "settings")}}
    merged["step_ms"] = sorted(steps + list(fresh.values()), key=key)
    merged["decode_ms"] = sorted(decode + list(decode_new.values()), key=decode_key)
    merged["extrapolated"] = [{k: e[k] for k in ("width", "height", "degree", "ms", "cfg") if k in e}
                              for e in merged["step_ms"] if e.get("extrapolated")]
    runs = base.get("merged") or [{k: base.get(k) for k in ("created", "source", "dtype", "devices")}]
    degrees = sorted({e["degree"] for e in new["step_ms"]})
    merged["merged"] = runs + [{**{k: new.get(k) for k in ("created", "source", "dtype", "compiled", "attention",
                                                           "devices")}, "degrees": degrees}]
    return merged


def layout_name(degree: int, cfg: int = 1) -> str:
    """"degree 2" (Ulysses over 2), "cfg 2 x sp 1" (the guidance branches side by side, one device each)."""
    return f"degree {degree}" if cfg == 1 else f"cfg {cfg} x sp {degree // cfg}"


def format_table(profile: dict) -> str:
    """A markdown table of a profile (for bench/RESULTS.md): ms per step by size and layout (degree;
    CFG-parallel), the speed-up of each over degree 1, batch entries, decode per degree and encode."""
    steps = profile["step_ms"]
    layouts = sorted({(e["degree"], e.get("cfg", 1)) for e in steps})
    sizes = sorted({(e["width"], e["height"]) for e in steps}, key=lambda s: s[0] * s[1])
    by = {(e["width"], e["height"], e["degree"], e.get("batch", 1), e.get("cfg", 1)): e for e in steps}
    decode = {(e["width"], e["height"], e.get("degree", 1)): e["ms"] for e in profile.get("decode_ms", [])}
    decode_degrees = sorted({d for _, _, d in decode})
    head = (["size"] + [f"{layout_name(d, c)} ms/step" for d, c in layouts]
            + [f"{layout_name(d, c)} speed-up" for d, c in layouts if (d, c) != (1, 1)]
            + [f"decode ms ({d} dev)" for d in decode_degrees])
    lines = [f"{profile.get('model')} on {profile.get('machine')} ({profile.get('dtype')}), "
             f"{profile.get('source', '')}; * = extrapolated, not measured", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w, h in sizes:
        row = [f"{w}x{h}"]
        for d, c in layouts:
            e = by.get((w, h, d, 1, c))
            row.append("-" if e is None else f"{e['ms']:.2f}{'*' if e.get('extrapolated') else ''}")
        one = by.get((w, h, 1, 1, 1))
        for d, c in layouts:
            if (d, c) != (1, 1):
                other = by.get((w, h, d, 1, c))
                row.append("-" if not one or not other else f"{one['ms'] / other['ms']:.2f}x")
        row += [f"{decode[(w, h, d)]:.1f}" if (w, h, d) in decode else "-" for d in decode_degrees]
        lines.append("| " + " | ".join(row) + " |")
    batched = sorted((k, e) for k, e in by.items() if k[3] > 1)
    if batched:
        lines += ["", "| size | degree | batch | ms/step | ms/image-step |", "|---|---|---|---|---|"]
        for (w, h, d, b, _), e in batched:
            lines.append(f"| {w}x{h} | {d} | {b} | {e['ms']:.2f} | {e['ms'] / b:.2f} |")
    lines += ["", f"prompt encode: {profile.get('encode_ms', 0.0):.1f} ms"]
    return "\n".join(lines)
