"""Serving overhead (issue 13): `POST /sdapi/v1/txt2img` through gunicorn vs the same generation called
directly on the diffusers pipeline, in the same run, plus cold-start figures.

    python -m bench.serving_overhead [--data DIR] [--repeats N] [--rounds R] [--sizes 64,256] [--steps 8]
                                     [--threads T] [--no-warm-start] [--server-env KEY=VALUE] [--out FILE.json]

Four ways to make the same image (demo-sd15, Euler, fixed seed, CFG 7, `--steps`), timed with
`perf_counter` around each call, after one untimed warm-up call per way and size:

* `direct`: the pipeline from `pipelines.loading.load_pipeline`, called directly with a scheduler built once
  by `build_scheduler(resolve_sampler("Euler"), ...)`: the baseline.
* `generate`: `pipelines.generate.generate()` on the service's cached pipeline (per-request pipeline object,
  scheduler and seeded noise; no HTTP, no PNG).
* `app`: `create_app(...).test_client()` in this process: Flask, pydantic validation, the service, infotext,
  PNG, base64 and JSON, but no socket and no gunicorn.
* `served`: the real server (`python -m handler.cli serve`, gunicorn) in a subprocess, called with `requests`;
  the time runs until the whole response body has arrived (JSON parsing is the client's, not timed).

The successive differences (`generate - direct`, `app - generate`, `served - app`) say which layer the
overhead lives in. Blocks of `--repeats` calls run in `--rounds` rounds whose order alternates
(direct, generate, app, served, then served, app, generate, direct, ...), so a linear drift of the machine
hits every way equally; each block's median is reported so drift stays visible. Only one of the ways runs at
any time (the server is idle while the in-process ways run). The bench process and the server use the same
number of torch threads (`--threads`, default torch's own default; passed to the server as OMP_NUM_THREADS).

Start-up: a fresh server with warm-up on (the default) is timed from `Popen` to /health answering and to
READY, then its first and second request are compared; it is then stopped. A fresh server with warm-up off
(SDFUNC_WARMUP__ON_START=false) is timed from `Popen` to /health answering and to the first 200 txt2img at the
smallest size, and its first request is compared with its second; this server then serves the overhead
measurement. The page cache is warm (the checkpoint was just written and read), so "cold" means a new
process, not a cold disk.

Diagnostics: `GET /health` through gunicorn and through the test client (the fixed cost of one HTTP
exchange), and the CPU seconds of each thread of the gunicorn worker (generation spread over several HTTP
threads shows as more than one busy thread plus its OpenMP helper).

Every figure is also given as a ratio to a baseline from the same run (served/direct, first/second request).
"""

from __future__ import annotations

import argparse
import base64
import inspect
import json
import logging
import statistics
import sys
import tempfile
import time
import typing
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.cli import add_output_arguments, parse_server_env, run_benchmark
from bench.harness.report import env_pairs, finish, machine_line, result_header, table, verdict
from bench.harness.server import (
    CFG_SCALE,
    MODEL,
    PROMPT,
    SAMPLER,
    SEED,
    TXT2IMG,
    Server,
    decode_first_image,
    ensure_data,
    max_pixel_diff,
    payload,
    post_txt2img,
    running_server,
)
from bench.harness.stats import DISTURBED_SPREAD, median, ms, spread

log = logging.getLogger("bench.serving_overhead")

MODES = ("direct", "generate", "app", "served")
TARGET_PCT = 5.0  # overhead at 256x256, percent of the direct latency
TARGET_PCT_SIZE = 256
TARGET_MS = 30.0  # overhead at every size, milliseconds


@dataclass
class BenchConfig:
    """What one run measures. The defaults finish in about 2.5 minutes on an idle 2-core CPU machine."""

    data: Path | None = None  # data root; demo-sd15 is written into a temp one when it has no checkpoint
    sizes: tuple[int, ...] = (64, 256)
    steps: int = 8
    repeats: int = 10  # timed calls per block (one block = one way, one size, one round)
    rounds: int = 4  # rounds of blocks, alternating order (ABCD DCBA ABCD DCBA)
    threads: int | None = None  # torch threads in both processes; None = torch's default here
    warm_start: bool = True  # also time a fresh server with warm-up on
    stage_repeats: int = 20  # repeats of each in-process stage micro-timing
    server_timeout: float = 240.0  # seconds a server may take to answer /health (and READY)
    server_env: tuple[tuple[str, str], ...] = ()  # extra environment for the servers (A/B of a setting)


# ---------------------------------------------------------------------------------------------------------
# cold start


def measure_start(server: Server, session, *, size: int, steps: int, timeout: float) -> dict[str, Any]:
    """Start `server`, then time /health, READY (warm-up on only), the first and the second request."""
    t0 = server.start()
    health_s, status = server.wait_health(session, until=None, timeout=timeout)
    log.info("server %s: /health answers after %.2f s (%s)", server.name, health_s, status)
    out: dict[str, Any] = {"warmup_on_start": server.warmup, "health_s": round(health_s, 3),
                           "health_status": status}
    if server.warmup:
        ready_s, _ = server.wait_health(session, until=("READY",), timeout=timeout)
        out["ready_s"] = round(ready_s, 3)
        log.info("server %s: READY after %.2f s", server.name, ready_s)
    body = payload(size, steps)
    first_ms, _ = post_txt2img(session, server.url, body)
    out["first_image_s"] = round(time.perf_counter() - t0, 3)
    second_ms, _ = post_txt2img(session, server.url, body)
    out.update(size=size, first_request_ms=first_ms, second_request_ms=second_ms,
               first_over_second=round(first_ms / second_ms, 2),
               first_image_over_second=round(out["first_image_s"] * 1000 / second_ms, 1))
    r = session.get(f"{server.url}/health", timeout=5)
    out["status_after_requests"] = r.json().get("status")
    log.info("server %s: first image %.2f s after start; first request %.0f ms, second %.0f ms",
             server.name, out["first_image_s"], first_ms, second_ms)
    return out


# ---------------------------------------------------------------------------------------------------------
# the four ways to make the image


Ways = dict[str, dict[int, Callable[[], Any]]]  # way -> size -> call (returns an image or a response)


def build_ways(cfg: BenchConfig, data: Path, checkpoint: Path, server: Server, session) -> tuple[Ways, Any, Any]:
    """Load the in-process pipelines and return the callables, plus (service's model, in-process client)."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    from handler.app import create_app
    from handler.settings import Settings
    from pipelines.cache import assemble_pipeline
    from pipelines.generate import ImageJob, generate
    from pipelines.loading import load_pipeline
    from pipelines.samplers import build_scheduler, resolve_sampler

    diffusers_logging.disable_progress_bar()
    settings = Settings(data_dir=data, warmup={"on_start": False}, log_json=False, default_checkpoint=MODEL,
                        log_level=logging.getLevelName(logging.getLogger().level))
    app = create_app(settings)
    logging.getLogger("handler").setLevel(logging.WARNING)  # no line per in-process request
    logging.getLogger("pipelines").setLevel(logging.WARNING)
    client = app.test_client()
    service = app.extensions["sdfunc"]
    # Every torch call of this process runs on the service's one device thread, as in the server: a second
    # thread running torch grows a second OpenMP pool, and on CPU the two make each other 2-3x slower.
    device = service.device

    def load_direct() -> Any:
        loaded = load_pipeline(checkpoint, device="cpu", dtype=torch.float32)
        scheduler = build_scheduler(resolve_sampler(SAMPLER), loaded.scheduler.config)
        return assemble_pipeline(type(loaded), loaded.components, scheduler=scheduler)

    direct_pipe = device.run(load_direct)
    model = device.run(service.cache.get, service.default_checkpoint(None))

    ways: Ways = {name: {} for name in MODES}
    for size in cfg.sizes:
        body = payload(size, cfg.steps)

        def call_direct(size: int) -> Any:
            with torch.inference_mode():
                return direct_pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=cfg.steps,
                                   guidance_scale=CFG_SCALE, width=size, height=size, output_type="pil",
                                   generator=torch.Generator("cpu").manual_seed(SEED)).images[0]

        def direct(size: int = size):
            return device.run(call_direct, size)

        def gen(size: int = size):
            job = ImageJob(mode="txt2img", prompt=PROMPT, negative_prompt="", seeds=[SEED], subseeds=[SEED],
                           subseed_strength=0.0, batch_size=1, steps=cfg.steps, cfg_scale=CFG_SCALE, width=size,
                           height=size, sampler=resolve_sampler(SAMPLER))
            return device.run(generate, model, job).images[0]

        def in_app(body: dict[str, Any] = body):
            r = client.post(TXT2IMG, json=body)
            if r.status_code != 200:
                raise RuntimeError(f"in-process {TXT2IMG} -> {r.status_code}: {r.get_data(as_text=True)[:500]}")
            return r

        def served(body: dict[str, Any] = body):
            r = session.post(server.url + TXT2IMG, json=body, timeout=600)
            if r.status_code != 200:
                raise RuntimeError(f"POST {TXT2IMG} -> {r.status_code}: {r.text[:500]}")
            return r

        ways["direct"][size] = direct
        ways["generate"][size] = gen
        ways["app"][size] = in_app
        ways["served"][size] = served
    return ways, model, client


def _as_image(result: Any):
    """The first image of whatever a way returned (PIL image, Flask response or requests response)."""
    if hasattr(result, "get_json"):
        return decode_first_image(result.get_json())
    if hasattr(result, "json"):
        return decode_first_image(result.json())
    return result


def run_blocks(cfg: BenchConfig, ways: Ways) -> tuple[dict[str, dict[int, list[list[float]]]], dict[int, int]]:
    """Warm every way once per size, then the timed blocks. Returns samples[mode][size] = one list per block,
    and, per size, the largest pixel difference between the direct image and any other way's."""
    import gc

    from handler.logs import set_request_id

    same: dict[int, int] = {}
    for size in cfg.sizes:
        images = {name: _as_image(ways[name][size]()) for name in MODES}  # untimed warm-up
        same[size] = max(max_pixel_diff(images["direct"], images[name]) for name in MODES)
        set_request_id("-")  # the in-process app bound its request id to this thread
        log.info("warm-up %dx%d done; largest pixel difference between the ways: %d", size, size, same[size])
    samples: dict[str, dict[int, list[list[float]]]] = {m: {s: [] for s in cfg.sizes} for m in MODES}
    for r in range(cfg.rounds):
        order = MODES if r % 2 == 0 else tuple(reversed(MODES))
        for name in order:
            for size in cfg.sizes:
                call = ways[name][size]
                gc.collect()
                block: list[float] = []
                for _ in range(cfg.repeats):
                    started = time.perf_counter()
                    call()
                    block.append(ms(time.perf_counter() - started))
                samples[name][size].append(block)
                set_request_id("-")
                log.info("round %d %-8s %4dx%-4d median %.1f ms", r + 1, name, size, size, statistics.median(block))
    return samples, same


# ---------------------------------------------------------------------------------------------------------
# where the overhead goes: in-process stage timings on the real objects


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `repeats` calls of `fn`, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def request_body_model(app: Any, path: str) -> Any:
    """The pydantic model the app validates the JSON body of `POST path` with. flask-openapi3 validates a view's
    `body` argument by its annotation, so the route's own signature names it; the bench takes it from the app
    (it does not import the handler's contract) and times the very validation the route runs."""
    endpoint = next(rule.endpoint for rule in app.url_map.iter_rules()
                    if rule.rule == path and "POST" in (rule.methods or ()))
    return typing.get_type_hints(inspect.unwrap(app.view_functions[endpoint]))["body"]


def stage_timings(cfg: BenchConfig, model: Any, client: Any, size: int) -> dict[str, float]:
    """Median milliseconds of each step the served path adds around the pipeline call, at `size`, timed on
    the objects of a real in-process response (its image, infotext and JSON body)."""
    import diffusers
    from flask import json as flask_json

    from pipelines.cache import assemble_pipeline
    from pipelines.infotext import png_bytes
    from pipelines.samplers import build_scheduler, resolve_sampler

    raw_request = json.dumps(payload(size, cfg.steps))
    r = client.post(TXT2IMG, data=raw_request, content_type="application/json")
    response = r.get_json()
    image = decode_first_image(response).convert("RGB")
    infotext = json.loads(response["info"])["infotexts"][0]
    png = png_bytes(image, infotext)
    base = model.pipe
    request_model = request_body_model(client.application, TXT2IMG)
    steps: dict[str, Callable[[], Any]] = {
        "validate_request": lambda: request_model.model_validate_json(raw_request),
        "build_scheduler": lambda: build_scheduler(resolve_sampler(SAMPLER), base.scheduler.config),
        "assemble_pipeline": lambda: assemble_pipeline(diffusers.StableDiffusionPipeline, base.components,
                                                       scheduler=base.scheduler),
        "png_encode": lambda: png_bytes(image, infotext),
        "base64": lambda: base64.b64encode(png).decode("ascii"),  # what the app's encode path does
        "json_response": lambda: flask_json.dumps(response),
    }
    out = {name: round(_median_seconds(fn, cfg.stage_repeats) * 1000.0, 4) for name, fn in steps.items()}
    out["png_bytes"] = len(png)
    out["response_bytes"] = len(r.get_data())
    return out


def http_floor(server: Server, session, client: Any, repeats: int) -> dict[str, float]:
    """Median ms of `GET /health` through gunicorn and through the in-process test client: the fixed cost
    of one HTTP exchange with no model work."""
    calls = (("served_health_ms", lambda: session.get(f"{server.url}/health", timeout=10)),
             ("app_health_ms", lambda: client.get("/health")))
    return {name: round(_median_seconds(call, repeats) * 1000.0, 3) for name, call in calls}


# ---------------------------------------------------------------------------------------------------------
# the whole run


def summarize(cfg: BenchConfig, samples: dict[str, dict[int, list[list[float]]]], same: dict[int, int],
              stages: dict[int, dict[str, float]]) -> dict[str, Any]:
    per_size: dict[str, Any] = {}
    for size in cfg.sizes:
        entry: dict[str, Any] = {}
        for name in MODES:
            blocks = samples[name][size]
            flat = [x for block in blocks for x in block]
            entry[name] = {"median_ms": median(flat), "block_medians_ms": [median(b) for b in blocks],
                           "min_ms": min(flat), "max_ms": max(flat), "samples_ms": flat}
        direct, served = entry["direct"]["median_ms"], entry["served"]["median_ms"]
        entry["overhead_ms"] = round(served - direct, 3)
        entry["overhead_pct"] = round((served / direct - 1.0) * 100.0, 2)
        entry["served_over_direct"] = round(served / direct, 4)
        layers = {"generate_minus_direct": entry["generate"]["median_ms"] - direct,
                  "app_minus_generate": entry["app"]["median_ms"] - entry["generate"]["median_ms"],
                  "served_minus_app": served - entry["app"]["median_ms"]}
        entry["layers_ms"] = {k: round(v, 3) for k, v in layers.items()}
        entry["stages_ms"] = stages.get(size, {})
        entry["stages_pct_of_direct"] = {k: round(v / direct * 100.0, 3) for k, v in stages.get(size, {}).items()
                                         if not k.endswith("_bytes")}
        entry["max_pixel_diff_vs_direct"] = same.get(size)
        per_size[str(size)] = entry
    spreads = {f"{size}/{name}": round(spread(e[name]["block_medians_ms"]), 3)
               for size, e in per_size.items() for name in MODES}
    worst = max(spreads, key=spreads.get)
    in_process = max(v for k, v in spreads.items() if not k.endswith("/served"))
    stability = {"block_spread": spreads, "worst": worst, "worst_spread": spreads[worst],
                 "in_process_worst_spread": in_process,
                 "disturbed": spreads[worst] > DISTURBED_SPREAD, "threshold": DISTURBED_SPREAD}
    if stability["disturbed"]:
        log.warning("block medians of %s differ by x%.2f (in-process ways at most x%.2f): %s", worst,
                    spreads[worst], in_process,
                    "the server's latency changed while the machine was steady" if in_process <= DISTURBED_SPREAD
                    else "the machine was busy; rerun (or try --threads 1 on a shared machine)")
    targets: dict[str, Any] = {"overhead_pct_max": TARGET_PCT, "overhead_pct_size": TARGET_PCT_SIZE,
                               "overhead_ms_max": TARGET_MS}
    pct_entry = per_size.get(str(TARGET_PCT_SIZE))
    targets["pct_pass"] = None if pct_entry is None else pct_entry["overhead_pct"] < TARGET_PCT
    targets["ms_pass"] = all(e["overhead_ms"] < TARGET_MS for e in per_size.values())
    targets["pass"] = bool(targets["ms_pass"] and targets["pct_pass"] is not False)
    return {"sizes": per_size, "targets": targets, "stability": stability}


def run(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Everything: cold starts, the overhead blocks, the stage timings. Returns the JSON-able result."""
    import requests
    import torch

    default_threads = torch.get_num_threads()
    threads = cfg.threads or default_threads
    torch.set_num_threads(threads)
    started = time.perf_counter()
    result: dict[str, Any] = {
        **result_header("serving_overhead", command, cfg, {"model": MODEL, "sampler": SAMPLER, "seed": SEED,
                        "cfg_scale": CFG_SCALE, "prompt": PROMPT, "threads": threads}, threads, default_threads),
        "issue": 13,
    }
    smallest = min(cfg.sizes)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdfunc-bench-")))
        data = Path(cfg.data).resolve() if cfg.data else work / "data"
        checkpoint = ensure_data(data)
        session = stack.enter_context(requests.Session())

        if cfg.warm_start:
            with running_server(data, work, warmup=True, threads=threads, name="warmup-on",
                                extra_env=cfg.server_env) as warm:
                result["warm_start"] = measure_start(warm, session, size=smallest, steps=cfg.steps,
                                                     timeout=cfg.server_timeout)
        server = stack.enter_context(running_server(data, work, warmup=False, threads=threads, name="warmup-off",
                                                    extra_env=cfg.server_env))
        result["cold_start"] = measure_start(server, session, size=smallest, steps=cfg.steps,
                                             timeout=cfg.server_timeout)

        ways, model, client = build_ways(cfg, data, checkpoint, server, session)
        samples, same = run_blocks(cfg, ways)
        result["server_worker_threads"] = server.worker_thread_cpu()
        result["http_floor"] = http_floor(server, session, client, cfg.stage_repeats * 2)
        stages = {size: stage_timings(cfg, model, client, size) for size in cfg.sizes}
        result["overhead"] = summarize(cfg, samples, same, stages)
    finish(result, time.perf_counter() - started)
    return result


# ---------------------------------------------------------------------------------------------------------
# report


def markdown(result: dict[str, Any]) -> str:
    """The tables RESULTS.md carries, from a result dict."""
    m, c = result["machine"], result["config"]
    sizes = result["overhead"]["sizes"]
    stab = result["overhead"]["stability"]
    lines = [
        machine_line(result, f"torch threads {m['torch_threads']} in both processes (torch default here: {m['torch_default_threads']})"),
        "",
        f"Command: `{result['command']}`",
        "",
        f"Model {c['model']} (random weights), sampler {c['sampler']}, {c['steps']} steps, CFG {c['cfg_scale']}, "
        f"seed {c['seed']}; {c['rounds']} rounds x {c['repeats']} calls per way and size "
        f"({c['rounds'] * c['repeats']} timed calls each); medians."
        + (" Server environment: " + env_pairs(c["server_env"]) + "." if c.get("server_env") else ""),
        "",
        *table(["size", "direct ms", "generate() ms", "app (test client) ms", "served (gunicorn) ms", "overhead ms",
                "overhead %", "served / direct"],
               ([f"{size}x{size}", f"{e['direct']['median_ms']:.1f}", f"{e['generate']['median_ms']:.1f}",
                 f"{e['app']['median_ms']:.1f}", f"{e['served']['median_ms']:.1f}", f"{e['overhead_ms']:+.1f}",
                 f"{e['overhead_pct']:+.2f}", f"{e['served_over_direct']:.3f}"] for size, e in sizes.items()),
               "lrrrrrrr"),
    ]
    t = result["overhead"]["targets"]
    pct = sizes.get(str(t["overhead_pct_size"]))
    worst_ms = max(e["overhead_ms"] for e in sizes.values())
    lines += [
        "",
        f"Targets: overhead < {t['overhead_pct_max']:g} % at {t['overhead_pct_size']}x{t['overhead_pct_size']}: "
        f"{verdict(t['pct_pass'])}" + (f" ({pct['overhead_pct']:+.2f} %)" if pct else "")
        + f"; overhead < {t['overhead_ms_max']:g} ms at every size: {verdict(t['ms_pass'])} "
        f"(largest {worst_ms:+.1f} ms).",
        "",
        "Block medians (ms, one per round) show the drift; slowest / fastest block of one way: "
        f"x{stab['worst_spread']:.2f} ({stab['worst']}); in-process ways at most x{stab['in_process_worst_spread']:.2f}"
        + (" - UNSTABLE" if stab["disturbed"] else "") + ":",
        "",
        *table(["size", "way", "block medians ms", "min", "max"],
               ([f"{size}x{size}", name, ", ".join(f"{x:.1f}" for x in e[name]["block_medians_ms"]),
                 f"{e[name]['min_ms']:.1f}", f"{e[name]['max_ms']:.1f}"] for size, e in sizes.items() for name in MODES),
               "lllrr"),
    ]
    stage_names = list(next(iter(sizes.values()))["stages_pct_of_direct"])
    lines += [
        "",
        "Where the overhead goes: layer differences of medians (noisy, can be negative), and single stages "
        "timed in-process on the real objects (median ms, and % of the direct latency):",
        "",
        *table(["size", "generate - direct", "app - generate", "served - app", *stage_names, "PNG bytes"],
               ([f"{size}x{size}", f"{e['layers_ms']['generate_minus_direct']:+.1f}",
                 f"{e['layers_ms']['app_minus_generate']:+.1f}", f"{e['layers_ms']['served_minus_app']:+.1f}",
                 *(f"{e['stages_ms'][k]:.2f} ({v:.2f} %)" for k, v in e["stages_pct_of_direct"].items()),
                 int(e["stages_ms"].get("png_bytes", 0))] for size, e in sizes.items()),
               "l" + "r" * (3 + len(stage_names) + 1)),
    ]
    diffs = {size: e["max_pixel_diff_vs_direct"] for size, e in sizes.items()}
    lines += ["", "Same image in every way (largest pixel difference vs direct, per size): "
              + ", ".join(f"{s}x{s}: {d}" for s, d in diffs.items()) + "."]
    floor = result.get("http_floor")
    if floor:
        lines += ["", f"HTTP floor (`GET /health`, median): {floor['served_health_ms']:.2f} ms through gunicorn, "
                  f"{floor['app_health_ms']:.2f} ms through the in-process test client."]
    threads = result.get("server_worker_threads")
    if threads is not None:
        lines += ["", f"Server worker threads that used > 0.5 s CPU during the run: {len(threads)} ("
                  + ", ".join(f"{t['cpu_s']:.0f} s" for t in threads) + ")."]

    starts = [(label, result[key]) for key, label in (("cold_start", "warm-up off"),
                                                      ("warm_start", "warm-up on (default)")) if result.get(key)]
    lines += [
        "",
        "Start-up (fresh `sdfunc serve` process; page cache warm):",
        "",
        *table(["server", "Popen -> /health answers", "Popen -> READY", "Popen -> first image", "first request ms",
                "second request ms", "first / second", "(Popen -> first image) / second"],
               ([f"{label}, {s['size']}x{s['size']}", f"{s['health_s']:.2f} s",
                 f"{s['ready_s']:.2f} s" if "ready_s" in s else "-", f"{s['first_image_s']:.2f} s",
                 f"{s['first_request_ms']:.0f}", f"{s['second_request_ms']:.0f}", f"{s['first_over_second']:.1f}",
                 f"{s['first_image_over_second']:.1f}"] for label, s in starts),
               "lrrrrrrr"),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None, str]:
    """(config, --out, --log-level) from the command line."""
    p = argparse.ArgumentParser(prog="python -m bench.serving_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="data root (demo-sd15 is written there if missing; default: a temp dir)")
    p.add_argument("--repeats", type=int, default=BenchConfig.repeats,
                   help="timed calls per block (default %(default)s)")
    p.add_argument("--rounds", type=int, default=BenchConfig.rounds,
                   help="rounds of blocks, order alternating (default %(default)s)")
    p.add_argument("--sizes", default=",".join(map(str, BenchConfig.sizes)), help="square sizes (default %(default)s)")
    p.add_argument("--steps", type=int, default=BenchConfig.steps, help="sampling steps (default %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads in the bench and the server (default: torch's default)")
    p.add_argument("--no-warm-start", action="store_true", help="skip the fresh server with warm-up on")
    add_output_arguments(p, markdown_file=False)
    a = p.parse_args(argv)
    try:
        sizes = tuple(int(s) for s in a.sizes.split(",") if s.strip())
    except ValueError:
        p.error("--sizes: comma-separated integers")
    if not sizes or any(s < 64 or s % 8 for s in sizes):
        p.error("--sizes: multiples of 8, at least 64")
    if a.repeats < 1 or a.rounds < 1 or a.steps < 1 or (a.threads is not None and a.threads < 1):
        p.error("--repeats, --rounds, --steps and --threads must be at least 1")
    server_env = parse_server_env(p, a.server_env)
    cfg = BenchConfig(data=a.data, sizes=sizes, steps=a.steps, repeats=a.repeats, rounds=a.rounds,
                      threads=a.threads, warm_start=not a.no_warm_start, server_env=server_env)
    return cfg, a.out, a.log_level


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg, out, log_level = parse_args(args)
    run_benchmark("bench.serving_overhead", args, lambda command: run(cfg, command), markdown, out=out,
                  markdown_path=None, log_level=log_level)
    return 0  # a missed target is a result, not a failure of the benchmark


if __name__ == "__main__":
    sys.exit(main())
