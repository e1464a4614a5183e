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
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _xdit_common as common  # noqa: E402

_SCRIPT_START_S = time.time()
# torch >= 2.12 deprecates all_gather_into_tensor (used by xfuser and the fallback): keep the log readable.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

XDIT_ENV_VARS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
XFUSER_FALLBACK_BACKENDS = ("SDPA_FLASH", "SDPA")
ACTION_STOP, ACTION_RUN, ACTION_WAIT = 0, 1, 2   # rank 0's per-request decision in `serve`
KEEPALIVE_S = 30.0
YUNCHANG_ATTN_TYPES = ("torch_flash", "torch_cudnn", "torch_efficient", "torch_math")  # math: last resort


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


# ------------------------------------------------------------------- replay (live run and dry run)

BUSY_NOTE = ("busy_fraction = busy_s / replay_span_s, where replay_span_s = replay_wall_s + skipped_s: the trace's "
             "own timeline, as if idle gaps had been waited out")


class WallClock:
    """The live replay's clock."""

    @staticmethod
    def now() -> float:
        return time.time()

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)


class VirtualClock:
    """The dry run's clock: time passes only when the replay sleeps or a request runs (for its estimated
    service time), so the dry run predicts the live run's wall time without spending it."""

    def __init__(self, start_s: float = 0.0):
        self.t = start_s

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def replay_trace(requests, scales, *, clock, broadcast, is_main: bool, predict_s, deadline_abs: float,
                 compress: bool, keepalive_s: float, run_request, on_record=None) -> dict:
    """FCFS, one request at a time, non-preemptive, on the trace's clock: t0 + arrival_s is when a request
    arrives, and the replay begins at the first arrival. The live run and the dry run share this loop.

    Only rank 0 (`is_main`) reads `clock` and decides; `broadcast` sends its [action, skip] to every
    rank, so all ranks run the same request and shift the trace clock by the same amount.
    Idle-gap compression (`compress`): at each decision the previous request has finished, so the
    server is idle; if the next arrival is still in the future, t0 moves back by the gap instead of
    sleeping. FCFS from an empty system is time-shift invariant, so start/finish/latency on the trace
    clock are unchanged; only the wall time shrinks. The budget (`deadline_abs`) is on `clock`, so it
    counts real wall time. Without compression the wait is sliced by `keepalive_s` (ACTION_WAIT), so a
    long gap never reaches the collectives' timeout.

    run_request(req) -> (ok, transformer_s, decode_s, error) runs it on every rank;
    on_record(index, record, skipped_before_s) is called for every record, not-run ones included."""
    replay_start = broadcast([clock.now()])[0]
    t0 = replay_start - requests[0].arrival_s
    skipped_total = 0.0
    records: list[common.RequestRecord] = []
    budget_stop_at: int | None = None
    for i, req in enumerate(requests):
        skipped_here = 0.0
        while True:
            action, skip = ACTION_RUN, 0.0
            if is_main:
                now, arrive = clock.now(), t0 + req.arrival_s
                if compress and now < arrive:
                    skip, arrive = arrive - now, now
                if max(now, arrive) + predict_s(req) > deadline_abs:
                    action, skip = ACTION_STOP, 0.0
                elif now < arrive:
                    clock.sleep(min(arrive - now, keepalive_s))
                    action = ACTION_RUN if clock.now() >= arrive else ACTION_WAIT
            action_f, skip = broadcast([float(action), skip])
            action = int(action_f)
            t0 -= skip
            skipped_here += skip
            if action != ACTION_WAIT:
                break
        skipped_total += skipped_here
        if action == ACTION_STOP:
            budget_stop_at = i
            for j, r in enumerate(requests[i:], start=i):
                records.append(common.make_record(r, scales, "not_run_budget"))
                if on_record:
                    on_record(j, records[-1], 0.0)
            break
        start_s = clock.now() - t0
        ok, tr_s, dec_s, error = run_request(req)
        finish_s = clock.now() - t0
        if ok:
            rec = common.make_record(req, scales, "completed", start_s, finish_s, transformer_s=tr_s, decode_s=dec_s)
        else:
            rec = common.make_record(req, scales, "failed", start_s, finish_s, error=error)
        records.append(rec)
        if on_record:
            on_record(i, rec, skipped_here)
    return {"records": records, "replay_start_abs": replay_start, "wall_s": clock.now() - replay_start,
            "skipped_s": skipped_total, "budget_stop_at": budget_stop_at}


def replay_summary(result: dict, scales, compress: bool) -> dict:
    """common.summarize of a replay, the busy fraction taken over the uncompressed trace timeline."""
    summary = common.summarize(result["records"], scales, replay_span_s=result["wall_s"] + result["skipped_s"])
    summary.update(replay_wall_s=result["wall_s"], skipped_s=result["skipped_s"], compress_idle=compress,
                   busy_fraction_note=BUSY_NOTE)
    return summary


def request_row(rec: common.RequestRecord, label: str, trace: str, **extra) -> dict:
    return {**asdict(rec), "label": label, "trace": trace, **extra}


def summary_rows(summary: dict, records, scales, label: str, trace: str, **extra) -> list[dict]:
    """One `summary` line per SLO scale (bench/e2e_slo.py writes one per mix and scale): slo_scale,
    deadline_met, sar, sar_of_run and the per-resolution sar are at that scale; sar_by_scale has all."""
    rows = []
    for x in scales:
        k = common.scale_key(x)
        rows.append({
            "kind": "summary", "label": label, "trace": trace, **summary, **extra,
            "slo_scale": x,
            "deadline_met": sum(1 for r in records if r.met_by_scale.get(k)),
            "sar": summary["sar_by_scale"][k],
            "sar_of_run": summary["sar_of_run_by_scale"][k],
            "by_resolution": {size: {**d, "sar": d["sar_by_scale"][k]}
                              for size, d in summary["by_resolution"].items()},
        })
    return rows


SUMMARY_COLUMNS = [
    ("label", "label"), ("requests", "requests"), ("completed", "done"), ("failed", "failed"),
    ("not_run_budget", "not run"), ("slo_scale", "scale"), ("deadline_met", "met"), ("sar", "SAR"),
    ("sar_of_run", "SAR(run)"), ("latency_mean_s", "mean s"), ("latency_p50_s", "p50 s"),
    ("latency_p99_s", "p99 s"), ("busy_fraction", "busy")]


def timeline_line(label: str, summary: dict) -> str:
    how = ("idle gaps skipped" if summary["compress_idle"] else "idle gaps waited out (--no-compress-idle)")
    return (f"[{label}] replay wall {summary['replay_wall_s']:.1f} s + {summary['skipped_s']:.1f} s idle skipped "
            f"= trace timeline {summary['replay_span_s']:.1f} s ({how}); busy fraction is over the trace timeline")


# ------------------------------------------------------------------------------------------ dry run

def dry_run(args: argparse.Namespace) -> int:
    """Everything that does not need a GPU: no torch.cuda, no xfuser import."""
    tcfg, _ = common.MODEL_CONFIGS[args.model]
    print(f"[dry-run] mode={args.mode} model={args.model} path={args.path} device={args.device} dtype={args.dtype}")
    print("[dry-run] env: " + " ".join(f"{k}={os.environ.get(k)}" for k in XDIT_ENV_VARS))
    print(f"[dry-run] degree = torchrun's --nproc_per_node (Ulysses over all ranks); heads="
          f"{tcfg['num_attention_heads']} (must divide by the degree); text tokens={args.text_tokens}")
    if args.mode == "step":
        rows = []
        for w, h in args.sizes:
            n = common.image_tokens(w, h)
            rows.append({"size": f"{w}x{h}", "image_tokens": n, "joint_tokens": n + args.text_tokens,
                         "tokens_per_rank@2": (n + args.text_tokens + 1) // 2})
        print(common.format_table(rows, [("size", "size"), ("image_tokens", "image tokens"),
                                         ("joint_tokens", "joint seq"), ("tokens_per_rank@2", "per rank @2")]))
        print(f"[dry-run] would run per size: {args.warmup} warm-up + {args.iters} timed forwards"
              f"{', then a one-GPU reference forward for the check' if args.check else ''}; write {args.output}")
        return 0

    source = args.estimate_from or "DESIGN.md's diffusers Ulysses-2 numbers on 2xH200 (rough)"
    print(f"[dry-run] predicted with step times from {source}, transformer only; "
          + (f"{args.dry_run_setup_s:.0f} s assumed for set-up, so {args.max_seconds - args.dry_run_setup_s:.0f} s "
             f"of wall-clock budget for all traces" if args.max_seconds is not None
             else "no budget (--max-seconds not given)")
          + ("; idle gaps skipped" if args.compress_idle else "; idle gaps waited out (--no-compress-idle)"))
    runs = plan_serve(args)
    for run in runs:
        requests, records, summary = run["requests"], run["records"], run["summary"]
        mix: dict[str, int] = {}
        for r in requests:
            mix[f"{r.width}x{r.height}"] = mix.get(f"{r.width}x{r.height}", 0) + 1
        print(f"[dry-run] [{run['label']}] trace {run['trace']}: {len(requests)} requests, arrivals "
              f"{requests[0].arrival_s:.1f}..{requests[-1].arrival_s:.1f} s, mix {mix}, steps "
              f"{sorted({r.steps for r in requests})}{' (--steps-override)' if args.steps_override else ''}")
        sars = ", ".join(f"{v:.3f} @ {k}" for k, v in summary["sar_by_scale"].items())
        print(f"[dry-run]   would run {len(requests) - summary['not_run_budget']} of {len(requests)}; predicted SAR "
              f"{sars} (SLO scale)")
        print("[dry-run]   " + timeline_line(run["label"], summary))
        show = records[:12]
        print(common.format_table([vars(r) for r in show], [
            ("request_id", "request"), ("width", "w"), ("height", "h"), ("steps", "steps"), ("arrival_s", "arrival"),
            ("start_s", "start"), ("finish_s", "finish"), ("deadline_s", "deadline"), ("deadline_met", "met"),
            ("status", "status")]))
        if len(records) > len(show):
            print(f"[dry-run]   ... {len(records) - len(show)} more")
    rows = [row for run in runs for row in run["rows"] if row["kind"] == "summary"]
    print(common.format_table(rows, SUMMARY_COLUMNS))
    print(f"[dry-run] would write {sum(len(run['records']) for run in runs)} request lines + {len(rows)} summary "
          f"lines (one per trace and SLO scale, told apart by `label`) to {args.output}")
    return 0


def plan_serve(args: argparse.Namespace) -> list[dict]:
    """The dry run of `serve`: the live replay loop on a VirtualClock, each request taking its estimated
    transformer time; start-up takes --dry-run-setup-s and the traces follow one another, as live.
    Returns per trace: label, trace, requests, records, summary, and the output lines a live run writes."""
    table = (common.load_step_table(args.estimate_from) if args.estimate_from
             else dict(common.DEFAULT_STEP_MS_ESTIMATE))
    est_step_ms = common.step_ms_estimator(table)

    def service_s(r: common.TraceRequest) -> float:
        return r.steps * est_step_ms(r.width, r.height) / 1000.0

    def run_request(r: common.TraceRequest):
        clock.sleep(service_s(r))
        return True, None, None, None

    clock = VirtualClock(args.dry_run_setup_s)   # seconds since process start
    runs = []
    for label, path in zip(args.labels, args.traces):
        requests = common.apply_overrides(common.load_trace(path), args.steps_override, args.max_requests)
        result = replay_trace(
            requests, args.scales, clock=clock, broadcast=lambda values: values, is_main=True, predict_s=service_s,
            deadline_abs=args.max_seconds if args.max_seconds is not None else float("inf"),
            compress=args.compress_idle, keepalive_s=min(KEEPALIVE_S, args.dist_timeout_s / 4),
            run_request=run_request)
        summary = replay_summary(result, args.scales, args.compress_idle)
        records = result["records"]
        rows = ([request_row(rec, label, path) for rec in records]
                + summary_rows(summary, records, args.scales, label, path, dry_run=True))
        runs.append({"label": label, "trace": path, "requests": requests, "records": records,
                     "summary": summary, "rows": rows})
    return runs


# ---------------------------------------------------------------------------------------- distributed

class DistContext:
    """torch.distributed set-up plus a CPU (gloo) control group for rank-0 decisions and agreement."""

    def __init__(self, args: argparse.Namespace):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        if args.device == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA GPU here: use --dry-run, or --device cpu --model tiny to debug")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            self.backend = "nccl"
        else:
            self.device = torch.device("cpu")
            self.backend = "gloo"
        self.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        timeout = timedelta(seconds=args.dist_timeout_s)
        if not dist.is_initialized():
            # No device_id: xfuser creates its groups with new_group() afterwards (see its parallel_state).
            dist.init_process_group(backend=self.backend, rank=self.rank, world_size=self.world_size,
                                    timeout=timeout)
        self.ctrl = dist.new_group(backend="gloo", timeout=timeout)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        self.dist.barrier(group=self.ctrl)

    def broadcast(self, values: list[float]) -> list[float]:
        t = self.torch.tensor(values, dtype=self.torch.float64)
        self.dist.broadcast(t, src=0, group=self.ctrl)
        return t.tolist()

    def _reduce(self, value: float, op) -> float:
        t = self.torch.tensor([value], dtype=self.torch.float64)
        self.dist.all_reduce(t, op=op, group=self.ctrl)
        return float(t.item())

    def all_min(self, value: float) -> float:
        return self._reduce(value, self.dist.ReduceOp.MIN)

    def all_max(self, value: float) -> float:
        return self._reduce(value, self.dist.ReduceOp.MAX)

    def agree(self, ok: bool) -> bool:
        """True only when every rank is ok (so that all take the same branch afterwards)."""
        return self.all_min(1.0 if ok else 0.0) > 0.5

    def log(self, msg: str, all_ranks: bool = False) -> None:
        if all_ranks or self.is_main:
            print(f"[xdit r{self.rank}] {msg}", flush=True)

    def close(self) -> None:
        try:
            self.dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _short_exc(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 400 else text[:400] + " ..."


def _print_traceback(ctx: "DistContext", exc: BaseException) -> None:
    """Rank 0: the last frames of `exc` and its first 400 characters (enough to locate it, not a wall)."""
    if ctx.is_main:
        frames = traceback.TracebackException.from_exception(exc, limit=-6).stack.format()
        print("Traceback (last frames):\n" + "".join(frames) + _short_exc(exc), flush=True)


def _package_version(name: str) -> str | None:
    """Installed version, or the module's own __version__ when it is imported but has no metadata."""
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        pass
    if name not in sys.modules:
        return None
    found = getattr(sys.modules[name], "__version__", None)
    if isinstance(found, str):
        return found
    try:
        import importlib
        return getattr(importlib.import_module(f"{name}.__version__"), "__version__", None)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------- model parts

def build_transformer(cls, config: dict, ctx: DistContext, seed: int):
    """FLUX transformer of `config` with random weights, built directly on the device in the run dtype
    (seconds for 11.9 B parameters) and identical on every rank (same seed)."""
    torch = ctx.torch
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(ctx.dtype)
    try:
        with torch.device(ctx.device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=ctx.device, dtype=ctx.dtype).eval().requires_grad_(False)


def build_vae(config: dict, ctx: DistContext, seed: int):
    from diffusers import AutoencoderKL

    torch = ctx.torch
    torch.manual_seed(seed + 1)
    with torch.device(ctx.device):
        vae = AutoencoderKL(**config)
    return vae.to(device=ctx.device, dtype=ctx.dtype).eval().requires_grad_(False)


def latent_image_ids(width: int, height: int):
    import torch

    h, w = height // common.PATCH_PX, width // common.PATCH_PX
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def make_inputs(width: int, height: int, text_tokens: int, tcfg: dict, ctx: DistContext, seed: int) -> dict:
    """One request's transformer inputs, drawn on the device (fast, no host copy), identical on every
    rank (same seed, same generator type). The prompt embeddings stand in for CLIP/T5 outputs."""
    torch = ctx.torch
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    n = common.image_tokens(width, height)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=ctx.device, dtype=torch.float32).to(ctx.dtype)

    inputs = {
        "hidden_states": randn(1, n, tcfg["in_channels"]),
        "encoder_hidden_states": randn(1, text_tokens, tcfg["joint_attention_dim"]),
        "pooled_projections": randn(1, tcfg["pooled_projection_dim"]),
        "timestep": torch.ones(1, device=ctx.device, dtype=ctx.dtype),
        "img_ids": latent_image_ids(width, height).to(device=ctx.device, dtype=ctx.dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=ctx.device, dtype=ctx.dtype),
    }
    if tcfg.get("guidance_embeds"):
        inputs["guidance"] = torch.full((1,), common.DEFAULT_GUIDANCE, device=ctx.device, dtype=ctx.dtype)
    return inputs


def unpack_latents(latents, width: int, height: int):
    """FluxPipeline._unpack_latents: (1, tokens, 64) -> (1, 16, H/8, W/8)."""
    b, _, c = latents.shape
    h, w = height // common.VAE_SCALE_FACTOR, width // common.VAE_SCALE_FACTOR
    x = latents.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c // 4, h, w)


def _flux_blocks(model):
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def reference_forward(model, inputs: dict):
    """One-device diffusers forward of the same weights (diffusers' own FluxAttnProcessor, full sequence)."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxTransformer2DModel

    blocks = _flux_blocks(model)
    saved = [b.attn.processor for b in blocks]
    try:
        for b in blocks:
            b.attn.processor = FluxAttnProcessor()
        return FluxTransformer2DModel.forward(model, **inputs, return_dict=False)[0]
    finally:
        for b, p in zip(blocks, saved):
            b.attn.processor = p


class FluxXditBaselinePipelineStub:
    """What xfuser's DiTRuntimeState reads from a pipeline: `.transformer` and `.vae_scale_factor`.
    The class name starts with "Flux" so that xfuser applies FLUX's 2x2 packing (scale 16)."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.vae_scale_factor = common.VAE_SCALE_FACTOR


# ------------------------------------------------------------------------------------------- runners

class XfuserRunner:
    """xfuser 0.7.0's xFuserFlux1Transformer2DWrapper under xDiT's own runtime state and groups."""

    path = "xfuser"

    def __init__(self, args: argparse.Namespace, ctx: DistContext, tcfg: dict):
        self.ctx = ctx
        from xfuser.config import xFuserArgs
        from xfuser.core.distributed import (
            get_runtime_state,
            get_ring_parallel_world_size,
            get_sequence_parallel_world_size,
            get_ulysses_parallel_world_size,
            init_distributed_environment,
            initialize_runtime_state,
        )
        from xfuser.model_executor.models.transformers.transformer_flux import xFuserFlux1Transformer2DWrapper

        self._get_runtime_state = get_runtime_state
        self.version = _package_version("xfuser")
        init_distributed_environment(rank=ctx.rank, world_size=ctx.world_size, local_rank=ctx.local_rank,
                                     backend=ctx.backend)
        xargs = xFuserArgs(
            model="black-forest-labs/FLUX.1-dev",
            ulysses_degree=ctx.world_size,
            ring_degree=1,
            pipefusion_parallel_degree=1,
            height=1024,
            width=1024,
            num_inference_steps=50,
            max_sequence_length=args.text_tokens,
            attention_backend=args.attention_backend,
        )
        engine_config, _ = xargs.create_config()
        cls = xFuserFlux1Transformer2DWrapper
        # 0.7.0 calls self._pad_to_sp_divisible but defines pad_to_sp_divisible (only hit when the image
        # token count is not divisible by the degree).
        if not hasattr(cls, "_pad_to_sp_divisible") and hasattr(cls, "pad_to_sp_divisible"):
            cls._pad_to_sp_divisible = cls.pad_to_sp_divisible
        self.model = build_transformer(cls, tcfg, ctx, args.seed)
        initialize_runtime_state(FluxXditBaselinePipelineStub(self.model), engine_config)
        # As xfuser's FLUX.1 runner does before each pipeline call (no height/width: metadata only for PipeFusion).
        get_runtime_state().set_input_parameters(
            batch_size=1, num_inference_steps=50, max_condition_sequence_length=args.text_tokens,
            split_text_embed_in_sp=True)
        self.degree = get_sequence_parallel_world_size()
        self.detail = (f"xfuser {self.version} xFuserFlux1Transformer2DWrapper, SP degree {self.degree} = Ulysses "
                       f"{get_ulysses_parallel_world_size()} x ring {get_ring_parallel_world_size()}, "
                       f"PipeFusion 1, CFG parallel off")

    @property
    def attention(self) -> str:
        return self._get_runtime_state().attention_backend.name

    def attention_candidates(self) -> list[str]:
        first = self.attention
        return [first] + [b for b in XFUSER_FALLBACK_BACKENDS if b != first]

    def set_attention(self, name: str) -> None:
        self._get_runtime_state().set_attention_backend(name)

    def forward(self, inputs: dict):
        return self.model(**inputs, return_dict=False)[0]

    def reference_forward(self, inputs: dict):
        return reference_forward(self.model, inputs)

    def close(self) -> None:
        self.model = None


class UlyssesFluxAttnProcessor:
    """diffusers' FluxAttnProcessor (0.42) with the attention call replaced by yunchang's
    LongContextAttention: (B, S/N, H, D) sequence shards -> all-to-all -> attention -> all-to-all back."""

    def __init__(self, attention):
        import torch
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        self.attention = attention
        self._cat = torch.cat
        self._qkv = _get_qkv_projections
        self._rope = apply_rotary_emb

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = self._qkv(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = self._cat([encoder_query, query], dim=1)
            key = self._cat([encoder_key, key], dim=1)
            value = self._cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = self._rope(query, image_rotary_emb, sequence_dim=1)
            key = self._rope(key, image_rotary_emb, sequence_dim=1)
        out = self.attention(query.contiguous(), key.contiguous(), value.contiguous())
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            encoder_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            encoder_out = attn.to_add_out(encoder_out.contiguous())
            return out, encoder_out
        return out


class YunchangRunner:
    """Fallback: diffusers FluxTransformer2DModel + yunchang LongContextAttention (xDiT's Ulysses core)."""

    path = "yunchang"

    def __init__(self, args: argparse.Namespace, ctx: DistContext, tcfg: dict):
        import yunchang
        from diffusers import FluxTransformer2DModel
        from yunchang import LongContextAttention, set_seq_parallel_pg
        from yunchang.globals import PROCESS_GROUP
        from yunchang.kernels import AttnType

        self.ctx = ctx
        self.version = _package_version("yunchang") or getattr(yunchang, "__version__", None)
        if PROCESS_GROUP.ULYSSES_PG is None:
            set_seq_parallel_pg(ctx.world_size, 1, ctx.rank, ctx.world_size)
        self.group = PROCESS_GROUP.ULYSSES_PG
        self.degree = ctx.dist.get_world_size(self.group)
        self.group_rank = ctx.dist.get_rank(self.group)
        self._lca, self._attn_type = LongContextAttention, AttnType
        self.model = build_transformer(FluxTransformer2DModel, tcfg, ctx, args.seed)
        self._attention = args.yunchang_attn
        self.set_attention(self._attention)
        self.detail = (f"yunchang {self.version} LongContextAttention (Ulysses degree {self.degree}, ring 1) in "
                       f"diffusers FluxTransformer2DModel; fallback, not xfuser's own wrapper")

    @property
    def attention(self) -> str:
        return self._attention

    def attention_candidates(self) -> list[str]:
        return [self._attention] + [a for a in YUNCHANG_ATTN_TYPES if a != self._attention]

    def set_attention(self, name: str) -> None:
        attention = self._lca(ring_impl_type="basic", attn_type=self._attn_type.from_string(name))
        processor = UlyssesFluxAttnProcessor(attention)
        for block in _flux_blocks(self.model):
            block.attn.processor = processor
        self._attention = name

    def _shard(self, x, dim: int):
        if x.shape[dim] % self.degree:
            raise ValueError(f"sequence of {x.shape[dim]} tokens does not split into {self.degree} shards")
        return x.chunk(self.degree, dim=dim)[self.group_rank]

    def forward(self, inputs: dict):
        torch = self.ctx.torch
        local = dict(inputs)
        local["hidden_states"] = self._shard(inputs["hidden_states"], 1)
        local["encoder_hidden_states"] = self._shard(inputs["encoder_hidden_states"], 1)
        local["img_ids"] = self._shard(inputs["img_ids"], 0)
        local["txt_ids"] = self._shard(inputs["txt_ids"], 0)
        out = self.model(**local, return_dict=False)[0].contiguous()
        if self.degree == 1:
            return out
        b, n, c = out.shape
        gathered = torch.empty((self.degree * b, n, c), dtype=out.dtype, device=out.device)
        self.ctx.dist.all_gather_into_tensor(gathered, out, group=self.group)  # rank shards cat along dim 0
        return gathered.view(self.degree, b, n, c).permute(1, 0, 2, 3).reshape(b, self.degree * n, c)

    def reference_forward(self, inputs: dict):
        return reference_forward(self.model, inputs)

    def close(self) -> None:
        self.model = None


RUNNERS = {"xfuser": XfuserRunner, "yunchang": YunchangRunner}


def _free(ctx: DistContext) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        ctx.torch.cuda.empty_cache()


PROBE_SIZE = {"flux-dev": (256, 256), "tiny": (64, 64)}  # the first forward that decides the path


def select_runner(args: argparse.Namespace, ctx: DistContext, tcfg: dict):
    """Build the first path that imports, builds and runs one forward (at PROBE_SIZE, whatever sizes the
    run uses) on every rank; returns (runner, attempts) where attempts lists what failed and why."""
    probe_size = PROBE_SIZE[args.model]
    torch = ctx.torch
    order = ["xfuser", "yunchang"] if args.path == "auto" else [args.path]
    attempts: list[dict] = []
    probe = make_inputs(*probe_size, args.text_tokens, tcfg, ctx, seed=12345)
    for name in order:
        runner, error = None, None
        t = time.time()
        try:
            runner = RUNNERS[name](args, ctx, tcfg)
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next path
            error = _short_exc(exc)
            ctx.log(f"path {name}: build failed: {error}", all_ranks=True)
            _print_traceback(ctx, exc)
        if not ctx.agree(error is None):
            attempts.append({"path": name, "stage": "build", "error": error or "failed on another rank"})
            runner = None
            _free(ctx)
            continue
        ctx.log(f"path {name}: built in {time.time() - t:.1f} s ({runner.detail})")
        for backend in runner.attention_candidates():
            error = None
            try:
                if backend != runner.attention:
                    runner.set_attention(backend)
                with torch.no_grad():
                    out = runner.forward(probe)
                ctx.sync()
                if tuple(out.shape) != tuple(probe["hidden_states"].shape):
                    raise RuntimeError(f"output shape {tuple(out.shape)} != input {tuple(probe['hidden_states'].shape)}")
            except Exception as exc:  # noqa: BLE001
                error = _short_exc(exc)
                ctx.log(f"path {name}, attention {backend}: first forward failed: {error}", all_ranks=True)
                _print_traceback(ctx, exc)
            if ctx.agree(error is None):
                ctx.log(f"path {name}: first forward ok with attention {runner.attention}")
                return runner, attempts
            attempts.append({"path": name, "stage": f"forward[{backend}]", "error": error or "failed on another rank"})
        runner.close()
        runner = None
        _free(ctx)
    raise RuntimeError(f"no xDiT path worked: {json.dumps(attempts)}")


def run_meta(args: argparse.Namespace, ctx: DistContext, runner, attempts: list[dict]) -> dict:
    torch = ctx.torch
    gpu = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else platform.processor() or "cpu"
    return {
        "path": runner.path,
        "path_detail": runner.detail,
        "fallback_used": runner.path != "xfuser",
        "failed_attempts": attempts,
        "attention": runner.attention,
        "degree": runner.degree,
        "world_size": ctx.world_size,
        "model": args.model,
        "dtype": args.dtype,
        "text_tokens": args.text_tokens,
        "device": f"{ctx.world_size}x {gpu}",
        "torch": torch.__version__,
        "diffusers": _package_version("diffusers"),
        "xfuser": _package_version("xfuser"),
        "yunchang": _package_version("yunchang"),
        "env": {k: os.environ.get(k) for k in XDIT_ENV_VARS},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _print_fallback_note(args: argparse.Namespace, meta: dict, attempts: list[dict]) -> None:
    if not meta["fallback_used"]:
        return
    why = ("requested with --path yunchang" if args.path == "yunchang"
           else f"xfuser's own wrapper failed: {json.dumps(attempts)}")
    print(f"NOTE: FALLBACK PATH ({meta['path']}: yunchang's Ulysses in diffusers' FLUX, not xfuser's wrapper): {why}")


class JsonlWriter:
    """Rank 0 appends one JSON object per line and flushes, so a killed run keeps what it measured."""

    def __init__(self, path: str | None):
        self.f = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.f = open(path, "w", encoding="utf-8")

    def write(self, obj: dict) -> None:
        if self.f:
            self.f.write(json.dumps(obj) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


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
            "median_ms": common.median(samples_ms),
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
