"""PAI-EAS queue against synchronous txt2img: images per second and end-to-end latency of the queue service
(put on `<service>/sdapi/v1/txt2img`, result from the sink over the SDK's WebSocket watcher) against
`POST /sdapi/v1/txt2img` on the same server, and the watcher's delivery lag.

    python -m bench.eas_queue [--data DIR] [--rounds 3] [--requests 16] [--size 128] [--steps 8]
                              [--concurrency 1,2,4] [--threads T] [--server-env KEY=VALUE ...]
                              [--out FILE.json] [--markdown FILE]

Method. One real server (`python -m handler.cli serve`, gunicorn, 127.0.0.1, demo-sd15 with random weights, warm-up
at start on the benchmark's shape), its records database a fresh SQLite file in the run's temporary folder (so
its sink starts empty), `SDFUNC_QUEUE__MAX_WAITING` = the highest concurrency (nothing is shed), auth `none`, the
task settings at their defaults (`tasks.runners` 2, `tasks.watch_poll_seconds` 0.25) unless `--server-env` says
otherwise. Every request is the same txt2img (Euler, CFG 7, `--size` square, `--steps`, one image) with a distinct
seed. A cell = one path, one concurrency c, `--requests` K requests in all, in a closed loop of c client threads:

| path | a client thread | latency of one request |
|---|---|---|
| `sync` (baseline) | `POST /sdapi/v1/txt2img` (its own `requests.Session`), the next one when the answer arrived | send -> whole body |
| `queue` | the SDK's `QueueClient.put` with a unique `task_id` tag (its own client, no SDK retries), then waits for that tag's frame; then the next put | put sent -> its frame received by the watcher |

So both paths keep c requests in flight. One SDK watcher (`QueueClient(endpoint, '<service>/sink').watch(0,
window, auto_commit=True)`) runs on a thread for the whole run, stamps each frame on arrival and hands it to the
putter waiting for its tag; it is connected during the sync cells too (it holds one HTTP thread and reads the
database every poll: a small cost on the baseline, in the queue's favour). images/s = images / wall time from the
release of the threads to the last answer (sync) or frame (queue). The two paths do the same generation but not
the same output work: a sync answer carries the PNG as base64; a queued task saves it under `<data>/outputs` and
its result (`parameters.image_url`) is a small JSON frame.

Rounds: after an untimed warm-up of both paths at the highest concurrency, `--rounds` rounds of every cell; the
path that goes first alternates between cells and rounds (sync/queue, queue/sync, ...), so a drift of the machine
weighs on both alike. Reported per c: images/s of both (rounds pooled), queue / sync, median and p90 latency of
both, queue / sync of the medians, and the same ratios per round.

Where a queued request's time goes, from the task row (`GET /tasks/<task_id>`, read after each cell, untimed; the
frame's data carries the server's `task_id`): put = the put's round trip; wait = `created_at` -> `started_at` (until
a runner claimed it); run = `started_at` -> `finished_at` (waiting for the device behind the other runner's task,
generation, saving the PNG, the finishing transaction that also puts it on the sink); delivery lag =
`finished_at` -> the frame's arrival at the watcher (both on this machine's clock). The watcher looks at the sink
as soon as a task of its own instance finishes (as here: one server), so expect a lag of milliseconds; results
finished on other instances wait for its next look, every `tasks.watch_poll_seconds`.

Stability: each cell records the share of the CPU that other processes used meanwhile (from /proc). A cell above
10 %, or sync cells of one c whose rounds differ by more than x1.25, mark the run UNSTABLE: on 2 cores another
CPU-bound process slows generation many times over. Checks (a failed one makes the exit status 1): every sync
answer is 200 with one image; every put is answered with an index and its frame arrives exactly once, with
`parameters.status` 0; no frame comes for a tag the run did not put; the sink is empty at the end (auto-commit);
every task row has its timestamps. No target: the figures are for the record.

The SDK's watcher reconnects forever when its socket is closed under it, so the run ends it from inside: a last
put (64x64, 1 step, tag `bench-stop`) whose frame makes the watcher's loop return, then the SDK's `close()`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.harness.cli import (
    OTHERS_MAX,
    add_output_arguments,
    cpu_snapshot,
    others_share,
    parse_server_env,
    run_benchmark,
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
    payload,
    running_server,
)
from bench.harness.stats import DISTURBED_SPREAD, spread, summary

log = logging.getLogger("bench.eas_queue")

PATHS = ("sync", "queue")  # sync is the baseline
BASELINE = "sync"
SERVICE = "bench"  # the queue service's name: /api/predict/bench/...
TOKEN = "bench"  # auth mode none: the SDK sends a token, the server does not need one
WATCH_WINDOW = 100  # the watcher's window (auto-commit frees each place on delivery)
STOP_TAG = "bench-stop"  # the last put of a run: its frame ends the watcher's loop
ERROR_SAMPLES = 5  # error texts kept per cell


@dataclass
class BenchConfig:
    """What one run measures. The defaults take about 2 minutes on an idle 2-core CPU machine."""

    data: Path | None = None  # data root; demo-sd15 is written into a temp one when it has no checkpoint
    size: int = 128
    steps: int = 8
    requests: int = 16  # requests per cell (one path, one concurrency, one round)
    concurrency: tuple[int, ...] = (1, 2, 4)
    rounds: int = 3  # rounds of every cell on both paths; which path goes first alternates
    threads: int | None = None  # torch threads in the server; None = torch's default here
    request_timeout: float = 300.0  # seconds a client waits for one answer or frame
    server_timeout: float = 240.0  # seconds the server may take to say READY (warm-up included)
    server_env: tuple[tuple[str, str], ...] = ()  # extra environment for the server

    @property
    def max_concurrency(self) -> int:
        return max(self.concurrency)


def server_env(cfg: BenchConfig, work: Path) -> tuple[tuple[str, str], ...]:
    """The server's environment: warm-up shape, queue depth and a fresh records database, then `--server-env`."""
    return (("SDFUNC_WARMUP__SHAPES", json.dumps([f"{cfg.size}x{cfg.size}@{cfg.steps}"])),
            ("SDFUNC_QUEUE__MAX_WAITING", str(cfg.max_concurrency)),
            ("SDFUNC_DATABASE_URL", f"sqlite:///{work / 'records.sqlite3'}"),
            *cfg.server_env)


def task_settings(env: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The server's `tasks.runners` and `tasks.watch_poll_seconds`: the defaults, or what `env` sets."""
    from handler.settings import TaskSettings

    given = {k.removeprefix("SDFUNC_TASKS__").lower(): v for k, v in env if k.startswith("SDFUNC_TASKS__")}
    defaults = TaskSettings()
    return {"runners": int(given.get("runners", defaults.runners)),
            "watch_poll_seconds": float(given.get("watch_poll_seconds", defaults.watch_poll_seconds))}


# ---------------------------------------------------------------------------------------------------------
# the SDK's clients and the watcher


def queue_client(endpoint: str, queue: str) -> Any:
    """An `eas_prediction.QueueClient` on `queue` (`<service>/<path>`) that does not retry: a failed call is an
    error of the run, not a hidden second try."""
    import eas_prediction

    client = eas_prediction.QueueClient(endpoint, queue)
    client.set_token(TOKEN)
    client.init()
    client.set_retry_count(0)
    client.set_logger(logging.getLogger("bench.eas_queue.sdk"))
    return client


def close_pools(clients: list[Any]) -> None:
    """Close the SDK clients' pooled connections."""
    for client in clients:
        client.connection_pool.clear()


@dataclass
class Arrival:
    """One sink frame as the watcher received it."""

    tag: str
    index: int
    perf: float  # perf_counter at arrival
    wall: float  # time.time() at arrival, to compare with the task row's finished_at
    task_id: str | None = None
    status: int | None = None  # parameters.status: 0 for a success
    error: str | None = None


class SinkWatcher:
    """The SDK's watcher on `<service>/sink` (auto-commit), run on a thread for the whole run. Each frame is stamped
    on arrival and handed to whoever waits for its `task_id` tag (`expect` before the put, then `wait`).
    `close(put_client, body)` ends it: the SDK's watcher reconnects forever when its socket is closed under it, so
    it is ended from inside, by a last put whose frame makes its loop stop."""

    def __init__(self, endpoint: str) -> None:
        self.sink = queue_client(endpoint, f"{SERVICE}/sink")
        self.watcher = self.sink.watch(0, WATCH_WINDOW, auto_commit=True)
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self.arrivals: dict[str, Arrival] = {}
        self.duplicates: list[str] = []
        self.unexpected: list[str] = []
        self.failure: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="bench-sink-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for frame in self.watcher.run():
                perf, wall = time.perf_counter(), time.time()
                tag = frame.tags.get("task_id", "")
                if tag == STOP_TAG:
                    return  # leaving the loop closes the SDK's generator
                self._arrived(Arrival(tag, int(frame.index), perf, wall, *_result_fields(frame.data)))
        except Exception as exc:  # the watcher itself failed: every waiting putter times out, the check fails
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("the sink watcher failed: %s", self.failure)

    def _arrived(self, arrival: Arrival) -> None:
        with self._lock:
            event = self._events.get(arrival.tag)
            if event is None:
                self.unexpected.append(arrival.tag)
            elif arrival.tag in self.arrivals:
                self.duplicates.append(arrival.tag)
            else:
                self.arrivals[arrival.tag] = arrival
                event.set()

    def expect(self, tag: str) -> None:
        """Announce a tag before its put, so its frame is never taken for an unexpected one."""
        with self._lock:
            self._events[tag] = threading.Event()

    def wait(self, tag: str, timeout: float) -> Arrival | None:
        """The frame of `tag` (announced with `expect`), or None after `timeout` seconds."""
        with self._lock:
            event = self._events[tag]
        if not event.wait(timeout):
            return None
        with self._lock:
            return self.arrivals[tag]

    def close(self, put_client: Any, body: dict[str, Any], timeout: float = 60.0) -> bool:
        """Stop the watcher (idempotent): a last put tagged STOP_TAG, whose frame ends the loop, then the SDK's
        close (its ping thread and socket). False when the loop did not end within `timeout` seconds."""
        if self._closed:
            return True
        self._closed = True
        ended = not self._thread.is_alive()
        if not ended:
            try:
                put_client.put(json.dumps(body).encode(), tags={"task_id": STOP_TAG})
                self._thread.join(timeout)
                ended = not self._thread.is_alive()
            except Exception as exc:  # the server is gone: the daemon thread is left behind
                log.warning("could not stop the sink watcher with a last put: %s", exc)
        try:
            self.watcher.close()
        except Exception:  # its socket is already gone
            pass
        if not ended:
            log.warning("the sink watcher did not stop within %.0f s (a daemon thread is left)", timeout)
        return ended


def _result_fields(data: bytes) -> tuple[str | None, int | None, str | None]:
    """(the server's task id, `parameters.status`, an error) from a frame's data: the task's JSON result."""
    try:
        result = json.loads(data)
        status = int(result["parameters"]["status"])
    except (ValueError, TypeError, KeyError) as exc:
        return None, None, f"bad frame data: {type(exc).__name__}: {exc}"
    if status == 0 and result.get("status") == "succeeded":
        return result.get("task_id"), status, None
    error = f"task {result.get('status')}: status {status} {result['parameters'].get('error_msg', '')}"
    return result.get("task_id"), status, error[:300]


# ---------------------------------------------------------------------------------------------------------
# one cell


@dataclass
class Answer:
    """One request's outcome, on either path."""

    latency_ms: float | None
    error: str | None = None
    put_ms: float | None = None  # queue: the put's round trip
    arrival: Arrival | None = None  # queue: its frame
    done_perf: float | None = None  # perf_counter when the answer or frame arrived


def _sync_request(session: Any, url: str, body: dict[str, Any], timeout: float) -> Answer:
    """One txt2img; never raises for a failed request (it is an Answer with an error)."""
    import requests

    started = time.perf_counter()
    try:
        r = session.post(url + TXT2IMG, json=body, timeout=timeout)
        done = time.perf_counter()
    except requests.RequestException as exc:
        return Answer(None, f"{type(exc).__name__}: {exc}")
    if r.status_code != 200:
        return Answer(None, f"{r.status_code}: {r.text[:300]}")
    try:
        images = len(r.json().get("images") or [])
    except ValueError as exc:
        return Answer(None, f"bad 200 body: {exc}")
    if images != 1:
        return Answer(None, f"{images} images in the answer")
    return Answer(round((done - started) * 1000.0, 3), done_perf=done)


def _queue_request(client: Any, watcher: SinkWatcher, tag: str, body: dict[str, Any], timeout: float) -> Answer:
    """One put and the wait for its frame; never raises for a failed request."""
    watcher.expect(tag)
    started = time.perf_counter()
    try:
        index, _ = client.put(json.dumps(body).encode(), tags={"task_id": tag})
        put_ms = round((time.perf_counter() - started) * 1000.0, 3)
        int(index)
    except Exception as exc:  # PredictException (any non-2xx), a bad index, a connection error
        return Answer(None, f"put: {type(exc).__name__}: {str(exc)[:300]}")
    arrival = watcher.wait(tag, timeout)
    if arrival is None:
        return Answer(None, f"no frame for {tag} within {timeout:.0f} s" +
                      (f" (the watcher failed: {watcher.failure})" if watcher.failure else ""), put_ms=put_ms)
    if arrival.error is not None:
        return Answer(None, arrival.error, put_ms=put_ms, arrival=arrival)
    return Answer(round((arrival.perf - started) * 1000.0, 3), put_ms=put_ms, arrival=arrival,
                  done_perf=arrival.perf)


def run_closed_loop(clients: list[Any], request: Callable[[Any, int], Answer], total: int) -> tuple[float, list[Answer]]:
    """`bench.harness.load.closed_loop`, timed to the last answer's completion (a queued one's frame arrival, which
    the watcher stamps before the putter wakes). Returns (seconds, the answers in order of i)."""
    started, done = closed_loop(clients, request, total)
    last = max((a.done_perf for a in done if a.done_perf is not None), default=time.perf_counter())
    return last - started, done


def _iso_seconds(value: str | None) -> float | None:
    """An ISO 8601 UTC timestamp (`...Z`) as seconds since the epoch."""
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def task_timings(session: Any, url: str, answers: list[Answer]) -> list[dict[str, float] | None]:
    """Per answered put: wait (created -> started), run (started -> finished) and delivery lag (finished -> the
    frame's arrival) in ms, from `GET /tasks/<task_id>`; None where the task row or a timestamp is missing."""
    out: list[dict[str, float] | None] = []
    for answer in answers:
        arrival = answer.arrival
        if arrival is None or arrival.task_id is None:
            out.append(None)
            continue
        r = session.get(f"{url}/tasks/{arrival.task_id}", timeout=30)
        view = r.json() if r.status_code == 200 else {}
        created, started, finished = (_iso_seconds(view.get(k)) for k in ("created_at", "started_at", "finished_at"))
        if created is None or started is None or finished is None:
            out.append(None)
            continue
        out.append({"wait_ms": round((started - created) * 1000.0, 3),
                    "run_ms": round((finished - started) * 1000.0, 3),
                    "lag_ms": round((arrival.wall - finished) * 1000.0, 3)})
    return out


def cell_record(path: str, c: int, round_index: int, wall_s: float, answers: list[Answer]) -> dict[str, Any]:
    """What one cell measured, JSON-able."""
    ok = [a for a in answers if a.error is None and a.latency_ms is not None]
    errors = [a.error for a in answers if a.error is not None]
    return {"path": path, "concurrency": c, "round": round_index, "requests": len(answers), "images": len(ok),
            "wall_s": round(wall_s, 4), "images_per_s": round(len(ok) / wall_s, 4) if wall_s > 0 else 0.0,
            "errors": len(errors), "error_samples": errors[:ERROR_SAMPLES],
            "samples_ms": [a.latency_ms for a in ok]}


# ---------------------------------------------------------------------------------------------------------
# the run


@dataclass
class Clients:
    """Everything that talks to the server: sync sessions, put clients, the watcher, a session for reads."""

    server: Server
    sessions: list[Any]
    putters: list[Any]
    watcher: SinkWatcher
    reader: Any
    tags: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # this run's tag prefix
    seed: int = SEED + 1000  # the next request's seed (distinct for every request)

    def prime(self, c: int) -> None:
        """An untimed call on the first `c` sessions and put clients: no cell starts by opening connections."""
        for session in self.sessions[:c]:
            session.get(f"{self.server.url}/health", timeout=10).raise_for_status()
        for client in self.putters[:c]:
            client.attributes()


def run_cell(cfg: BenchConfig, clients: Clients, path: str, c: int, round_index: int, label: str) -> dict[str, Any]:
    """One path at concurrency c: `cfg.requests` requests, timed; for the queue, the task rows read afterwards."""
    base = payload(cfg.size, cfg.steps)
    first_seed = clients.seed
    clients.seed += cfg.requests
    url, timeout = clients.server.url, cfg.request_timeout
    clients.prime(c)
    pgid = clients.server.proc.pid if clients.server.proc is not None else None
    before = cpu_snapshot(pgid)  # the server and this process; the rest is other processes
    if path == "sync":
        wall, answers = run_closed_loop(clients.sessions[:c], lambda session, i: _sync_request(
            session, url, {**base, "seed": first_seed + i}, timeout), cfg.requests)
    else:
        wall, answers = run_closed_loop(clients.putters[:c], lambda client, i: _queue_request(
            client, clients.watcher, f"{clients.tags}-{label}-c{c}-{i}", {**base, "seed": first_seed + i}, timeout),
            cfg.requests)
    cell = cell_record(path, c, round_index, wall, answers)
    cell["others_cpu_share"] = others_share(before, cpu_snapshot(pgid))
    if path == "queue":
        timings = task_timings(clients.reader, url, answers)
        answered = [(a, t) for a, t in zip(answers, timings, strict=True) if a.error is None]
        cell["put_ms"] = [a.put_ms for a, _ in answered]
        for key in ("wait_ms", "run_ms", "lag_ms"):
            cell[key] = [t[key] for _, t in answered if t is not None]
        cell["missing_task_rows"] = sum(t is None for _, t in answered)
    return cell


def run_cells(cfg: BenchConfig, clients: Clients) -> list[dict[str, Any]]:
    """Every (round, concurrency) cell on both paths, the first path alternating between cells and rounds."""
    cells: list[dict[str, Any]] = []
    k = 0
    for r in range(cfg.rounds):
        for c in cfg.concurrency:
            order = PATHS if (r + k) % 2 == 0 else tuple(reversed(PATHS))
            k += 1
            for path in order:
                cell = run_cell(cfg, clients, path, c, r, f"r{r}")
                cells.append(cell)
                p50 = statistics.median(cell["samples_ms"]) if cell["samples_ms"] else float("nan")
                others = cell["others_cpu_share"]
                log.info("round %d %-5s c=%d: %6.2f images/s, p50 %7.1f ms%s%s%s", r + 1, path, c,
                         cell["images_per_s"], p50,
                         f", lag p50 {statistics.median(cell['lag_ms']):.0f} ms" if cell.get("lag_ms") else "",
                         f", {cell['errors']} error(s): {cell['error_samples'][:1]}" if cell["errors"] else "",
                         f" - other processes used {others:.0%} of the CPU" if others and others > OTHERS_MAX else "")
    return cells


def _ms_summary(samples: list[float]) -> dict[str, float | None]:
    """Median, p90, min and max of millisecond samples (None for none)."""
    if not samples:
        return {"median_ms": None, "p90_ms": None, "min_ms": None, "max_ms": None}
    return summary(samples, tail=90)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def summarize(cfg: BenchConfig, cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency: both paths' pooled figures, queue / sync of images/s and of the latency median, per-round
    ratios, the queued requests' breakdown; the delivery lag over the run; stability."""
    by_c: dict[str, Any] = {}
    spreads: dict[str, float] = {}
    for c in cfg.concurrency:
        entry: dict[str, Any] = {}
        for path in PATHS:
            mine = [x for x in cells if x["path"] == path and x["concurrency"] == c]
            wall = sum(x["wall_s"] for x in mine)
            images = sum(x["images"] for x in mine)
            samples = [s for x in mine for s in x["samples_ms"]]
            per_round = [x["images_per_s"] for x in mine]
            entry[path] = {
                "images_per_s": round(images / wall, 4) if wall > 0 else 0.0, "images": images,
                "requests": sum(x["requests"] for x in mine), "wall_s": round(wall, 4),
                **{k.replace("median", "p50"): v for k, v in _ms_summary(samples).items()},
                "errors": sum(x["errors"] for x in mine),
                "round_images_per_s": per_round,
                "round_p50_ms": [round(statistics.median(x["samples_ms"]), 3) if x["samples_ms"] else None
                                 for x in mine],
                "round_others_cpu_share": [x.get("others_cpu_share") for x in mine],
            }
            if path == "queue":
                entry[path]["breakdown_ms"] = {key: _ms_summary([s for x in mine for s in x[key]])
                                               for key in ("put_ms", "wait_ms", "run_ms", "lag_ms")}
                entry[path]["missing_task_rows"] = sum(x["missing_task_rows"] for x in mine)
            if len(per_round) > 1 and min(per_round) > 0:
                spreads[f"c{c}/{path}"] = round(spread(per_round), 3)
        sync, queue = entry["sync"], entry["queue"]
        entry["throughput_ratio"] = _ratio(queue["images_per_s"], sync["images_per_s"])
        entry["p50_ratio"] = _ratio(queue["p50_ms"], sync["p50_ms"])
        entry["p90_ratio"] = _ratio(queue["p90_ms"], sync["p90_ms"])
        entry["round_throughput_ratios"] = [_ratio(q, s) for s, q in zip(sync["round_images_per_s"],
                                                                          queue["round_images_per_s"], strict=True)]
        entry["round_p50_ratios"] = [_ratio(q, s) for s, q in zip(sync["round_p50_ms"], queue["round_p50_ms"],
                                                                  strict=True)]
        by_c[str(c)] = entry
    lags = [s for x in cells if x["path"] == "queue" for s in x["lag_ms"]]
    busy = [f"c{x['concurrency']}/{x['path']}/round {x['round'] + 1}" for x in cells
            if x.get("others_cpu_share") is not None and x["others_cpu_share"] > OTHERS_MAX]
    sync_disturbed = [k for k, v in spreads.items() if k.endswith("/sync") and v > DISTURBED_SPREAD]
    stability: dict[str, Any] = {"round_spread": spreads, "threshold": DISTURBED_SPREAD, "others_max": OTHERS_MAX,
                                 "busy_cells": busy, "sync_disturbed": sync_disturbed,
                                 "disturbed": bool(busy or sync_disturbed)}
    if spreads:
        worst = max(spreads, key=spreads.get)
        stability.update(worst=worst, worst_spread=spreads[worst])
    if busy:
        log.warning("other processes used more than %.0f %% of the CPU during %d cell(s) (%s): rerun on a quiet "
                    "machine", OTHERS_MAX * 100, len(busy), ", ".join(busy))
    if sync_disturbed:
        log.warning("sync images/s of %s differ between rounds by more than x%.2f: the machine was busy",
                    ", ".join(sync_disturbed), DISTURBED_SPREAD)
    return {"concurrency": by_c, "delivery_lag": {"frames": len(lags), **_ms_summary(lags)}, "stability": stability}


def run(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """The server up and warm, the watcher connected, the warm-up, the cells, the checks. Returns the result."""
    import requests
    import torch

    default_threads = torch.get_num_threads()
    threads = cfg.threads or default_threads
    started = time.perf_counter()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdfunc-bench-")))
        env = server_env(cfg, work)
        tasks = task_settings(env)
        result: dict[str, Any] = result_header("eas_queue", command, cfg, {
            "model": MODEL, "sampler": SAMPLER, "cfg_scale": CFG_SCALE, "prompt": PROMPT, "threads": threads,
            "service": SERVICE, "tasks": tasks, "watch_window": WATCH_WINDOW, "baseline": BASELINE,
            "server_environment": [list(p) for p in env if p[0] != "SDFUNC_DATABASE_URL"]}, threads, default_threads)
        data = Path(cfg.data).resolve() if cfg.data else work / "data"
        ensure_data(data)
        server = stack.enter_context(running_server(data, work, warmup=True, threads=threads, name="eas-queue",
                                                    extra_env=env))
        reader = stack.enter_context(requests.Session())
        server.start()
        ready_s, _ = server.wait_health(reader, until=("READY",), timeout=cfg.server_timeout)
        log.info("server READY after %.1f s", ready_s)
        endpoint = f"127.0.0.1:{server.port}"
        putters = [queue_client(endpoint, f"{SERVICE}/sdapi/v1/txt2img") for _ in range(cfg.max_concurrency)]
        watcher = SinkWatcher(endpoint)
        # On every way out, before the server stops: the watcher's last put, then the SDK clients' keep-alive
        # connections closed (gunicorn's graceful stop would wait for them).
        stack.callback(close_pools, [*putters, watcher.sink])
        stop_body = payload(64, 1)  # the watcher's last put: the smallest request
        stack.callback(watcher.close, putters[0], stop_body)
        clients = Clients(server, [stack.enter_context(requests.Session()) for _ in range(cfg.max_concurrency)],
                          putters, watcher, reader)
        for path in PATHS:  # untimed: every thread, connection, the runners and the sink's first rows
            warm = run_cell(replace(cfg, requests=cfg.max_concurrency), clients, path, cfg.max_concurrency, -1,
                            "warmup")
            if warm["errors"]:
                raise RuntimeError(f"warm-up of the {path} path failed: {warm['error_samples'][:2]}")
        log.info("warm-up done (both paths, c=%d)", cfg.max_concurrency)
        cells = run_cells(cfg, clients)
        watcher_stopped = watcher.close(putters[0], stop_body)
        sink = sink_attributes(watcher.sink)
        log.info("watcher %s; sink stream.length %s", "stopped" if watcher_stopped else "NOT stopped",
                 sink.get("stream.length"))
    result["cells"] = cells
    result["summary"] = summarize(cfg, cells)
    result["checks"] = checks(cells, watcher, watcher_stopped, sink)
    finish(result, time.perf_counter() - started)
    return result


def sink_attributes(sink: Any, settle_s: float = 5.0) -> dict[str, str]:
    """The sink's attributes once no result is open, or after `settle_s` seconds: the server commits an
    auto-committed frame just after sending it, so the last one may still be open for a moment."""
    deadline = time.monotonic() + settle_s
    while True:
        attributes = sink.attributes()
        if attributes.get("stream.length") == "0" or time.monotonic() > deadline:
            return attributes
        time.sleep(0.05)


def checks(cells: list[dict[str, Any]], watcher: SinkWatcher, watcher_stopped: bool,
           sink: dict[str, str]) -> dict[str, Any]:
    """Every request answered, every put's frame exactly once, nothing unexpected, the sink empty at the end."""
    errors = sum(x["errors"] for x in cells)
    queue_cells = [x for x in cells if x["path"] == "queue"]
    out: dict[str, Any] = {
        "errors": {"count": errors, "ok": errors == 0},
        "frames": {"duplicates": len(watcher.duplicates), "unexpected": len(watcher.unexpected),
                   "watcher_failure": watcher.failure, "watcher_stopped": watcher_stopped,
                   "ok": (not watcher.duplicates and not watcher.unexpected and watcher.failure is None
                          and watcher_stopped)},
        "sink_empty": {"stream_length": sink.get("stream.length"), "ok": sink.get("stream.length") == "0"},
        "task_rows": {"missing": sum(x["missing_task_rows"] for x in queue_cells),
                      "ok": not any(x["missing_task_rows"] for x in queue_cells)},
    }
    out["ok"] = all(c["ok"] for c in out.values())
    for name, check in out.items():
        if isinstance(check, dict) and not check["ok"]:
            log.error("check %s failed: %s", name, check)
    return out


# ---------------------------------------------------------------------------------------------------------
# report


def markdown(result: dict[str, Any]) -> str:
    """The section RESULTS.md carries, from a result dict."""
    m, c = result["machine"], result["config"]
    s = result["summary"]
    by_c, lag, stab = s["concurrency"], s["delivery_lag"], s["stability"]
    poll = c["tasks"]["watch_poll_seconds"]
    lines = [
        machine_line(result, f"torch threads {m['torch_threads']} (torch default here: {m['torch_default_threads']})"),
        "",
        f"Command: `{result['command']}`",
        "",
        f"Model {c['model']} (random weights), {c['size']}x{c['size']}, {c['steps']} steps, sampler {c['sampler']}, "
        f"CFG {c['cfg_scale']}, one image per request, a distinct seed per request; one server, "
        f"{env_pairs(c['server_environment'])}, `tasks.runners` "
        f"{c['tasks']['runners']}, `tasks.watch_poll_seconds` {poll:g}. Per cell, c client threads in a closed loop: "
        "`sync` posts and waits for the answer (baseline); `queue` puts with the SDK and waits for its frame from one "
        "SDK watcher (auto-commit). Latency: send -> whole body (sync), put sent -> frame received (queue); "
        "images/s = images / wall time, rounds pooled; the first path alternates between cells and rounds.",
        "",
        *table(["c", "N x rounds", "sync images/s", "queue images/s", "queue / sync", "sync p50 ms", "queue p50 ms",
                "queue / sync p50", "sync p90 ms", "queue p90 ms", "errors sync / queue"],
               ([conc, f"{c['requests']} x {c['rounds']}", num(e["sync"]["images_per_s"], 2),
                 num(e["queue"]["images_per_s"], 2), f"**{num(e['throughput_ratio'], 3)}**",
                 num(e["sync"]["p50_ms"], 1), num(e["queue"]["p50_ms"], 1), f"**{num(e['p50_ratio'], 3)}**",
                 num(e["sync"]["p90_ms"], 1), num(e["queue"]["p90_ms"], 1),
                 f"{e['sync']['errors']} / {e['queue']['errors']}"] for conc, e in by_c.items()),
               "rrrrrrrrrrl"),
        "",
        f"Delivery lag (task row `finished_at` -> frame received by the watcher), {lag['frames']} frames: median "
        f"{num(lag['median_ms'], 1)} ms, p90 {num(lag['p90_ms'], 1)} ms, max {num(lag['max_ms'], 1)} ms. The watcher "
        f"looks as soon as a task of its instance finishes (one server here), and every {poll:g} s "
        f"(`tasks.watch_poll_seconds`) for results finished on other instances.",
        "",
        "Where a queued request's time goes (medians, ms; from the task rows): put = the put's round trip, wait = "
        "created -> claimed by a runner, run = claimed -> finished (the device queue behind the other runner's "
        "task, generation, saving the PNG, the finishing transaction), lag = finished -> frame received:",
        "",
        *table(["c", "put", "wait", "run", "lag", "lag p90", "queue p50 (whole)", "sync p50"],
               ([conc, num(e["queue"]["breakdown_ms"]["put_ms"]["median_ms"], 1),
                 num(e["queue"]["breakdown_ms"]["wait_ms"]["median_ms"], 1),
                 num(e["queue"]["breakdown_ms"]["run_ms"]["median_ms"], 1),
                 num(e["queue"]["breakdown_ms"]["lag_ms"]["median_ms"], 1),
                 num(e["queue"]["breakdown_ms"]["lag_ms"]["p90_ms"], 1), num(e["queue"]["p50_ms"], 1),
                 num(e["sync"]["p50_ms"], 1)] for conc, e in by_c.items()),
               "rrrrrrrr"),
        "",
        "Per round (sync does the same work every round, so its spread is the machine's noise"
        + (f"; largest spread between rounds x{stab['worst_spread']:.2f} ({stab['worst']})"
           if stab.get("worst") else "")
        + (f"; sync spread over x{stab['threshold']:.2f}: "
           + ", ".join(f"{k} x{stab['round_spread'][k]:.2f}" for k in stab["sync_disturbed"])
           if stab["sync_disturbed"] else "")
        + (f"; cells during which other processes used over {stab['others_max'] * 100:.0f} % of the CPU: "
           f"{len(stab['busy_cells'])}" if stab["busy_cells"] else "")
        + (" - UNSTABLE, rerun on a quiet machine" if stab["disturbed"] else "") + "):",
        "",
        *table(["c", "queue / sync images/s per round", "queue / sync p50 per round", "sync images/s per round",
                "queue images/s per round", "other processes' CPU % per round, sync; queue"],
               ([conc, ", ".join(num(x, 3) for x in e["round_throughput_ratios"]),
                 ", ".join(num(x, 3) for x in e["round_p50_ratios"]),
                 ", ".join(f"{x:.2f}" for x in e["sync"]["round_images_per_s"]),
                 ", ".join(f"{x:.2f}" for x in e["queue"]["round_images_per_s"]),
                 "; ".join(", ".join("?" if v is None else f"{v * 100:.0f}" for v in e[p]["round_others_cpu_share"])
                           for p in PATHS)] for conc, e in by_c.items()),
               "rlllll"),
    ]
    ch = result["checks"]
    lines += [
        "",
        "Checks (a failed one makes the exit status 1): "
        f"errors {ch['errors']['count']}: {_ok(ch['errors']['ok'])}; frames duplicated {ch['frames']['duplicates']}, "
        f"unexpected {ch['frames']['unexpected']}: {_ok(ch['frames']['ok'])}; sink empty at the end (stream.length "
        f"{ch['sink_empty']['stream_length']}): {_ok(ch['sink_empty']['ok'])}; task rows read: "
        f"{_ok(ch['task_rows']['ok'])}.",
    ]
    return "\n".join(lines) + "\n"


def _ok(ok: bool) -> str:
    return "OK" if ok else "FAILED"


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None, Path | None, str]:
    """(config, --out, --markdown, --log-level) from the command line."""
    p = argparse.ArgumentParser(prog="python -m bench.eas_queue", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="data root (demo-sd15 is written there if missing; default: a temp dir)")
    p.add_argument("--rounds", type=int, default=BenchConfig.rounds,
                   help="rounds of every cell on both paths (default %(default)s)")
    p.add_argument("--requests", type=int, default=BenchConfig.requests,
                   help="requests per cell (one path, one concurrency, one round; default %(default)s)")
    p.add_argument("--size", type=int, default=BenchConfig.size, help="square size (default %(default)s)")
    p.add_argument("--steps", type=int, default=BenchConfig.steps, help="sampling steps (default %(default)s)")
    p.add_argument("--concurrency", default=",".join(map(str, BenchConfig.concurrency)),
                   help="client threads (sync) and putters (queue) per cell, comma-separated (default %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads in the server (default: torch's default)")
    add_output_arguments(p)
    a = p.parse_args(argv)
    try:
        concurrency = tuple(int(x) for x in a.concurrency.split(",") if x.strip())
    except ValueError:
        p.error("--concurrency: comma-separated integers")
    if not concurrency or any(x < 1 for x in concurrency) or len(set(concurrency)) != len(concurrency):
        p.error("--concurrency: distinct integers, at least 1")
    if max(concurrency) > 64:
        p.error("--concurrency: at most 64")
    if a.rounds < 1 or a.steps < 1 or a.size < 64 or a.size % 8 or (a.threads is not None and a.threads < 1):
        p.error("--rounds, --steps and --threads at least 1; --size a multiple of 8, at least 64")
    if a.requests < max(concurrency):
        p.error("--requests: at least the highest --concurrency (every client sends at least one request)")
    cfg = BenchConfig(data=a.data, size=a.size, steps=a.steps, requests=a.requests, concurrency=concurrency,
                      rounds=a.rounds, threads=a.threads, server_env=parse_server_env(p, a.server_env))
    return cfg, a.out, a.markdown, a.log_level


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg, out, markdown_path, log_level = parse_args(args)
    result = run_benchmark("bench.eas_queue", args, lambda command: run(cfg, command), markdown, out=out,
                           markdown_path=markdown_path, log_level=log_level)
    return 0 if result["checks"]["ok"] else 1  # no target: the figures are for the record; a failed check is an error


if __name__ == "__main__":
    sys.exit(main())
