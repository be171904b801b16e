"""Metrics and request-log overhead: what do the Prometheus metrics and the per-request JSON log line cost
per request?

    python -m bench.metrics_overhead [--data DIR] [--rounds R] [--requests N] [--sizes 64@1:32,256@8] [--steps S]
                                     [--threads T] [--micro-batches B] [--micro-calls C]
                                     [--server-env KEY=VALUE] [--out FILE.json] [--markdown FILE]

Target: the two together cost under 2 % of the request latency, at the smallest request (64x64, 1 step: the
worst case, since the cost per request is fixed).

Method, in two parts:

1. Served A/B. Two real servers (`python -m handler.cli serve`, gunicorn, 127.0.0.1 only, demo-sd15), both
   started and warmed (untimed requests at every size) before any timing: `on` with the defaults (metrics
   and request log on; the log goes to a file) and `off` (SDFUNC_METRICS=false SDFUNC_REQUEST_LOG=false).
   For `--rounds` rounds, per size, a block of N identical txt2img requests (Euler, fixed seed, CFG 7;
   N from `SIZE@STEPS:N` in `--sizes`, else `--requests`; the cheap smallest size gets more, as its
   relative noise is the largest) goes to one server, then the same block to the other; which server goes
   first alternates between rounds, so a drift of the machine weighs on both alike, and only one server works
   at any time. Per size: medians and p95 of both, overhead = median(on) - median(off) in ms and %, on/off,
   a 95 % bootstrap interval of the overhead %, and each round's on/off ratio of block medians (its spread
   is the noise).
   Afterwards `/metrics` is scraped once on `on`: `sdfunc_requests_total` for txt2img must equal the
   txt2img requests sent to it and `sdfunc_requests_in_flight` must be 1 (the scrape itself), `on`'s log
   must hold one request-log line per txt2img request and `off`'s none, and `off` must answer `/metrics`
   with 404. A failed check is an error (exit status 1).
2. In-process micro timing, the precise number behind the noisy one: an app from
   `create_app(Settings(...))` on the same data, two real txt2img requests through its test client (the
   second, warm one's request-log fields fill the `RequestMeter` used below; the pipeline stays in the
   cache), then the median time of what `on` does per request and `off` does not:
   `metrics.request_started()` + `metrics.observe(meter)` and `metering.log_request(meter,
   with_prompts=False)` through the production JSON log handler writing to os.devnull; plus one `/metrics`
   render with the loaded cache (per scrape, not per request). The per-request cost is given in
   microseconds and in % of each size's served median (`off`).

Verdict: the in-process figure (as % of the smallest size's served median) decides; the served A/B, whose
noise at 64x64 is about +-2 %, overrules it only when its interval lies wholly above the target (a cost the
in-process timing would miss). The exit status is 0 whether or not the target is met (the report says PASS
or FAIL), 1 when a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, NamedTuple

from bench.cli import add_output_arguments, machine_line, parse_server_env, result_header, run_benchmark
from bench.serving_overhead import (
    CFG_SCALE,
    DISTURBED_SPREAD,
    MODEL,
    PROMPT,
    SAMPLER,
    SEED,
    TXT2IMG,
    Server,
    ensure_data,
    payload,
    post_txt2img,
    running_server,
)

log = logging.getLogger("bench.metrics_overhead")

TARGET_PCT = 2.0  # metrics + request log, percent of the request latency
SERVERS = ("on", "off")
OFF_ENV = (("SDFUNC_METRICS", "false"), ("SDFUNC_REQUEST_LOG", "false"))
REQUEST_LOGGER = "sdfunc.request"  # handler.records.metering's request log
BOOTSTRAP_RESAMPLES = 2000
MAX_OUTLIER_SHARE = 0.1  # blocks of one server and size beyond x DISTURBED_SPREAD of their median: unstable above


class Shape(NamedTuple):
    """One kind of request: a square size, its steps, and the timed requests per block."""

    size: int
    steps: int
    requests: int


@dataclass
class BenchConfig:
    """What one run measures. The defaults finish in about 3.5 minutes on an idle 2-core CPU machine."""

    data: Path | None = None  # data root; demo-sd15 is written into a temp one when it has no checkpoint
    # One block = one server, one size, one round. 64x64@1 is the worst case and cheap: it gets more requests.
    shapes: tuple[Shape, ...] = (Shape(64, 1, 32), Shape(256, 8, 8))
    rounds: int = 20  # rounds of blocks; which server goes first alternates
    warmup_requests: int = 3  # untimed requests per server and size before the rounds
    threads: int | None = None  # torch threads in the servers and the bench; None = torch's default here
    micro_batches: int = 20  # batches of in-process timings (median over batches)
    micro_calls: int = 1000  # calls per batch (per request part); the render runs micro_calls // 50
    server_timeout: float = 240.0  # seconds a server may take to answer /health
    server_env: tuple[tuple[str, str], ...] = ()  # extra environment for both servers


# ---------------------------------------------------------------------------------------------------------
# small helpers


def _summary(samples: list[float]) -> dict[str, Any]:
    """Median, p95, min and max of milliseconds (p95 by linear interpolation; a lone sample is its own p95)."""
    p95 = statistics.quantiles(samples, n=20, method="inclusive")[18] if len(samples) > 1 else samples[0]
    return {"median_ms": round(statistics.median(samples), 3), "p95_ms": round(p95, 3),
            "min_ms": round(min(samples), 3), "max_ms": round(max(samples), 3)}


def bootstrap_pct_interval(on: list[float], off: list[float], *, resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = 0) -> tuple[float, float]:
    """95 % interval of (median(on) / median(off) - 1) * 100 by resampling each side (samples treated as
    independent: process-level differences between the two servers are not in it)."""
    rng = random.Random(seed)
    pcts = sorted((statistics.median(rng.choices(on, k=len(on))) / statistics.median(rng.choices(off, k=len(off)))
                   - 1.0) * 100.0 for _ in range(resamples))
    return round(pcts[int(0.025 * (resamples - 1))], 2), round(pcts[int(0.975 * (resamples - 1))], 2)


def _time_per_call(fn: Callable[[], Any], *, batches: int, calls: int) -> float:
    """Median over `batches` of the mean seconds per call of `calls` back-to-back calls, after one call."""
    fn()
    per_call = []
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - started) / calls)
    return statistics.median(per_call)


@contextmanager
def production_logging(level: str) -> Iterator[None]:
    """The root logger as in the server (handler.logs' JSON handler alone, at `level`), writing to os.devnull
    instead of stderr; the previous handlers and level come back afterwards."""
    from handler.logs import configure_logging

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    with open(os.devnull, "w") as null:
        root.handlers = []
        with contextlib.redirect_stderr(null):
            configure_logging(level, as_json=True)  # binds sys.stderr, i.e. the null stream
        try:
            yield
        finally:
            root.handlers = saved_handlers
            root.setLevel(saved_level)


class _FieldsCapture(logging.Handler):
    """Keeps the structured fields of the request-log lines it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            self.fields.append(dict(fields))


# ---------------------------------------------------------------------------------------------------------
# part 1: the two servers


def _prime(session, server: Server) -> None:
    """An untimed `GET /health`, so that a block does not start by reopening a keep-alive connection."""
    session.get(f"{server.url}/health", timeout=10).raise_for_status()


def run_rounds(cfg: BenchConfig, servers: dict[str, Server],
               sessions: dict[str, Any]) -> tuple[dict[str, dict[int, list[list[float]]]], list[list[str]], int]:
    """Warm both servers at every size, then the timed blocks. Returns samples[server][size] (one list per
    block), the server order of each round, and the number of txt2img requests sent to `on`."""
    sent_on = 0
    for size, steps, _ in cfg.shapes:
        for name in SERVERS:
            for _ in range(cfg.warmup_requests):
                post_txt2img(sessions[name], servers[name].url, payload(size, steps))
                if name == "on":
                    sent_on += 1
        log.info("warm-up %dx%d@%d done on both servers", size, size, steps)
    samples: dict[str, dict[int, list[list[float]]]] = {n: {s.size: [] for s in cfg.shapes} for n in SERVERS}
    orders: list[list[str]] = []
    for r in range(cfg.rounds):
        order = list(SERVERS) if r % 2 == 0 else list(reversed(SERVERS))
        orders.append(order)
        for size, steps, requests in cfg.shapes:
            body = payload(size, steps)
            for name in order:
                session, server = sessions[name], servers[name]
                gc.collect()
                _prime(session, server)
                block = [post_txt2img(session, server.url, body)[0] for _ in range(requests)]
                sent_on += len(block) if name == "on" else 0
                samples[name][size].append(block)
                log.info("round %d %-3s %4dx%-4d @%-2d median %.1f ms", r + 1, name, size, size, steps,
                         statistics.median(block))
    return samples, orders, sent_on


def scrape(session, server: Server) -> tuple[dict[str, float], float | None]:
    """From one scrape of `server`'s /metrics: `sdfunc_requests_total` for POST txt2img by status, and
    `sdfunc_requests_in_flight` (the scrape itself is the one request in flight)."""
    from prometheus_client.parser import text_string_to_metric_families

    r = session.get(f"{server.url}/metrics", timeout=30)
    r.raise_for_status()
    by_status: dict[str, float] = {}
    in_flight = None
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if (sample.name == "sdfunc_requests_total" and sample.labels.get("route") == TXT2IMG
                    and sample.labels.get("method") == "POST"):
                by_status[sample.labels.get("status", "?")] = sample.value
            elif sample.name == "sdfunc_requests_in_flight":
                in_flight = sample.value
    return by_status, in_flight


def count_request_log_lines(path: Path) -> int:
    """Request-log lines (JSON, logger sdfunc.request) for POST txt2img in a server's log file."""
    count = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == REQUEST_LOGGER and entry.get("route") == TXT2IMG and entry.get("method") == "POST":
            count += 1
    return count


def summarize_served(cfg: BenchConfig, samples: dict[str, dict[int, list[list[float]]]]) -> dict[str, Any]:
    """Per size: both servers' figures, the overhead, its interval, and the per-round ratios."""
    sizes: dict[str, Any] = {}
    for size, steps, requests in cfg.shapes:
        entry: dict[str, Any] = {"steps": steps, "requests_per_block": requests}
        flat = {}
        for name in SERVERS:
            blocks = samples[name][size]
            flat[name] = [x for block in blocks for x in block]
            entry[name] = {**_summary(flat[name]),
                           "block_medians_ms": [round(statistics.median(b), 3) for b in blocks],
                           "samples_ms": flat[name]}
        on, off = entry["on"]["median_ms"], entry["off"]["median_ms"]
        entry["overhead_ms"] = round(on - off, 3)
        entry["overhead_pct"] = round((on / off - 1.0) * 100.0, 2)
        entry["on_over_off"] = round(on / off, 4)
        entry["overhead_pct_interval"] = list(bootstrap_pct_interval(flat["on"], flat["off"]))
        entry["round_ratios"] = [round(a / b, 4) for a, b in zip(entry["on"]["block_medians_ms"],
                                                                  entry["off"]["block_medians_ms"], strict=True)]
        entry["round_ratio_median"] = round(statistics.median(entry["round_ratios"]), 4)
        entry["pass"] = entry["overhead_pct"] < TARGET_PCT
        # Conclusive only when the whole interval lies on one side of the target.
        low, high = entry["overhead_pct_interval"]
        entry["conclusive"] = high < TARGET_PCT or low >= TARGET_PCT
        sizes[str(size)] = entry
    spreads, outliers = {}, {}
    for size, e in sizes.items():
        for name in SERVERS:
            blocks = e[name]["block_medians_ms"]
            middle = statistics.median(blocks)
            spreads[f"{size}/{name}"] = round(max(blocks) / min(blocks), 3)
            outliers[f"{size}/{name}"] = sum(1 for b in blocks if not middle / DISTURBED_SPREAD <= b <= middle
                                             * DISTURBED_SPREAD)
    worst = max(spreads, key=spreads.get)
    # One slow block among many barely moves the medians; a run is unstable when many blocks were disturbed.
    disturbed = [k for k, n in outliers.items() if n > MAX_OUTLIER_SHARE * cfg.rounds]
    stability = {"block_spread": spreads, "worst": worst, "worst_spread": spreads[worst],
                 "outlier_blocks": outliers, "threshold": DISTURBED_SPREAD, "max_outlier_share": MAX_OUTLIER_SHARE,
                 "disturbed": bool(disturbed)}
    if disturbed:
        log.warning("more than %d %% of the blocks of %s lie beyond x%.2f of their median: the machine was busy; "
                    "rerun on a quiet machine (or with --threads 1)", MAX_OUTLIER_SHARE * 100, ", ".join(disturbed),
                    DISTURBED_SPREAD)
    return {"sizes": sizes, "stability": stability}


# ---------------------------------------------------------------------------------------------------------
# part 2: in-process micro timing


def micro_timings(cfg: BenchConfig, data: Path) -> dict[str, Any]:
    """Microseconds per request of the metrics and the request log, and milliseconds per /metrics render,
    on an in-process app whose cache holds demo-sd15 and whose meter comes from a real txt2img."""
    from diffusers.utils import logging as diffusers_logging

    from handler.app import create_app
    from handler.settings import Settings

    diffusers_logging.disable_progress_bar()
    # The server's default level (the request log is INFO), whatever the bench logs at.
    settings = Settings(data_dir=data, warmup={"on_start": False}, log_json=False, default_checkpoint=MODEL,
                        metrics=True, request_log=True, log_level="INFO")
    with quiet_app_loggers():
        app = create_app(settings)
        return _micro_on_app(cfg, app)


@contextmanager
def quiet_app_loggers() -> Iterator[None]:
    """No service or pipeline lines from the in-process app, and the root level as it was afterwards
    (create_app sets it)."""
    root, names = logging.getLogger(), ("handler", "pipelines")
    saved = root.level, {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)


def _micro_on_app(cfg: BenchConfig, app: Any) -> dict[str, Any]:
    """`micro_timings` on a built app."""
    from handler.logs import set_request_id
    from handler.records import metering

    service = app.extensions["sdfunc"]
    client = app.test_client()

    size, steps, _ = min(cfg.shapes)
    capture = _FieldsCapture()
    request_logger = logging.getLogger(REQUEST_LOGGER)
    request_logger.addHandler(capture)
    try:
        for _ in range(2):  # the second one is a warm request (no model load), like the served ones
            r = client.post(TXT2IMG, json=payload(size, steps))
    finally:
        request_logger.removeHandler(capture)
        set_request_id("-")
    if r.status_code != 200 or not capture.fields:
        raise RuntimeError(f"in-process {TXT2IMG} -> {r.status_code}, {len(capture.fields)} request-log line(s)")
    fields = capture.fields[-1]
    names = {f.name for f in dataclass_fields(metering.RequestMeter)}
    meter = metering.RequestMeter(**{k: v for k, v in fields.items() if k in names})
    log.info("in-process meter from a real %dx%d@%d txt2img: generation %.1f ms, total %.1f ms", size, size, steps,
             (meter.generation_seconds or 0) * 1000, (meter.total_seconds or 0) * 1000)

    metrics = service.metrics

    def metrics_part() -> None:
        metrics.request_started()
        metrics.observe(meter)

    def log_part() -> None:
        metering.log_request(meter, with_prompts=False)

    def fields_part() -> None:
        meter.fields(with_prompts=False)

    def both() -> None:
        metrics_part()
        log_part()

    batches, calls = cfg.micro_batches, cfg.micro_calls
    render_calls = max(1, calls // 50)
    with production_logging("INFO"):
        seconds = {name: _time_per_call(fn, batches=batches, calls=calls)
                   for name, fn in (("metrics", metrics_part), ("request_log", log_part),
                                    ("request_log_fields", fields_part), ("both", both))}
        render_s = _time_per_call(metrics.render, batches=batches, calls=render_calls)
    body, _ = metrics.render()
    text = body.decode()
    out = {
        "per_request_us": {k: round(v * 1e6, 2) for k, v in seconds.items()},
        "render_ms": round(render_s * 1000, 3),
        "render_bytes": len(body),
        "render_series": sum(1 for line in text.splitlines() if line and not line.startswith("#")),
        "batches": batches, "calls_per_batch": calls, "render_calls_per_batch": render_calls,
        "meter": fields,
    }
    log.info("in-process: metrics %.1f us, request log %.1f us, both %.1f us per request; /metrics render %.2f ms",
             *(out["per_request_us"][k] for k in ("metrics", "request_log", "both")), out["render_ms"])
    return out


# ---------------------------------------------------------------------------------------------------------
# the whole run


def run(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Both parts and the checks. Returns the JSON-able result."""
    import requests
    import torch

    default_threads = torch.get_num_threads()
    threads = cfg.threads or default_threads
    torch.set_num_threads(threads)
    started = time.perf_counter()
    result: dict[str, Any] = result_header(
        "metrics_overhead", command, cfg, {"model": MODEL, "sampler": SAMPLER, "seed": SEED, "cfg_scale": CFG_SCALE,
                                            "prompt": PROMPT, "threads": threads,
                                            "off_env": [list(p) for p in OFF_ENV]}, threads, default_threads)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdfunc-bench-")))
        data = Path(cfg.data).resolve() if cfg.data else work / "data"
        ensure_data(data)
        with ExitStack() as serving:
            servers = {
                "on": serving.enter_context(running_server(data, work, warmup=False, threads=threads, name="on",
                                                           extra_env=cfg.server_env)),
                "off": serving.enter_context(running_server(data, work, warmup=False, threads=threads, name="off",
                                                            extra_env=cfg.server_env + OFF_ENV)),
            }
            sessions = {name: serving.enter_context(requests.Session()) for name in SERVERS}
            for server in servers.values():
                server.start()
            for name, server in servers.items():
                health_s, status = server.wait_health(sessions[name], until=None, timeout=cfg.server_timeout)
                log.info("server %s answers /health after %.1f s (%s)", name, health_s, status)
            samples, orders, sent_on = run_rounds(cfg, servers, sessions)
            result["served"] = summarize_served(cfg, samples)
            result["served"]["round_orders"] = orders
            scraped, in_flight = scrape(sessions["on"], servers["on"])
            off_metrics = sessions["off"].get(f"{servers['off'].url}/metrics", timeout=30).status_code
            log_lines = {name: count_request_log_lines(server.log_path) for name, server in servers.items()}
        # both servers are stopped here; the in-process part runs on a quiet machine
        result["micro"] = micro_timings(cfg, data)

    total = sum(scraped.values())
    checks = {
        "requests_total": {"sent": sent_on, "scraped": total, "by_status": scraped, "ok": total == sent_on},
        "request_log_lines": {"on": log_lines["on"], "off": log_lines["off"],
                              "ok": log_lines["on"] == sent_on and log_lines["off"] == 0},
        "in_flight_at_scrape": {"value": in_flight, "ok": in_flight == 1},
        "off_metrics_status": {"status": off_metrics, "ok": off_metrics == 404},
    }
    checks["ok"] = all(c["ok"] for c in checks.values())
    for name, check in checks.items():
        if isinstance(check, dict) and not check["ok"]:
            log.error("check %s failed: %s", name, check)
    result["checks"] = checks

    sizes = result["served"]["sizes"]
    per_request_us = result["micro"]["per_request_us"]["both"]
    result["micro"]["pct_of_served_off_median"] = {
        size: round(per_request_us / (e["off"]["median_ms"] * 1000.0) * 100.0, 4) for size, e in sizes.items()}
    smallest = str(min(s.size for s in cfg.shapes))
    micro_pct = result["micro"]["pct_of_served_off_median"][smallest]
    result["targets"] = {
        "overhead_pct_max": TARGET_PCT, "smallest_size": int(smallest),
        "served_pass": {size: e["pass"] for size, e in sizes.items()},
        "served_clearly_above": {size: e["overhead_pct_interval"][0] >= TARGET_PCT for size, e in sizes.items()},
        "micro_pct_of_smallest": micro_pct, "micro_pass": micro_pct < TARGET_PCT,
    }
    # The precise in-process figure decides; the served A/B can only overrule it when its interval lies
    # wholly above the target (a cost the in-process timing does not see), not by its noise.
    result["targets"]["pass"] = bool(result["targets"]["micro_pass"]
                                     and not any(result["targets"]["served_clearly_above"].values()))
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


# ---------------------------------------------------------------------------------------------------------
# report


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _served_verdict(entry: dict[str, Any]) -> str:
    """PASS/FAIL of the median, and whether the interval reaches across the target."""
    return _verdict(entry["pass"]) + ("" if entry["conclusive"] else " (within noise)")


def markdown(result: dict[str, Any]) -> str:
    """The section RESULTS.md carries, from a result dict."""
    m, c = result["machine"], result["config"]
    served, micro, checks, targets = result["served"], result["micro"], result["checks"], result["targets"]
    sizes, stab = served["sizes"], served["stability"]
    lines = [
        machine_line(result, f"torch threads {m['torch_threads']} (torch default here: {m['torch_default_threads']})"),
        "",
        f"Command: `{result['command']}`",
        "",
        f"**Result: {_verdict(targets['pass'])}** (target: metrics + request log < {targets['overhead_pct_max']:g} % "
        f"of the request latency). In-process: {micro['per_request_us']['both']:.1f} µs per request = "
        f"{targets['micro_pct_of_smallest']:.3f} % of the {targets['smallest_size']}x{targets['smallest_size']} "
        f"request: {_verdict(targets['micro_pass'])}. Served A/B: "
        + "; ".join(f"{s}x{s}@{e['steps']} {e['overhead_pct']:+.2f} % ({e['overhead_pct_interval'][0]:+.2f} .. "
                    f"{e['overhead_pct_interval'][1]:+.2f}): {_served_verdict(e)}" for s, e in sizes.items())
        + ". The in-process figure decides; the served A/B would overrule it only with an interval wholly above "
        f"{targets['overhead_pct_max']:g} %"
        + (" - and it does at " + ", ".join(s for s, v in targets["served_clearly_above"].items() if v)
           if any(targets["served_clearly_above"].values()) else "") + ".",
        "",
        f"Served A/B: model {c['model']} (random weights), sampler {c['sampler']}, CFG {c['cfg_scale']}, seed "
        f"{c['seed']}; `on` = defaults (metrics, request log to a file), `off` = "
        + " ".join(f"`{k}={v}`" for k, v in c["off_env"])
        + f"; {c['rounds']} rounds, each with a block of N requests per size to each server (first server "
        f"alternating; N and the total timed per server in the table), after {c['warmup_requests']} untimed "
        "requests per server and size."
        + (" Both servers: " + ", ".join(f"`{k}={v}`" for k, v in c["server_env"]) + "."
           if c.get("server_env") else ""),
        "",
        "| size | steps | N x rounds | on median ms | off median ms | overhead ms | overhead % | 95 % interval % "
        "| on / off | on p95 ms | off p95 ms | < 2 % |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for size, e in sizes.items():
        lo, hi = e["overhead_pct_interval"]
        lines.append(
            f"| {size}x{size} | {e['steps']} | {e['requests_per_block']} x {c['rounds']} "
            f"| {e['on']['median_ms']:.1f} | {e['off']['median_ms']:.1f} "
            f"| {e['overhead_ms']:+.2f} | {e['overhead_pct']:+.2f} | {lo:+.2f} .. {hi:+.2f} | {e['on_over_off']:.4f} "
            f"| {e['on']['p95_ms']:.1f} | {e['off']['p95_ms']:.1f} | {_served_verdict(e)} |")
    lines += [
        "",
        "The interval is a 95 % bootstrap over single requests (it leaves out any steady difference between the two "
        "processes); the per-round on/off ratios of block medians show the noise between rounds (median "
        + ", ".join(f"{s}x{s}: {e['round_ratio_median']:.3f}" for s, e in sizes.items())
        + f"). Slowest / fastest block of one server: x{stab['worst_spread']:.2f} ({stab['worst']}); blocks beyond "
        f"x{stab['threshold']:g} of their series' median: {sum(stab['outlier_blocks'].values())} of "
        f"{len(stab['outlier_blocks']) * c['rounds']}"
        + (" (they are in the figures above: medians barely move, p95s can)"
           if any(stab["outlier_blocks"].values()) else "")
        + (" - UNSTABLE, rerun on a quiet machine" if stab["disturbed"] else "") + ".",
        "",
        "| size | on/off per round | on block medians ms | off block medians ms |",
        "|---|---|---|---|",
    ]
    for size, e in sizes.items():
        lines.append(f"| {size}x{size} | {', '.join(f'{x:.3f}' for x in e['round_ratios'])} "
                     f"| {', '.join(f'{x:.1f}' for x in e['on']['block_medians_ms'])} "
                     f"| {', '.join(f'{x:.1f}' for x in e['off']['block_medians_ms'])} |")
    pct_cols = list(micro["pct_of_served_off_median"])
    labels = {"metrics": "metrics (`request_started` + `observe`)",
              "request_log": "request log line (`log_request`, JSON to os.devnull)",
              "request_log_fields": "of which `meter.fields()`",
              "both": "both: what `on` adds per request"}
    lines += [
        "",
        f"In-process, per request (median of {micro['batches']} batches of {micro['calls_per_batch']} calls), "
        "and as % of each size's served median (`off`):",
        "",
        "| part | µs per request | " + " | ".join(f"% of {s}x{s} ({sizes[s]['off']['median_ms']:.1f} ms)"
                                              for s in pct_cols) + " |",
        "|---|---:|" + "---:|" * len(pct_cols),
    ]
    for key, label in labels.items():
        us = micro["per_request_us"][key]
        lines.append(f"| {label} | {us:.1f} | "
                     + " | ".join(f"{us / (sizes[s]['off']['median_ms'] * 1000.0) * 100.0:.3f}" for s in pct_cols)
                     + " |")
    lines += [
        "",
        f"`/metrics` render with demo-sd15 in the cache: {micro['render_ms']:.2f} ms per scrape "
        f"({micro['render_bytes']} bytes, {micro['render_series']} series); per scrape, not per request.",
        "",
        "Checks (a failed one makes the exit status 1): " + "; ".join(_check_lines(checks)) + ".",
    ]
    return "\n".join(lines) + "\n"


def _check_lines(checks: dict[str, Any]) -> list[str]:
    """One phrase per check, ending in OK or in what was expected."""
    total, lines, in_flight, off = (checks["requests_total"], checks["request_log_lines"],
                                    checks["in_flight_at_scrape"], checks["off_metrics_status"])
    return [
        f"`sdfunc_requests_total{{route=\"{TXT2IMG}\"}}` on `on` = {total['scraped']:g}, txt2img requests sent to "
        f"it = {total['sent']}: {'OK' if total['ok'] else 'MISMATCH'}",
        f"request-log lines for txt2img: `on` {lines['on']}, `off` {lines['off']}: "
        f"{'OK' if lines['ok'] else 'expected one per request on `on`, none on `off`'}",
        f"`sdfunc_requests_in_flight` during the scrape: "
        f"{'missing' if in_flight['value'] is None else format(in_flight['value'], 'g')} "
        f"({'OK' if in_flight['ok'] else 'expected 1, the scrape itself'})",
        f"`GET /metrics` on `off`: {off['status']} ({'OK' if off['ok'] else 'expected 404'})",
    ]


def _parse_shapes(text: str, default_steps: int, default_requests: int) -> tuple[Shape, ...]:
    """`SIZE[@STEPS][:N]` items, comma-separated: `64@1:32,256@8`; the defaults fill what an item leaves out."""
    shapes = []
    for item in text.split(","):
        if not item.strip():
            continue
        head, _, requests = item.strip().partition(":")
        size, _, steps = head.partition("@")
        shapes.append(Shape(int(size), int(steps) if steps else default_steps,
                            int(requests) if requests else default_requests))
    return tuple(shapes)


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None, Path | None, str]:
    """(config, --out, --markdown, --log-level) from the command line."""
    p = argparse.ArgumentParser(prog="python -m bench.metrics_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="data root (demo-sd15 is written there if missing; default: a temp dir)")
    p.add_argument("--rounds", type=int, default=BenchConfig.rounds,
                   help="rounds of blocks, first server alternating (default %(default)s)")
    p.add_argument("--requests", type=int, default=8,
                   help="timed requests per block for sizes given without :N (default %(default)s)")
    p.add_argument("--sizes", default="64@1:32,256@8",
                   help="square sizes as SIZE[@STEPS][:N] (N timed requests per block; default %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="steps for sizes given without @STEPS (default %(default)s)")
    p.add_argument("--warmup-requests", type=int, default=BenchConfig.warmup_requests,
                   help="untimed requests per server and size before the rounds (default %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads in the servers and the bench (default: torch's default)")
    p.add_argument("--micro-batches", type=int, default=BenchConfig.micro_batches,
                   help="batches of in-process timings (default %(default)s)")
    p.add_argument("--micro-calls", type=int, default=BenchConfig.micro_calls,
                   help="calls per in-process batch (default %(default)s)")
    add_output_arguments(p)
    a = p.parse_args(argv)
    try:
        shapes = _parse_shapes(a.sizes, a.steps, a.requests)
    except ValueError:
        p.error("--sizes: comma-separated SIZE[@STEPS][:N] integers")
    if (not shapes or any(s.size < 64 or s.size % 8 or s.steps < 1 or s.requests < 1 for s in shapes)
            or len({s.size for s in shapes}) != len(shapes)):
        p.error("--sizes: distinct multiples of 8, at least 64, with at least 1 step and 1 request")
    if min(a.rounds, a.requests, a.steps, a.micro_batches, a.micro_calls) < 1 or a.warmup_requests < 1 or (
            a.threads is not None and a.threads < 1):
        p.error("--rounds, --requests, --steps, --warmup-requests, --threads and --micro-* must be at least 1")
    server_env = parse_server_env(p, a.server_env)
    cfg = BenchConfig(data=a.data, shapes=shapes, rounds=a.rounds,
                      warmup_requests=a.warmup_requests, threads=a.threads, micro_batches=a.micro_batches,
                      micro_calls=a.micro_calls, server_env=server_env)
    return cfg, a.out, a.markdown, a.log_level


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg, out, markdown_path, log_level = parse_args(args)
    result = run_benchmark("bench.metrics_overhead", args, lambda command: run(cfg, command), markdown, out=out,
                           markdown_path=markdown_path, log_level=log_level)
    return 0 if result["checks"]["ok"] else 1  # a missed target is a result; a failed check is an error


if __name__ == "__main__":
    sys.exit(main())
