#!/usr/bin/env python3
"""xDiT (xfuser) as the external peer: the same FLUX.1-dev-architecture transformer (random weights, bf16)
run through xfuser's own Ulysses sequence parallelism, at a degree fixed for the life of the processes
(xDiT's design), in two modes:

* ``step``  — one forward (= one denoising step) per resolution, median of --iters after --warmup;
  also checks the parallel output against a one-GPU diffusers forward of the same weights (issue 3).
* ``serve`` — replay a trace (tetri_engine/sched/trace.py's JSON lines: arrival_s, width, height, steps,
  slo_ms at SLO scale 1.0) in real time, one request at a time, first come first served, as xDiT's HTTP
  service does; per-request finish time, latency, deadline met, and the SAR (issue 7). FCFS does not
  look at deadlines, so one replay is scored at every ``--slo-scales`` value (deadline = arrival +
  scale x slo_ms). Only rank 0 reads the clock and decides; it broadcasts each decision, so both ranks
  always run the same forward. Idle gaps are skipped (``--no-compress-idle`` waits them out): when the
  server is idle and the next arrival is in the future, the trace clock jumps to it; FCFS from an
  empty system is time-shift invariant, so every outcome is the same and only wall time is saved
  (``skipped_s`` in the summary). ``--trace a.jsonl,b.jsonl`` replays several traces in turn after one
  model build and warm-up; ``--labels`` names them (default: the file names) in every output line.

Which xDiT code runs (``--path``, reported in every output line as ``path``):

* ``xfuser``   — xfuser 0.7.0's ``xFuserFlux1Transformer2DWrapper`` (the transformer its own runner
  uses for FLUX.1-dev without PipeFusion): splits the input sequence, runs xDiT's USP attention
  (Ulysses all-to-all of Q/K/V, attention, all-to-all back) in every block, all-gathers the output.
  Set up like xfuser's runner: ``init_distributed_environment`` -> ``xFuserArgs(...).create_config()``
  -> model -> ``initialize_runtime_state`` (builds xDiT's process groups) -> ``set_input_parameters``.
  Attention kernel: xfuser's choice (cuDNN SDPA on an H200 without flash-attn), or
  ``--attention-backend``; a backend whose first forward fails is replaced by SDPA_FLASH, then SDPA.
* ``yunchang`` — fallback, clearly labelled: diffusers' ``FluxTransformer2DModel`` with an attention
  processor that calls yunchang's ``LongContextAttention`` (the Ulysses core xDiT is built on), with
  PyTorch's flash SDPA as the kernel (no flash-attn package needed); the same input split and output
  gather as the xfuser wrapper.
* ``auto`` (default) — xfuser, and yunchang if xfuser fails to import, build or run its first forward.

Run on 2 GPUs (rank 0 writes --output; the env vars are also defaulted at the top of this file):

  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    torchrun --standalone --nproc_per_node=2 bench/xdit_baseline.py step \\
      --resolutions 256,512,1024,2048 --iters 10 --output bench/results/xdit-step-2xH200.jsonl

  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    torchrun --standalone --nproc_per_node=2 bench/xdit_baseline.py serve --trace trace.jsonl \\
      --slo-scales 1.0,1.1,1.2,1.5 --max-seconds 540 --output bench/results/xdit-serve-2xH200.jsonl

  # both mixes in one launch (one model build and warm-up; one budget for both)
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    torchrun --standalone --nproc_per_node=2 bench/xdit_baseline.py serve \\
      --trace out/e2e/trace-uniform.jsonl,out/e2e/trace-skewed.jsonl --labels uniform,skewed \\
      --slo-scales 1.0,1.1,1.2,1.5 --max-seconds 540 --output bench/results/xdit-serve-2xH200.jsonl

  # short smoke of the serve path: every request 2 steps, first 8 requests
  ... bench/xdit_baseline.py serve --trace trace.jsonl --steps-override 2 --max-requests 8 --max-seconds 240

  # on any machine, no GPU, no xfuser: parse, build the schedule, print what would run
  python bench/xdit_baseline.py serve --trace trace.jsonl --dry-run
  python bench/xdit_baseline.py serve --trace a.jsonl,b.jsonl --labels uniform,skewed --dry-run --max-seconds 540
  python bench/xdit_baseline.py step --dry-run

``--nproc_per_node=1`` runs the same code at degree 1 (xDiT without parallelism).

Code: this file is the entry point (CLI, ``step`` and ``serve`` modes); ``_xdit_replay.py`` the replay
(clocks, FCFS decisions, summaries, dry run; no torch); ``_xdit_runners.py`` the GPU side (distributed
context, model parts, the xfuser and yunchang runners); ``_xdit_common.py`` the pure helpers (configs,
sigma schedule, FCFS model, summary). Traces are read by tetri_engine/sched/trace.py, SAR and
percentiles come from tetri_engine/sched/metrics.py.

What ``serve`` times per request (printed and stored as ``timed``): ``steps`` x [transformer forward as
above + the flow-match Euler update of FluxPipeline's sigma schedule] + a VAE decode of the final latent
(random-weight FLUX ``AutoencoderKL``, bf16, on every rank, as xDiT does without --use_parallel_vae;
``--no-vae-decode`` leaves it out). Not timed: text encoding (random prompt embeddings of
--text-tokens tokens stand in for CLIP/T5), image post-processing and PNG, HTTP. ``--max-seconds``
bounds the whole launch in real wall time from process start (model build, warm-up and every trace
included; skipped idle time is not spent, so it does not count): a request whose predicted finish
would pass it is not started, nor is any later one, in this trace or the next; they are written as
``not_run_budget`` and count as missed in the SAR (the summary says how many). Times in the output are
on the trace's clock; the replay begins at the first arrival (an idle server before it changes nothing).

Output (JSON lines, rank 0): one ``request`` line per request and one ``summary`` line per (trace, SLO
scale), each with ``label`` and ``trace``; a summary line's sar/deadline_met/sar_of_run are at its
``slo_scale``. Its ``busy_fraction`` is over the trace's own timeline: busy_s / (replay_wall_s + skipped_s).
"""
from __future__ import annotations

import os

# NVLink multicast off on the lent H200 machines (see the project's KINDS notes).
for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _xdit_common as common  # noqa: E402

from _xdit_replay import (  # noqa: E402
    KEEPALIVE_S, SUMMARY_COLUMNS, WallClock, dry_run, replay_summary,
    replay_trace, request_row, summary_rows, timeline_line,
)
from _xdit_runners import (  # noqa: E402
    YUNCHANG_ATTN_TYPES, DistContext, JsonlWriter, _free, build_vae, _print_fallback_note, _short_exc, make_inputs,
    run_meta, select_runner, unpack_latents,
)

_SCRIPT_START_S = time.time()
# torch >= 2.12 deprecates all_gather_into_tensor (used by xfuser and the fallback): keep the log readable.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

# --------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xdit_baseline.py",
        description="xDiT (xfuser) Ulysses baseline on a FLUX.1-dev-architecture transformer: step time and "
                    "FCFS trace replay. Run under torchrun; --dry-run works anywhere.")
    sub = parser.add_subparsers(dest="mode", required=True)

    def common_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--output", help="JSON lines written by rank 0 (default: bench/results/xdit-<mode>.jsonl)")
        p.add_argument("--path", choices=("auto", "xfuser", "yunchang"), default="auto",
                       help="which xDiT code runs the steps (see the module docstring)")
        p.add_argument("--attention-backend", default=None,
                       help="xfuser AttentionBackendType name, e.g. CUDNN, SDPA_FLASH, SDPA (default: xfuser's choice)")
        p.add_argument("--yunchang-attn", default=YUNCHANG_ATTN_TYPES[0], choices=YUNCHANG_ATTN_TYPES,
                       help="kernel of the yunchang fallback (tried first; the others follow if it fails)")
        p.add_argument("--text-tokens", type=int, default=512, help="prompt tokens (T5 max_sequence_length)")
        p.add_argument("--model", choices=sorted(common.MODEL_CONFIGS), default="flux-dev",
                       help="flux-dev: FLUX.1-dev's config; tiny: a 2-block model for CPU debugging only")
        p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                       help="cpu (gloo, fp32) only for debugging the harness with --model tiny")
        p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on cuda, fp32 on cpu")
        p.add_argument("--seed", type=int, default=0, help="weights seed (same on every rank)")
        p.add_argument("--dist-timeout-s", type=float, default=300.0,
                       help="timeout of collectives: a rank that fails alone makes the others wait this long "
                            "before the run aborts")
        p.add_argument("--dry-run", action="store_true",
                       help="parse, build the schedule, print what would run; no torch.cuda, no xfuser")

    p_step = sub.add_parser("step", help="one-forward step time per resolution (issue 3)")
    common_args(p_step)
    p_step.add_argument("--resolutions", default="256,512,1024,2048",
                        help="comma list of sizes: 1024 (square) or 1024x768 (width x height)")
    p_step.add_argument("--iters", type=int, default=10, help="timed forwards per resolution (median reported)")
    p_step.add_argument("--warmup", type=int, default=3, help="untimed forwards per resolution first")
    p_step.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the comparison with a one-GPU diffusers forward of the same weights")

    p_serve = sub.add_parser("serve", help="real-time FCFS replay of a trace, one request at a time (issue 7)")
    common_args(p_serve)
    p_serve.add_argument("--trace", required=True,
                         help="JSON lines: arrival_s, width, height, steps, slo_ms; a comma list replays several "
                              "traces in turn after one model build and warm-up")
    p_serve.add_argument("--labels", default=None,
                         help="comma list, one per --trace file, written as `label` in every output line "
                              "(default: the file names without extension)")
    p_serve.add_argument("--no-compress-idle", dest="compress_idle", action="store_false",
                         help="wait out idle gaps in real time; by default, when the server is idle and the next "
                              "arrival is in the future, the trace clock jumps to it (same outcomes, less wall time)")
    p_serve.add_argument("--max-seconds", type=float, default=None,
                         help="required: wall-clock budget from process start, shared by all traces; requests "
                              "that cannot finish in it are not run (optional with --dry-run)")
    p_serve.add_argument("--steps-override", type=int, default=None,
                         help="run every request with this many steps (a short smoke; arrivals and SLOs kept)")
    p_serve.add_argument("--max-requests", type=int, default=None, help="only the first N requests by arrival")
    p_serve.add_argument("--slo-scales", default="1.0",
                         help="comma list of SLO scales (deadline = arrival + scale * slo_ms); FCFS does not depend "
                              "on deadlines, so one replay scores them all; the first is the primary")
    p_serve.add_argument("--no-vae-decode", dest="vae_decode", action="store_false",
                         help="do not time a VAE decode after the steps")
    p_serve.add_argument("--estimate-from", default=None,
                         help="dry-run only: a `step` output (JSON lines) for the predicted schedule")
    p_serve.add_argument("--dry-run-setup-s", type=float, default=120.0,
                         help="dry-run only: seconds assumed for start-up, model build and warm-up")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.text_tokens < 1:
        parser.error("--text-tokens must be >= 1")
    if args.mode == "step":
        try:
            args.sizes = common.parse_resolutions(args.resolutions)
        except ValueError as exc:
            parser.error(f"--resolutions: {exc}")
        if args.iters < 1 or args.warmup < 0:
            parser.error("--iters must be >= 1 and --warmup >= 0")
    else:
        if args.max_seconds is None and not args.dry_run:
            parser.error("serve needs --max-seconds (the wall-clock budget of the run)")
        if args.max_seconds is not None and args.max_seconds <= 0:
            parser.error("--max-seconds must be > 0")
        if args.steps_override is not None and args.steps_override < 1:
            parser.error("--steps-override must be >= 1")
        if args.max_requests is not None and args.max_requests < 1:
            parser.error("--max-requests must be >= 1")
        try:
            args.scales = common.parse_scales(args.slo_scales)
        except ValueError as exc:
            parser.error(f"--slo-scales: {exc}")
        args.traces = [t.strip() for t in args.trace.split(",") if t.strip()]
        if not args.traces:
            parser.error("--trace: no file given")
        if args.labels is None:
            args.labels = [Path(t).stem for t in args.traces]
        else:
            args.labels = [x.strip() for x in args.labels.split(",")]
            if len(args.labels) != len(args.traces) or not all(args.labels):
                parser.error(f"--labels: {len(args.traces)} traces need {len(args.traces)} non-empty labels")
        if len(set(args.labels)) != len(args.labels):
            # the label is what tells the runs apart in the output
            parser.error(f"--labels: must be distinct, got {args.labels} (give --labels for files of the same name)")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.output is None:
        args.output = str(Path("bench") / "results" / f"xdit-{args.mode}.jsonl")
    return args


# ----------------------------------------------------------------------------------------- step mode

def run_step_mode(args: argparse.Namespace, ctx: DistContext, tcfg: dict) -> int:
    torch = ctx.torch
    runner, attempts = select_runner(args, ctx, tcfg)
    meta = run_meta(args, ctx, runner, attempts)
    writer = JsonlWriter(args.output if ctx.is_main else None)
    rows = []
    for width, height in args.sizes:
        inputs = make_inputs(width, height, args.text_tokens, tcfg, ctx, seed=width * 7919 + height)
        row = {"kind": "step", "width": width, "height": height,
               "image_tokens": common.image_tokens(width, height), "warmup": args.warmup, "iters": args.iters}
        error, samples_ms, out = None, [], None
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        try:
            with torch.no_grad():
                for i in range(args.warmup + args.iters):
                    ctx.sync()
                    ctx.barrier()
                    t0 = time.perf_counter()
                    out = runner.forward(inputs)
                    ctx.sync()
                    dt = ctx.all_max(time.perf_counter() - t0)  # the step ends when the slowest rank ends
                    if i >= args.warmup:
                        samples_ms.append(dt * 1000.0)
        except Exception as exc:  # noqa: BLE001
            error = _short_exc(exc)
            ctx.log(f"{width}x{height}: forward failed: {error}", all_ranks=True)
        if not ctx.agree(error is None):
            row.update(error=error or "failed on another rank", **meta)
            rows.append(row)
            writer.write(row)
            out = None
            _free(ctx)
            continue
        row.update({
            "median_ms": common.percentile(samples_ms, 50),
            "min_ms": min(samples_ms),
            "max_ms": max(samples_ms),
            "mean_ms": sum(samples_ms) / len(samples_ms),
            "samples_ms": [round(s, 3) for s in samples_ms],
            "peak_mem_gb": (torch.cuda.max_memory_allocated(ctx.device) / 1e9) if ctx.device.type == "cuda" else None,
            "output_finite": bool(torch.isfinite(out).all().item()),
        })
        if args.check:
            try:
                with torch.no_grad():
                    ref = runner.reference_forward(inputs)
                diff = (out.float() - ref.float()).abs()
                row.update(check_max_abs_diff=float(diff.max().item()),
                           check_mean_abs_diff=float(diff.mean().item()),
                           check_ref_max_abs=float(ref.float().abs().max().item()))
                del ref, diff
            except Exception as exc:  # noqa: BLE001 - the check is informative, never fatal (no collectives)
                row.update(check_error=_short_exc(exc))
        row.update(meta)
        rows.append(row)
        writer.write(row)
        ctx.log(f"{width}x{height}: median {row['median_ms']:.2f} ms over {args.iters} "
                f"(min {row['min_ms']:.2f}, max {row['max_ms']:.2f})"
                + (f", max|diff| vs one-GPU diffusers {row['check_max_abs_diff']:.4g}"
                   f" (ref max {row['check_ref_max_abs']:.3g})" if "check_max_abs_diff" in row else ""))
        out = None
        _free(ctx)
    writer.close()
    if ctx.is_main:
        print()
        print(f"xDiT step time — {meta['path_detail']}; attention {meta['attention']}; {meta['device']}; "
              f"{args.model}, {args.dtype}, {args.text_tokens} text tokens; median of {args.iters} after {args.warmup} warm-up")
        _print_fallback_note(args, meta, attempts)
        print(common.format_table([{**r, "size": f"{r['width']}x{r['height']}"} for r in rows], [
            ("size", "size"), ("image_tokens", "img tok"), ("median_ms", "median ms"), ("min_ms", "min ms"),
            ("max_ms", "max ms"), ("peak_mem_gb", "peak GB"), ("check_max_abs_diff", "max|diff| vs 1-GPU"),
            ("output_finite", "finite"), ("error", "error")]))
        print(f"wrote {args.output}")
    return 0 if all("error" not in r for r in rows) else 1


# ---------------------------------------------------------------------------------------- serve mode

def vae_decode(vae, latents, width: int, height: int, ctx: DistContext) -> float:
    """FluxPipeline's decode of a packed latent (unpack, un-scale, AutoencoderKL.decode); seconds."""
    t0 = time.perf_counter()
    with ctx.torch.no_grad():
        z = unpack_latents(latents, width, height)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        vae.decode(z.to(ctx.dtype), return_dict=False)
    ctx.sync()
    return time.perf_counter() - t0


def serve_one(runner, vae, req_w: int, req_h: int, steps: int, args, ctx: DistContext, tcfg: dict,
              seed: int) -> tuple[float, float | None]:
    """One request: `steps` denoising steps (transformer + flow-match Euler update), then the VAE decode.
    Returns (transformer seconds, decode seconds or None), measured on this rank. The random inputs
    (prompt embeddings, noise) are drawn on the device first: a few launches, part of the latency."""
    torch = ctx.torch
    inputs = make_inputs(req_w, req_h, args.text_tokens, tcfg, ctx, seed=seed)
    sigmas = common.flux_sigmas(steps, common.image_tokens(req_w, req_h))
    latents = inputs["hidden_states"]
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(steps):
            step_inputs = dict(inputs, hidden_states=latents,
                               timestep=torch.full((1,), sigmas[s], device=ctx.device, dtype=ctx.dtype))
            noise_pred = runner.forward(step_inputs)
            latents = (latents.float() + (sigmas[s + 1] - sigmas[s]) * noise_pred.float()).to(ctx.dtype)
    ctx.sync()
    transformer_s = time.perf_counter() - t0
    return transformer_s, (vae_decode(vae, latents, req_w, req_h, ctx) if vae is not None else None)


def run_serve_mode(args: argparse.Namespace, ctx: DistContext, tcfg: dict, vcfg: dict) -> int:
    traces = [(label, path, common.apply_overrides(common.load_trace(path), args.steps_override, args.max_requests))
              for label, path in zip(args.labels, args.traces)]
    # one model build and one warm-up (every size of every trace) serve all traces
    sizes = sorted({(r.width, r.height) for _, _, reqs in traces for r in reqs}, key=lambda s: s[0] * s[1])
    runner, attempts = select_runner(args, ctx, tcfg)
    meta = run_meta(args, ctx, runner, attempts)

    vae, vae_error = None, None
    if args.vae_decode:
        try:
            vae = build_vae(vcfg, ctx, args.seed)
        except Exception as exc:  # noqa: BLE001
            vae_error = _short_exc(exc)
        if not ctx.agree(vae_error is None):
            vae = None
            vae_error = vae_error or "failed on another rank"
            ctx.log(f"VAE not built, decode not timed: {vae_error}", all_ranks=True)
    # Warm-up per size: a 1-step request (kernel selection, allocator), then a 2-step one timed for the
    # budget guard's estimate; then two VAE decodes (the second timed). A decode that fails at any size
    # (memory) turns the decode off for the whole replay, said in `timed`, rather than failing requests.
    # Rank 0's estimates are the ones used (only rank 0 decides).
    estimates: dict[tuple[int, int], tuple[float, float]] = {}
    for w, h in sizes:
        error = None
        try:
            serve_one(runner, None, w, h, 1, args, ctx, tcfg, seed=99)
            tr_s, _ = serve_one(runner, None, w, h, 2, args, ctx, tcfg, seed=98)
        except Exception as exc:  # noqa: BLE001
            error = _short_exc(exc)
            ctx.log(f"warm-up {w}x{h} failed: {error}", all_ranks=True)
        if not ctx.agree(error is None):
            estimates[(w, h)] = (float("inf"), 0.0)  # requests of this size will be tried and fail fast
            _free(ctx)
            continue
        step_s, dec_s = ctx.all_max(tr_s) / 2, 0.0
        if vae is not None:
            try:
                latents = make_inputs(w, h, args.text_tokens, tcfg, ctx, seed=97)["hidden_states"]
                vae_decode(vae, latents, w, h, ctx)
                dec_s = vae_decode(vae, latents, w, h, ctx)
                del latents
            except Exception as exc:  # noqa: BLE001
                error = _short_exc(exc)
            if not ctx.agree(error is None):
                vae, vae_error = None, f"decode at {w}x{h} failed in warm-up: {error or 'on another rank'}"
                ctx.log(f"VAE decode turned off for the replay: {vae_error}", all_ranks=True)
                dec_s = 0.0
                for key in estimates:
                    estimates[key] = (estimates[key][0], 0.0)
            dec_s = ctx.all_max(dec_s)
        estimates[(w, h)] = (step_s, dec_s)
        ctx.log(f"warm-up {w}x{h}: {step_s * 1000:.1f} ms/step, decode {dec_s * 1000:.1f} ms")
        _free(ctx)
    timed = (f"per request: steps x [{runner.path} transformer forward (Ulysses-{runner.degree}: input split, "
             f"all-to-all attention, output all-gather) + flow-match Euler update]"
             + (f" + VAE decode (random-weight FLUX AutoencoderKL, {args.dtype}, on every rank)" if vae is not None else
                "; no VAE decode" + (f" (VAE: {vae_error})" if vae_error else " (--no-vae-decode)"))
             + ". Not timed: text encoding (random prompt embeddings), post-processing/PNG, HTTP.")

    writer = JsonlWriter(args.output if ctx.is_main else None)
    deadline_abs = _SCRIPT_START_S + args.max_seconds
    setup_s = time.time() - _SCRIPT_START_S
    keepalive_s = min(KEEPALIVE_S, args.dist_timeout_s / 4)
    common_fields = {
        "steps_override": args.steps_override,
        "max_requests": args.max_requests,
        "max_seconds": args.max_seconds,
        "policy": f"xDiT fixed SP={runner.degree}, FCFS, one request at a time, non-preemptive",
        "timed": timed,
        "vae_decode_timed": vae is not None,
        "warmup_estimates_ms": {f"{w}x{h}": {"step_ms": e[0] * 1000, "decode_ms": e[1] * 1000}
                                for (w, h), e in estimates.items()},
        "setup_s": setup_s,
        "trace_clock_note": "arrival_s/start_s/finish_s/deadline_s are on the trace's clock; the replay began at "
                            "the first arrival" + ("; idle gaps were skipped (skipped_s), which shifts no outcome"
                                                   if args.compress_idle else ""),
        **meta,
    }

    def predict_s(req: common.TraceRequest) -> float:
        step_s, dec_s = estimates.get((req.width, req.height), (float("inf"), 0.0))
        return req.steps * step_s + dec_s if step_s != float("inf") else 0.0

    def run_request(req: common.TraceRequest):
        error, tr_s, dec_s = None, None, None
        try:
            tr_s, dec_s = serve_one(runner, vae, req.width, req.height, req.steps, args, ctx, tcfg,
                                    seed=1000 + req.index)
        except Exception as exc:  # noqa: BLE001
            error = _short_exc(exc)
            ctx.log(f"request {req.request_id} failed: {error}", all_ranks=True)
        ok = ctx.agree(error is None)
        return ok, tr_s, dec_s, (None if ok else error or "failed on another rank")

    runs = []
    for label, path, requests in traces:
        def on_record(i: int, rec: common.RequestRecord, skipped_s: float) -> None:
            writer.write(request_row(rec, label, path, path=runner.path, attention=runner.attention))
            if rec.status == "not_run_budget":
                return
            if rec.status == "failed":
                _free(ctx)
            ctx.log(f"[{label}] #{i} {rec.request_id} {rec.width}x{rec.height} {rec.steps} steps: "
                    + (f"({skipped_s:.2f} s idle skipped) " if skipped_s > 0 else "")
                    + f"arrival {rec.arrival_s:.2f} start {rec.start_s:.2f} finish {rec.finish_s:.2f} latency "
                    f"{rec.finish_s - rec.arrival_s:.2f} s (deadline +{rec.deadline_s - rec.arrival_s:.2f}) "
                    f"{'met' if rec.deadline_met else 'MISSED'}" + (f" [{rec.status}]" if rec.status != "completed" else ""))

        ctx.sync()
        ctx.barrier()
        ctx.log(f"[{label}] replay of {len(requests)} requests from {path} starts at trace time "
                f"{requests[0].arrival_s:.2f} s; {deadline_abs - time.time():.0f} s of budget left "
                f"(set-up took {setup_s:.0f} s)")
        result = replay_trace(requests, args.scales, clock=WallClock, broadcast=ctx.broadcast, is_main=ctx.is_main,
                              predict_s=predict_s, deadline_abs=deadline_abs, compress=args.compress_idle,
                              keepalive_s=keepalive_s, run_request=run_request, on_record=on_record)
        records, stop_at = result["records"], result["budget_stop_at"]
        if stop_at is not None:
            ctx.log(f"[{label}] budget: {len(requests) - stop_at} requests from #{stop_at} not run (marked missed)")
        summary = replay_summary(result, args.scales, args.compress_idle)
        summary.update({
            "budget_exhausted": stop_at is not None,
            "budget_note": (f"{summary['not_run_budget']} requests not run (wall-clock budget); counted as missed"
                            if stop_at is not None else "all requests ran"),
            "replay_start_s": result["replay_start_abs"] - _SCRIPT_START_S,
            "total_wall_s": time.time() - _SCRIPT_START_S,
        })
        rows = summary_rows(summary, records, args.scales, label, path, **common_fields)
        for row in rows:
            writer.write(row)
        runs.append((label, summary, rows))
        ctx.log(timeline_line(label, summary))
    writer.close()
    if ctx.is_main:
        print()
        print(f"xDiT serving replay — {common_fields['policy']}; {meta['path_detail']}; attention "
              f"{meta['attention']}; {meta['device']}")
        _print_fallback_note(args, meta, attempts)
        print(f"timed: {timed}")
        for label, summary, rows in runs:
            print()
            print(timeline_line(label, summary))
            if summary["budget_exhausted"]:
                print(f"NOTE: BUDGET RAN OUT — {summary['budget_note']}")
            print(common.format_table(rows, SUMMARY_COLUMNS))
            keys = list(summary["sar_by_scale"])
            print(common.format_table(
                [{"size": "all", "requests": summary["requests"], "completed": summary["completed"],
                  **{f"sar@{k}": v for k, v in summary["sar_by_scale"].items()}}]
                + [{"size": k, "requests": v["requests"], "completed": v["completed"],
                    **{f"sar@{x}": y for x, y in v["sar_by_scale"].items()}}
                   for k, v in summary["by_resolution"].items()],
                [("size", "size"), ("requests", "requests"), ("completed", "done")]
                + [(f"sar@{k}", f"SAR@{k}") for k in keys]))
        if len(runs) > 1:
            print()
            print(common.format_table([row for _, _, rows in runs for row in rows], SUMMARY_COLUMNS))
        print(f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    tcfg, vcfg = common.MODEL_CONFIGS[args.model]
    if args.mode == "serve":
        for path in args.traces:
            common.load_trace(path)  # fail before any GPU set-up on a bad trace
    ctx = DistContext(args)
    if tcfg["num_attention_heads"] % ctx.world_size:
        raise SystemExit(f"{tcfg['num_attention_heads']} heads do not split over {ctx.world_size} ranks")
    ctx.log(f"mode={args.mode} world_size={ctx.world_size} device={ctx.device} dtype={args.dtype} "
            f"model={args.model} path={args.path}")
    if args.text_tokens % ctx.world_size:
        # xfuser then keeps the whole prompt on every rank and its all-to-all duplicates the text keys:
        # the result differs from a one-GPU forward (seen on a tiny model: 0.016 max |diff| in fp32).
        ctx.log(f"WARNING: --text-tokens {args.text_tokens} does not split over {ctx.world_size} ranks; "
                f"xfuser's output is then not exact, and the yunchang fallback refuses it")
    try:
        if args.mode == "step":
            return run_step_mode(args, ctx, tcfg)
        return run_serve_mode(args, ctx, tcfg, vcfg)
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
