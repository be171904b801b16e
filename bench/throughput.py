"""Throughput with dynamic batching (issue 6): images per second and latency at concurrency 1, 2, 4, 8, with
batching off and on, served by the same code on the same data in the same run.

    python -m bench.throughput [--data DIR] [--sizes 64@4:32,256@8:16] [--concurrency 1,2,4,8] [--rounds R]
                               [--batch-max-size 8] [--batch-max-wait-ms 20] [--threads T]
                               [--server-env KEY=VALUE] [--out FILE.json] [--markdown FILE]

Method:

* Two real servers (`python -m handler.cli serve`, gunicorn, 127.0.0.1 only, demo-sd15, random weights), on the
  same data root, each with its own SQLite records database: `off` (`SDFUNC_BATCH__MAX_SIZE=1`, the baseline)
  and `on` (`SDFUNC_BATCH__MAX_SIZE=--batch-max-size`, `SDFUNC_BATCH__MAX_WAIT_MS=--batch-max-wait-ms`). Both
  get `SDFUNC_QUEUE__MAX_WAITING` = the highest concurrency (nothing is shed: a 429 is an error, counted and
  reported), and warm up at start on the benchmark's shapes (`SDFUNC_WARMUP__SHAPES`); the run waits for
  both to say READY. They are both up, but only one of them is ever under load (2 cores).
* Per size, before timing, a burst of as many concurrent requests as the highest concurrency goes to `off`
  and then to `on` (seeds S, S+1, ...), then one request with seed S alone to `on`. This is an untimed
  warm-up at the largest batch, and the correctness check: every image of `on` (batched, and alone) must
  equal `off`'s image of the same seed within 2/255 (largest absolute pixel difference reported; a batch may
  differ from single images by 1/255, batching off must give 0).
* A cell = one server, one size (`SIZE@STEPS:N`), one concurrency c: a closed loop of c client threads, each
  with its own `requests.Session`, that send N txt2img requests in all (Euler, CFG 7, the same prompt, batch
  size 1, a distinct seed per request), each thread sending its next request when its previous answer has
  arrived. Timed: each request from send to the whole body (latency), and the cell from the release of the
  threads to the last answer (wall). images/s = images returned / wall.
* `--rounds` rounds of every (size, c) cell on both servers; which server goes first alternates between
  cells and between rounds (off/on, on/off, ...), so a drift of the machine weighs on both alike.
* Each cell also records the share of the machine's CPU that other processes used meanwhile (from /proc; the
  idle server counts as another process). On 2 cores a competing CPU-bound process slows generation 10-100x:
  a cell above 10 %, or `off` cells of one (size, c) whose rounds differ by more than x1.25, mark the run
  UNSTABLE.

Per (size, c): images/s of both (all rounds pooled: images / wall), on/off (the figure; its baseline is
`off` at the same size and concurrency in the same run), each round's on/off, p50 and p95 latency of both,
errors. Billing: the sum of `parameters.billing.billed_ms` per server and cell, per image, and as a share of
the cell's wall time. The device runs one job at a time, so a server's billed time can not exceed its wall
time when a batch's time is split between its requests; more than the wall time means a batch was billed
to each of its requests in full (a failed check).

The exit status is 1 when a check failed (an error or 429, an image that differs by more than 2/255, billed
time beyond the wall time), else 0: no throughput target is set, the figures are for the record.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.cli import (
    OTHERS_MAX,
    Shape,
    add_output_arguments,
    cpu_snapshot,
    others_share,
    parse_server_env,
    parse_shapes,
    run_benchmark,
    shapes_valid,
)
from bench.harness.load import closed_loop
from bench.harness.report import env_pairs, finish, machine_line, num, result_header, table
from bench.harness.server import (
    CFG_SCALE,
    MODEL,
    PROMPT,
    SAMPLER,
    SEED,
    TXT2IMG,
    Server,
    ensure_data,
    max_pixel_diff,
    payload,
    running_server,
)
from bench.harness.stats import DISTURBED_SPREAD, spread, summary

log = logging.getLogger("bench.throughput")

SERVERS = ("off", "on")  # off is the baseline
MAX_PIXEL_DIFF = 2  # /255: batched vs single images of the same seed
BILLED_SLACK = 1.02  # billed time may exceed the wall time by rounding only (1 ms per request, plus this factor)
ERROR_SAMPLES = 5  # error texts kept per cell


@dataclass
class BenchConfig:
    """What one run measures. The defaults take about 3 minutes on an idle 2-core CPU machine."""

    data: Path | None = None  # data root; demo-sd15 is written into a temp one when it has no checkpoint
    # One cell = one server, one size, one concurrency: N requests in all from c client threads.
    shapes: tuple[Shape, ...] = (Shape(64, 4, 32), Shape(256, 8, 16))
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    rounds: int = 2  # rounds of every cell on both servers; which server goes first alternates
    batch_max_size: int = 8  # SDFUNC_BATCH__MAX_SIZE of `on` (`off` has 1)
    batch_max_wait_ms: float = 20.0  # SDFUNC_BATCH__MAX_WAIT_MS of `on`
    check_seed: int = SEED  # the correctness check's seeds: check_seed, check_seed + 1, ...
    threads: int | None = None  # torch threads in the servers; None = torch's default here
    request_timeout: float = 600.0  # seconds the client waits for one answer
    server_timeout: float = 240.0  # seconds a server may take to say READY (warm-up included)
    server_env: tuple[tuple[str, str], ...] = ()  # extra environment for both servers

    @property
    def max_concurrency(self) -> int:
        return max(self.concurrency)


# ---------------------------------------------------------------------------------------------------------
# the servers


def server_envs(cfg: BenchConfig, work: Path) -> dict[str, tuple[tuple[str, str], ...]]:
    """Each server's environment: the common part, then `--server-env`, then what makes it `off` or `on` (last,
    so that the A/B stays one)."""
    shapes = json.dumps([f"{s.size}x{s.size}@{s.steps}" for s in cfg.shapes])
    envs = {}
    for name in SERVERS:
        common = (("SDFUNC_QUEUE__MAX_WAITING", str(cfg.max_concurrency)), ("SDFUNC_WARMUP__SHAPES", shapes),
                  ("SDFUNC_DATABASE_URL", f"sqlite:///{work / f'records-{name}.sqlite3'}"))
        batch = ((("SDFUNC_BATCH__MAX_SIZE", "1"),) if name == "off" else
                 (("SDFUNC_BATCH__MAX_SIZE", str(cfg.batch_max_size)),
                  ("SDFUNC_BATCH__MAX_WAIT_MS", f"{cfg.batch_max_wait_ms:g}")))
        envs[name] = common + tuple(cfg.server_env) + batch
    return envs


# ---------------------------------------------------------------------------------------------------------
# one closed loop


@dataclass
class Answer:
    """One request's outcome."""

    seed: int
    latency_ms: float
    status: int | None  # None: no HTTP answer (connection error, timeout)
    images: int = 0
    billed_ms: int = 0
    generation_ms: float = 0.0
    device: str | None = None
    pngs: list[bytes] | None = None  # kept for the correctness check only
    error: str | None = None


def _post(session, url: str, body: dict[str, Any], timeout: float, keep_images: bool) -> Answer:
    """One txt2img; never raises for a failed request (it is an Answer with an error)."""
    import requests

    started = time.perf_counter()
    try:
        r = session.post(url + TXT2IMG, json=body, timeout=timeout)
        latency = (time.perf_counter() - started) * 1000.0
    except requests.RequestException as exc:
        return Answer(body["seed"], (time.perf_counter() - started) * 1000.0, None, error=f"{type(exc).__name__}: {exc}")
    answer = Answer(body["seed"], round(latency, 3), r.status_code)
    if r.status_code != 200:
        answer.error = f"{r.status_code}: {r.text[:300]}"
        return answer
    try:
        data = r.json()
        images = data.get("images") or []
        billing = (data.get("parameters") or {}).get("billing") or {}
        answer.images = len(images)
        answer.billed_ms = int(billing.get("billed_ms", 0))
        answer.generation_ms = float(billing.get("generation_ms", 0.0))
        answer.device = billing.get("device")
        if keep_images:
            answer.pngs = [base64.b64decode(x) for x in images]
    except (ValueError, TypeError, AttributeError) as exc:
        answer.error = f"bad 200 body: {type(exc).__name__}: {exc}"
    return answer


def run_closed_loop(sessions: list, url: str, body: dict[str, Any], *, requests_total: int, seeds: list[int],
                    timeout: float, keep_images: bool = False) -> tuple[float, list[Answer]]:
    """`bench.harness.load.closed_loop` over txt2img (request i with seed `seeds[i]`). Returns (wall seconds from
    the threads' release to the last answer, the answers in order of i)."""
    started, answers = closed_loop(
        sessions, lambda session, i: _post(session, url, {**body, "seed": seeds[i]}, timeout, keep_images),
        requests_total)
    return time.perf_counter() - started, answers


def _prime(sessions: list, server: Server) -> None:
    """An untimed `GET /health` on every session: no cell starts by reopening keep-alive connections."""
    for session in sessions:
        session.get(f"{server.url}/health", timeout=10).raise_for_status()


def cell_record(server: str, shape: Shape, c: int, round_index: int, wall_s: float,
                answers: list[Answer]) -> dict[str, Any]:
    """What one cell measured, JSON-able."""
    ok = [a for a in answers if a.error is None]
    errors = [a for a in answers if a.error is not None]
    statuses: dict[str, int] = {}
    for a in answers:
        key = str(a.status) if a.status is not None else "no-answer"
        statuses[key] = statuses.get(key, 0) + 1
    images = sum(a.images for a in ok)
    billed = sum(a.billed_ms for a in ok)
    return {
        "server": server, "size": shape.size, "steps": shape.steps, "concurrency": c, "round": round_index,
        "requests": len(answers), "images": images, "wall_s": round(wall_s, 4),
        "images_per_s": round(images / wall_s, 4) if wall_s > 0 else 0.0,
        "errors": len(errors), "status_429": statuses.get("429", 0), "statuses": statuses,
        "error_samples": [a.error for a in errors[:ERROR_SAMPLES]],
        "billed_ms": billed, "generation_ms": round(sum(a.generation_ms for a in ok), 3),
        "billed_share_of_wall": round(billed / (wall_s * 1000.0), 4) if wall_s > 0 else None,
        "samples_ms": [a.latency_ms for a in ok],
        "devices": sorted({a.device for a in ok if a.device}),
    }


# ---------------------------------------------------------------------------------------------------------
# correctness


def pixel_check(cfg: BenchConfig, servers: dict[str, Server], sessions: dict[str, list]) -> dict[str, Any]:
    """Per size: a burst of `max_concurrency` concurrent requests (seeds check_seed + i) to `off`, then to
    `on` (batched there, once batching works), then seed check_seed alone to `on`; the largest pixel difference
    of each `on` image from `off`'s image of the same seed. Also the servers' untimed warm-up at the largest
    batch."""
    from PIL import Image

    def decode(png: bytes):
        image = Image.open(io.BytesIO(png))
        image.load()
        return image

    burst = cfg.max_concurrency
    seeds = [cfg.check_seed + i for i in range(burst)]
    out: dict[str, Any] = {"seeds": seeds, "max_allowed": MAX_PIXEL_DIFF, "sizes": {}}
    for shape in cfg.shapes:
        body = payload(shape.size, shape.steps)
        images: dict[str, dict[int, Any]] = {}
        errors: list[str] = []
        for name in SERVERS:
            _prime(sessions[name][:burst], servers[name])
            _, answers = run_closed_loop(sessions[name][:burst], servers[name].url, body, requests_total=burst,
                                     seeds=seeds, timeout=cfg.request_timeout, keep_images=True)
            images[name] = {a.seed: decode(a.pngs[0]) for a in answers if a.error is None and a.pngs}
            errors += [f"{name}: {a.error}" for a in answers if a.error is not None]
        alone = _post(sessions["on"][0], servers["on"].url, {**body, "seed": seeds[0]}, cfg.request_timeout, True)
        if alone.error is not None or not alone.pngs:
            errors.append(f"on alone: {alone.error or 'no image'}")
        burst_diffs = {seed: max_pixel_diff(images["on"][seed], images["off"][seed]) for seed in seeds
                       if seed in images["on"] and seed in images["off"]}
        alone_diff = (max_pixel_diff(decode(alone.pngs[0]), images["off"][seeds[0]])
                      if alone.pngs and seeds[0] in images["off"] else None)
        complete = len(burst_diffs) == burst and alone_diff is not None and not errors
        worst = max([*burst_diffs.values(), *([alone_diff] if alone_diff is not None else [])], default=None)
        entry = {"steps": shape.steps, "burst": burst, "max_diff_burst": max(burst_diffs.values(), default=None),
                 "max_diff_alone": alone_diff, "max_diff": worst, "diffs_by_seed": burst_diffs, "errors": errors,
                 "ok": complete and worst is not None and worst <= MAX_PIXEL_DIFF}
        out["sizes"][str(shape.size)] = entry
        log.info("check %dx%d: largest pixel difference on vs off %s (burst of %d: %s, alone: %s)%s", shape.size,
                 shape.size, worst, burst, entry["max_diff_burst"], alone_diff, "" if entry["ok"] else " - FAILED")
    out["ok"] = all(e["ok"] for e in out["sizes"].values())
    return out


# ---------------------------------------------------------------------------------------------------------
# the cells


def run_cells(cfg: BenchConfig, servers: dict[str, Server], sessions: dict[str, list]) -> list[dict[str, Any]]:
    """Every (round, size, concurrency) cell on both servers, one server at a time, first server alternating."""
    cells: list[dict[str, Any]] = []
    seed = cfg.check_seed + 1000  # distinct seeds for every timed request, away from the check's
    k = 0
    for r in range(cfg.rounds):
        for shape in cfg.shapes:
            body = payload(shape.size, shape.steps)
            for c in cfg.concurrency:
                order = SERVERS if (r + k) % 2 == 0 else tuple(reversed(SERVERS))
                k += 1
                for name in order:
                    seeds = list(range(seed, seed + shape.requests))
                    seed += shape.requests
                    _prime(sessions[name][:c], servers[name])
                    pgid = servers[name].proc.pid if servers[name].proc is not None else None
                    cpu_before = cpu_snapshot(pgid)  # the server under load and this process; the rest is others
                    wall, answers = run_closed_loop(sessions[name][:c], servers[name].url, body,
                                                requests_total=shape.requests, seeds=seeds,
                                                timeout=cfg.request_timeout)
                    cell = cell_record(name, shape, c, r, wall, answers)
                    cell["others_cpu_share"] = others_share(cpu_before, cpu_snapshot(pgid))
                    cells.append(cell)
                    p50 = statistics.median(cell["samples_ms"]) if cell["samples_ms"] else float("nan")
                    others = cell["others_cpu_share"]
                    log.info("round %d %-3s %4dx%-4d c=%d: %6.2f images/s, p50 %7.1f ms%s%s", r + 1, name, shape.size,
                             shape.size, c, cell["images_per_s"], p50,
                             f", {cell['errors']} error(s): {cell['error_samples'][:1]}" if cell["errors"] else "",
                             f" - other processes used {others:.0%} of the CPU" if others and others > OTHERS_MAX
                             else "")
    return cells


def summarize(cfg: BenchConfig, cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per size and concurrency: both servers' pooled figures, on/off, per-round ratios; stability."""
    sizes: dict[str, Any] = {}
    spreads: dict[str, float] = {}
    for shape in cfg.shapes:
        by_c: dict[str, Any] = {}
        for c in cfg.concurrency:
            entry: dict[str, Any] = {}
            for name in SERVERS:
                mine = [x for x in cells if x["server"] == name and x["size"] == shape.size and x["concurrency"] == c]
                wall = sum(x["wall_s"] for x in mine)
                images = sum(x["images"] for x in mine)
                samples = [s for x in mine for s in x["samples_ms"]]
                billed = sum(x["billed_ms"] for x in mine)
                per_round = [x["images_per_s"] for x in mine]
                entry[name] = {
                    "images_per_s": round(images / wall, 4) if wall > 0 else 0.0,
                    "images": images, "requests": sum(x["requests"] for x in mine), "wall_s": round(wall, 4),
                    **({"p50_ms": summary(samples)["median_ms"], "p95_ms": summary(samples)["p95_ms"],
                        "min_ms": min(samples), "max_ms": max(samples)} if samples else
                       {"p50_ms": None, "p95_ms": None, "min_ms": None, "max_ms": None}),
                    "errors": sum(x["errors"] for x in mine), "status_429": sum(x["status_429"] for x in mine),
                    "billed_ms": billed, "billed_ms_per_image": round(billed / images, 2) if images else None,
                    "billed_share_of_wall": round(billed / (wall * 1000.0), 4) if wall > 0 else None,
                    "round_images_per_s": per_round,
                    "round_others_cpu_share": [x.get("others_cpu_share") for x in mine],
                }
                if len(per_round) > 1 and min(per_round) > 0:
                    spreads[f"{shape.size}/c{c}/{name}"] = round(spread(per_round), 3)
            off, on = entry["off"]["images_per_s"], entry["on"]["images_per_s"]
            entry["on_over_off"] = round(on / off, 4) if off > 0 else None
            offs, ons = entry["off"]["round_images_per_s"], entry["on"]["round_images_per_s"]
            entry["round_ratios"] = [round(b / a, 4) if a > 0 else None for a, b in zip(offs, ons, strict=True)]
            p50_off, p50_on = entry["off"]["p50_ms"], entry["on"]["p50_ms"]
            entry["p50_on_over_off"] = round(p50_on / p50_off, 4) if p50_off and p50_on else None
            by_c[str(c)] = entry
        sizes[str(shape.size)] = {"steps": shape.steps, "requests_per_cell": shape.requests, "concurrency": by_c}
    busy_cells = [f"{x['size']}/c{x['concurrency']}/{x['server']}/round {x['round'] + 1}" for x in cells
                  if x.get("others_cpu_share") is not None and x["others_cpu_share"] > OTHERS_MAX]
    stability: dict[str, Any] = {"round_spread": spreads, "threshold": DISTURBED_SPREAD, "others_max": OTHERS_MAX,
                                 "busy_cells": busy_cells, "disturbed": bool(busy_cells)}
    if busy_cells:
        log.warning("other processes used more than %.0f %% of the CPU during %d cell(s) (%s): rerun on a quiet "
                    "machine", OTHERS_MAX * 100, len(busy_cells), ", ".join(busy_cells))
    if spreads:
        worst = max(spreads, key=spreads.get)
        stability.update(worst=worst, worst_spread=spreads[worst])
        # `off` does the same work in every round; its rounds disagreeing means the machine changed.
        off_disturbed = [k for k, v in spreads.items() if k.endswith("/off") and v > DISTURBED_SPREAD]
        stability["disturbed"] = bool(off_disturbed or busy_cells)
        if off_disturbed:
            log.warning("images/s of %s differ between rounds by more than x%.2f: the machine was busy; rerun on a "
                        "quiet machine (or with --threads 1)", ", ".join(off_disturbed), DISTURBED_SPREAD)
    return {"sizes": sizes, "stability": stability}


def billing_summary(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per server: billed ms, images, wall, and per cell whether billed time stayed within the wall time (the
    device runs one job at a time: more means a batch was billed in full to each of its requests)."""
    out: dict[str, Any] = {}
    for name in SERVERS:
        mine = [x for x in cells if x["server"] == name]
        billed = sum(x["billed_ms"] for x in mine)
        images = sum(x["images"] for x in mine)
        wall_ms = sum(x["wall_s"] for x in mine) * 1000.0
        beyond = [{"size": x["size"], "concurrency": x["concurrency"], "round": x["round"],
                   "billed_ms": x["billed_ms"], "wall_ms": round(x["wall_s"] * 1000.0, 1)}
                  for x in mine if x["billed_ms"] > x["wall_s"] * 1000.0 * BILLED_SLACK + x["requests"]]
        out[name] = {"billed_ms": billed, "generation_ms": round(sum(x["generation_ms"] for x in mine), 1),
                     "images": images, "wall_ms": round(wall_ms, 1),
                     "billed_ms_per_image": round(billed / images, 2) if images else None,
                     "billed_share_of_wall": round(billed / wall_ms, 4) if wall_ms else None,
                     "cells_beyond_wall": beyond}
    return out


# ---------------------------------------------------------------------------------------------------------
# the whole run


def run(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Servers up and warm, the correctness check, the cells, the checks. Returns the JSON-able result."""
    import requests
    import torch

    default_threads = torch.get_num_threads()
    threads = cfg.threads or default_threads
    started = time.perf_counter()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdfunc-bench-")))
        envs = server_envs(cfg, work)
        result: dict[str, Any] = {
            **result_header("throughput", command, cfg, {
                "model": MODEL, "sampler": SAMPLER, "cfg_scale": CFG_SCALE, "prompt": PROMPT, "threads": threads,
                "server_envs": {name: [list(p) for p in env if p[0] != "SDFUNC_DATABASE_URL"]
                                for name, env in envs.items()}}, threads, default_threads),
            "issue": 6,
        }
        data = Path(cfg.data).resolve() if cfg.data else work / "data"
        ensure_data(data)
        servers = {name: stack.enter_context(running_server(data, work, warmup=True, threads=threads, name=name,
                                                            extra_env=envs[name])) for name in SERVERS}
        sessions = {name: [stack.enter_context(requests.Session()) for _ in range(cfg.max_concurrency)]
                    for name in SERVERS}
        for server in servers.values():
            server.start()
        for name, server in servers.items():
            ready_s, _ = server.wait_health(sessions[name][0], until=("READY",), timeout=cfg.server_timeout)
            log.info("server %s READY after %.1f s (warm-up %s)", name, ready_s, dict(envs[name])["SDFUNC_WARMUP__SHAPES"])
        result["check"] = pixel_check(cfg, servers, sessions)
        cells = run_cells(cfg, servers, sessions)
    result["cells"] = cells
    result["summary"] = summarize(cfg, cells)
    result["billing"] = billing_summary(cells)
    devices = sorted({d for x in cells for d in x["devices"]})
    result["served_device"] = devices
    if devices and all(d != "cpu" for d in devices):
        result["machine"]["device"] = "cuda"  # machine_info assumes a CPU; the servers said otherwise
        result["machine"]["gpu"] = ", ".join(devices)
    errors = sum(x["errors"] for x in cells)
    checks = {
        "errors": {"count": errors, "status_429": sum(x["status_429"] for x in cells), "ok": errors == 0},
        "pixels": {"max_diff": max((e["max_diff"] for e in result["check"]["sizes"].values()
                                    if e["max_diff"] is not None), default=None),
                   "max_allowed": MAX_PIXEL_DIFF, "ok": result["check"]["ok"]},
        "billed_within_wall": {"cells_beyond": {n: len(b["cells_beyond_wall"]) for n, b in result["billing"].items()},
                               "ok": not any(b["cells_beyond_wall"] for b in result["billing"].values())},
    }
    checks["ok"] = all(c["ok"] for c in checks.values())
    for name, check in checks.items():
        if isinstance(check, dict) and not check["ok"]:
            log.error("check %s failed: %s", name, check)
    result["checks"] = checks
    finish(result, time.perf_counter() - started)
    return result


# ---------------------------------------------------------------------------------------------------------
# report


def _cell_row(size: str, s: dict[str, Any], conc: str, e: dict[str, Any], rounds: int) -> list[Any]:
    """One (size, concurrency) of the main table: images/s of both servers, on / off, latency, errors."""
    off, on = e["off"], e["on"]
    errors = f"{off['errors']} / {on['errors']}" + (f" ({off['status_429']} / {on['status_429']} x 429)"
                                                    if off["status_429"] or on["status_429"] else "")
    return [f"{size}x{size}", s["steps"], conc, f"{s['requests_per_cell']} x {rounds}", f"{off['images_per_s']:.2f}",
            f"{on['images_per_s']:.2f}", f"**{num(e['on_over_off'], 3)}**", num(off["p50_ms"], 1),
            num(on["p50_ms"], 1), num(off["p95_ms"], 1), num(on["p95_ms"], 1), errors]


def _round_row(size: str, conc: str, e: dict[str, Any]) -> list[Any]:
    """One (size, concurrency) per round: on / off, both servers' images/s, other processes' CPU share."""
    others = {name: ", ".join("?" if v is None else f"{v * 100:.0f}" for v in e[name]["round_others_cpu_share"])
              for name in SERVERS}
    return [f"{size}x{size}", conc, ", ".join(num(x, 3) for x in e["round_ratios"]),
            ", ".join(f"{x:.2f}" for x in e["off"]["round_images_per_s"]),
            ", ".join(f"{x:.2f}" for x in e["on"]["round_images_per_s"]), f"{others['off']}; {others['on']}"]


def markdown(result: dict[str, Any]) -> str:
    """The section RESULTS.md carries, from a result dict."""
    m, c = result["machine"], result["config"]
    sizes, stab = result["summary"]["sizes"], result["summary"]["stability"]
    envs = c["server_envs"]

    def env_text(name: str) -> str:
        return env_pairs(((k, v) for k, v in envs[name] if k.startswith("SDFUNC_BATCH__")), " ")

    common = env_pairs((k, v) for k, v in envs["off"] if not k.startswith("SDFUNC_BATCH__"))
    lines = [
        machine_line(result, f"torch threads {m['torch_threads']} (torch default here: {m['torch_default_threads']})"),
        "",
        f"Command: `{result['command']}`",
        "",
        f"Model {c['model']} (random weights), sampler {c['sampler']}, CFG {c['cfg_scale']}, one image per request, "
        f"a distinct seed per request; `off` = {env_text('off')} (baseline), `on` = {env_text('on')}; both "
        + common + ". Per cell, N requests from c client threads in a closed loop; "
        f"{c['rounds']} round(s) of every cell, first server alternating; images/s = images / wall time, all rounds "
        "pooled; latency from send to the whole body."
        + (f" Served on: {', '.join(result['served_device'])}." if result.get("served_device") else ""),
        "",
        *table(["size", "steps", "c", "N x rounds", "off images/s", "on images/s", "on / off", "off p50 ms", "on p50 ms",
                "off p95 ms", "on p95 ms", "errors off / on"],
               (_cell_row(size, s, conc, e, c["rounds"]) for size, s in sizes.items()
                for conc, e in s["concurrency"].items()),
               "lrrrrrrrrrrl"),
    ]
    lines += [
        "",
        "Per round (on / off of images/s, and both servers' images/s; `off` does the same work every round, so "
        "its spread is the machine's noise"
        + (f"; largest spread between rounds x{stab['worst_spread']:.2f} ({stab['worst']})" if stab.get("worst") else "")
        + (f"; cells during which other processes used over {stab['others_max'] * 100:.0f} % of the CPU: "
           f"{len(stab['busy_cells'])}" if stab.get("busy_cells") else "")
        + (" - UNSTABLE, rerun on a quiet machine" if stab["disturbed"] else "") + "):",
        "",
        *table(["size", "c", "on / off per round", "off images/s per round", "on images/s per round",
                "other processes' CPU % per round, off; on"],
               (_round_row(size, conc, e) for size, s in sizes.items() for conc, e in s["concurrency"].items()),
               "lrllll"),
    ]
    check = result["check"]
    lines += [
        "",
        f"Same pixels: a burst of {next(iter(check['sizes'].values()))['burst']} concurrent requests (seeds "
        f"{check['seeds'][0]}..{check['seeds'][-1]}) to each server, and seed {check['seeds'][0]} alone to `on`; "
        "largest pixel difference of `on` from `off` (per size: burst, alone; allowed "
        f"{check['max_allowed']}/255): "
        + "; ".join(f"{s}x{s}: {num(e['max_diff_burst'], 0)}, {num(e['max_diff_alone'], 0)}"
                    + ("" if e["ok"] else " FAILED" + (f" ({e['errors'][0]})" if e["errors"] else ""))
                    for s, e in check["sizes"].items()) + ".",
        "",
        "Billing (sum of `parameters.billing.billed_ms` over the timed requests; the device runs one job at a time, "
        "so the billed time of a server stays within its wall time unless a batch is billed in full to each of "
        "its requests):",
        "",
        *table(["server", "images", "billed ms", "billed ms per image", "wall ms", "billed / wall",
                "cells with billed > wall"],
               ([name, b["images"], b["billed_ms"], num(b["billed_ms_per_image"], 1), f"{b['wall_ms']:.0f}",
                 num(b["billed_share_of_wall"], 3), len(b["cells_beyond_wall"])]
                for name, b in result["billing"].items()),
               "lrrrrrr"),
        "",
        *table(["size", "c", "off billed ms per image", "on billed ms per image", "off billed / wall",
                "on billed / wall"],
               ([f"{size}x{size}", conc, num(e["off"]["billed_ms_per_image"], 1), num(e["on"]["billed_ms_per_image"], 1),
                 num(e["off"]["billed_share_of_wall"], 3), num(e["on"]["billed_share_of_wall"], 3)]
                for size, s in sizes.items() for conc, e in s["concurrency"].items()),
               "lrrrrr"),
    ]
    checks = result["checks"]
    lines += [
        "",
        "Checks (a failed one makes the exit status 1): "
        f"errors {checks['errors']['count']} (429: {checks['errors']['status_429']}): "
        f"{'OK' if checks['errors']['ok'] else 'FAILED'}; largest pixel difference {checks['pixels']['max_diff']}"
        f"/255: {'OK' if checks['pixels']['ok'] else 'FAILED'}; billed time within wall time: "
        f"{'OK' if checks['billed_within_wall']['ok'] else 'FAILED'}.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None, Path | None, str]:
    """(config, --out, --markdown, --log-level) from the command line."""
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="data root (demo-sd15 is written there if missing; default: a temp dir)")
    p.add_argument("--sizes", default=",".join(f"{s.size}@{s.steps}:{s.requests}" for s in BenchConfig.shapes),
                   help="square sizes as SIZE[@STEPS][:N] (N requests per cell; default %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="steps for sizes given without @STEPS (default %(default)s)")
    p.add_argument("--requests", type=int, default=16,
                   help="requests per cell for sizes given without :N (default %(default)s)")
    p.add_argument("--concurrency", default=",".join(map(str, BenchConfig.concurrency)),
                   help="client threads per cell, comma-separated (default %(default)s)")
    p.add_argument("--rounds", type=int, default=BenchConfig.rounds,
                   help="rounds of every cell on both servers (default %(default)s)")
    p.add_argument("--batch-max-size", type=int, default=BenchConfig.batch_max_size,
                   help="SDFUNC_BATCH__MAX_SIZE of the `on` server (default %(default)s)")
    p.add_argument("--batch-max-wait-ms", type=float, default=BenchConfig.batch_max_wait_ms,
                   help="SDFUNC_BATCH__MAX_WAIT_MS of the `on` server (default %(default)s)")
    p.add_argument("--check-seed", type=int, default=BenchConfig.check_seed,
                   help="first seed of the pixel check (default %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads in the servers (default: torch's default)")
    add_output_arguments(p)
    a = p.parse_args(argv)
    try:
        shapes = parse_shapes(a.sizes, a.steps, a.requests)
        concurrency = tuple(int(x) for x in a.concurrency.split(",") if x.strip())
    except ValueError:
        p.error("--sizes: comma-separated SIZE[@STEPS][:N] integers; --concurrency: comma-separated integers")
    if not shapes_valid(shapes):
        p.error("--sizes: distinct multiples of 8, at least 64, with at least 1 step and 1 request")
    if not concurrency or any(x < 1 for x in concurrency) or len(set(concurrency)) != len(concurrency):
        p.error("--concurrency: distinct integers, at least 1")
    if max(concurrency) > 256:
        p.error("--concurrency: at most 256 (SDFUNC_QUEUE__MAX_WAITING's limit)")
    if a.rounds < 1 or a.batch_max_size < 1 or a.batch_max_wait_ms < 0 or (a.threads is not None and a.threads < 1):
        p.error("--rounds, --batch-max-size and --threads must be at least 1, --batch-max-wait-ms at least 0")
    server_env = parse_server_env(p, a.server_env)
    cfg = BenchConfig(data=a.data, shapes=shapes, concurrency=concurrency, rounds=a.rounds,
                      batch_max_size=a.batch_max_size, batch_max_wait_ms=a.batch_max_wait_ms,
                      check_seed=a.check_seed, threads=a.threads, server_env=server_env)
    return cfg, a.out, a.markdown, a.log_level


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg, out, markdown_path, log_level = parse_args(args)
    result = run_benchmark("bench.throughput", args, lambda command: run(cfg, command), markdown, out=out,
                           markdown_path=markdown_path, log_level=log_level)
    return 0 if result["checks"]["ok"] else 1  # no target: the figures are for the record; a failed check is an error


if __name__ == "__main__":
    sys.exit(main())
