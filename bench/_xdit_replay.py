"""The xDiT baseline's replay (bench/xdit_baseline.py serve): the trace clock (wall or virtual), the FCFS
one-request-at-a-time replay that rank 0 decides and broadcasts, its summary rows and table, and the
dry run that prints what a launch would do. No torch, no xfuser: tested on a CPU
(tests/test_bench_xdit.py)."""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict

import _xdit_common as common

ACTION_STOP, ACTION_RUN, ACTION_WAIT = 0, 1, 2   # rank 0's per-request decision in `serve`
KEEPALIVE_S = 30.0


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
    print("[dry-run] env: " + " ".join(f"{k}={os.environ.get(k)}" for k in common.XDIT_ENV_VARS))
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


