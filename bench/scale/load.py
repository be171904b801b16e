"""Open-loop HTTP load: arrival schedules, and a runner that sends each request at its intended time whatever
the server is doing, measuring latency from that intended time (no coordinated omission).

A schedule is a sorted list of intended send times (seconds from the run's start). `Shape` gives a rate over
time (`constant`, `step`, `ramp`, `spike`, `diurnal`); `arrivals()` turns it into times, as a Poisson process
(thinning, seeded) or evenly spaced. `run_open_loop()` sends one request per time with aiohttp and returns one
row per request (`bench.scale.analysis.ROW_FIELDS`). Every run is bounded: the schedule's length, a per-request
timeout and a deadline after the last arrival, after which what is still in flight is recorded as a timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: Response headers the rows are made of: the function's own, and the local emulator's.
INSTANCE_HEADER = "X-Instance-Id"
COLD_HEADER = "X-Cold-Start"
BILLED_HEADER = "X-Billed-Duration-Ms"
TIMING_HEADER = "Server-Timing"
REQUEST_ID_HEADER = "x-fc-request-id"
START_WAIT_HEADER = "X-Fc-Emulator-Start-Ms"  # bench/scale/emulator.py: the request waited this long for a start
SIMULATED_HEADER = "X-Simulated"

SHAPES = ("constant", "step", "ramp", "spike", "diurnal")
_SHAPE_PARAMS = {
    "constant": {"rate"},
    "step": {"base", "peak", "at"},
    "ramp": {"start", "end"},
    "spike": {"base", "peak", "at", "width"},
    "diurnal": {"mean", "amplitude", "period"},
}


@dataclass(frozen=True)
class Shape:
    """Offered load over time, in requests per second.

    - `constant:rate=R`
    - `step:base=B,peak=P,at=T`: B before T seconds, P from T on
    - `ramp:start=A,end=B`: linear from A at 0 to B at the end of the run
    - `spike:base=B,peak=P,at=T,width=W`: P from T to T+W, B otherwise
    - `diurnal:mean=M,amplitude=A,period=S`: M * (1 - A * cos(2 pi t / S)), a day squeezed into S seconds
      starting at the night's trough (A in 0..1)
    """

    kind: str
    params: dict[str, float] = field(default_factory=dict)
    duration: float = 0.0

    def rate(self, t: float) -> float:
        p = self.params
        if self.kind == "constant":
            return p["rate"]
        if self.kind == "step":
            return p["peak"] if t >= p["at"] else p["base"]
        if self.kind == "ramp":
            frac = min(1.0, max(0.0, t / self.duration)) if self.duration > 0 else 1.0
            return p["start"] + (p["end"] - p["start"]) * frac
        if self.kind == "spike":
            return p["peak"] if p["at"] <= t < p["at"] + p["width"] else p["base"]
        if self.kind == "diurnal":
            return p["mean"] * (1.0 - p["amplitude"] * math.cos(2 * math.pi * t / p["period"]))
        raise ValueError(f"unknown shape {self.kind!r}")

    def peak(self) -> float:
        """The highest rate the shape reaches (the thinning bound)."""
        p = self.params
        return {
            "constant": lambda: p["rate"], "step": lambda: max(p["base"], p["peak"]),
            "ramp": lambda: max(p["start"], p["end"]), "spike": lambda: max(p["base"], p["peak"]),
            "diurnal": lambda: p["mean"] * (1.0 + abs(p["amplitude"])),
        }[self.kind]()

    def step_at(self) -> float | None:
        """When the load jumps (step and spike), for the catch-up time; None for smooth shapes."""
        return self.params.get("at") if self.kind in ("step", "spike") else None

    def describe(self) -> str:
        args = ",".join(f"{k}={v:g}" for k, v in self.params.items())
        return f"{self.kind}:{args}" if args else self.kind


def parse_shape(text: str, duration: float) -> Shape:
    """`kind:key=value,...` (see `Shape`) -> Shape; ValueError names what is wrong."""
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    if kind not in SHAPES:
        raise ValueError(f"shape {kind!r}: one of {', '.join(SHAPES)}")
    params: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"shape {kind}: {item!r} is not key=value")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"shape {kind}: {key}={value!r} is not a number") from None
    need = _SHAPE_PARAMS[kind]
    if set(params) != need:
        raise ValueError(f"shape {kind} takes {', '.join(sorted(need))}; got {', '.join(sorted(params)) or 'none'}")
    if any(v < 0 for k, v in params.items() if k != "amplitude") or not 0 <= params.get("amplitude", 0) <= 1:
        raise ValueError(f"shape {kind}: rates and times must be >= 0 (amplitude 0..1)")
    if kind == "diurnal" and params["period"] <= 0:
        raise ValueError("shape diurnal: period must be > 0")
    if duration <= 0:
        raise ValueError("duration must be > 0")
    return Shape(kind, params, duration)


def arrivals(shape: Shape, *, process: str = "poisson", seed: int = 0, start: float = 0.0,
             max_requests: int | None = None) -> list[float]:
    """Intended send times in [start, start + shape.duration) for `shape`, sorted.

    `poisson`: a non-homogeneous Poisson process by thinning (Lewis and Shedler), reproducible by `seed`.
    `uniform`: the n-th request at the time the integral of the rate reaches n - 1/2 (evenly spaced at a
    constant rate). `max_requests` caps the count (the earliest are kept)."""
    times: list[float] = []
    if process == "poisson":
        rng = random.Random(seed)
        peak = shape.peak()
        t = 0.0
        while peak > 0:
            t += rng.expovariate(peak)
            if t >= shape.duration:
                break
            if rng.random() * peak < shape.rate(t):
                times.append(start + t)
    elif process == "uniform":
        dt = 0.001
        acc, n, t = 0.0, 0, 0.0
        while t < shape.duration:
            acc += shape.rate(t) * dt
            while acc >= n + 0.5:
                times.append(start + t)
                n += 1
            t += dt
    else:
        raise ValueError(f"process {process!r}: poisson or uniform")
    return times[:max_requests] if max_requests is not None else times


# ---------------------------------------------------------------------------------------------------------
# the runner


@dataclass(frozen=True)
class Call:
    """One HTTP request to send: method, path (with query) and JSON body; `level` labels its row."""

    path: str
    body: dict[str, Any] | None
    level: str = ""
    method: str = "POST"


_TIMING = re.compile(r"\s*([A-Za-z0-9_-]+)\s*(?:;[^,]*?dur=([0-9.]+))?[^,]*")


def parse_server_timing(value: str | None) -> dict[str, float]:
    """`queue;dur=1.0, gen;dur=523.2` -> {"queue": 1.0, "gen": 523.2}; entries without dur are left out."""
    out: dict[str, float] = {}
    for part in (value or "").split(","):
        m = _TIMING.match(part)
        if m and m.group(2):
            out[m.group(1)] = float(m.group(2))
    return out


def _float_header(headers: Any, name: str) -> float | None:
    try:
        value = headers.get(name)
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _row(i: int, call: Call, intended: float) -> dict[str, Any]:
    return {
        "id": i, "level": call.level, "intended_s": intended, "sent_s": None, "done_s": None, "lag_ms": None,
        "latency_ms": None, "service_ms": None, "connect_ms": None, "status": 0, "ok": False, "error": "",
        "instance": "", "cold_start": False, "platform_start_ms": None, "billed_ms": 0, "images": 0,
        "server_ms": None, "queue_ms": None, "load_ms": None, "gen_ms": None, "encode_ms": None,
        "fc_request_id": "", "simulated": False,
    }


def _error_text(status: int, body: bytes) -> str:
    """A short reason for a failed response: the error code of a JSON body, else its first bytes."""
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            for key in ("error", "ErrorCode", "code", "detail"):
                if isinstance(data.get(key), str):
                    return f"{status} {data[key]}"[:200]
    except ValueError:
        pass
    return f"{status} {body[:120].decode('utf-8', 'replace')}".strip()


def fill_from_response(row: dict[str, Any], status: int, headers: Any, body: bytes) -> None:
    """Set a row's server-side fields from a response: status, ok (200 with at least one image), the
    function's headers and Server-Timing, the emulator's start wait."""
    row["status"] = status
    row["instance"] = headers.get(INSTANCE_HEADER, "") or ""
    row["cold_start"] = (headers.get(COLD_HEADER, "") or "").lower() == "true"
    row["fc_request_id"] = headers.get(REQUEST_ID_HEADER, "") or ""
    row["simulated"] = (headers.get(SIMULATED_HEADER, "") or "").lower() == "true"
    row["platform_start_ms"] = _float_header(headers, START_WAIT_HEADER)
    billed = _float_header(headers, BILLED_HEADER)
    row["billed_ms"] = int(billed) if billed is not None else 0
    timing = parse_server_timing(headers.get(TIMING_HEADER))
    for name in ("queue", "load", "gen", "encode"):
        row[f"{name}_ms"] = timing.get(name)
    row["server_ms"] = timing.get("total")
    if status != 200:
        row["error"] = _error_text(status, body)
        return
    try:
        images = json.loads(body).get("images")
    except (ValueError, AttributeError):
        images = None
    if isinstance(images, list) and images:
        row["images"] = len(images)
        row["ok"] = True
    else:
        row["error"] = "200 without images"


@dataclass
class LoadConfig:
    """How requests are sent: where, with which headers, and the bounds of the run."""

    base_url: str
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 600.0  # per request
    drain_s: float = 600.0  # after the last intended send, how long in-flight requests may still take
    max_connections: int = 1000  # aiohttp's connection pool; an open loop needs one per request in flight


async def run_open_loop(cfg: LoadConfig, schedule: list[tuple[float, Call]],
                        on_done: Callable[[dict[str, Any]], None] | None = None,
                        t0: float | None = None) -> list[dict[str, Any]]:
    """Send `schedule` ((intended seconds from t0, call), sorted by time) open-loop; one row per call, in
    schedule order. `t0` is a `loop.time()` (= time.monotonic()) origin; default: now + 50 ms."""
    import aiohttp

    loop = asyncio.get_running_loop()
    origin = loop.time() + 0.05 if t0 is None else t0
    rows = [_row(i, call, at) for i, (at, call) in enumerate(schedule)]

    async def on_conn_start(_session, ctx, _params) -> None:
        ctx.trace_request_ctx["connect_start"] = loop.time()

    async def on_conn_end(_session, ctx, _params) -> None:
        holder = ctx.trace_request_ctx
        holder["connect_ms"] = (loop.time() - holder["connect_start"]) * 1000

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(on_conn_start)
    trace.on_connection_create_end.append(on_conn_end)
    connector = aiohttp.TCPConnector(limit=cfg.max_connections, limit_per_host=cfg.max_connections)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)

    async def one(row: dict[str, Any], call: Call, session: aiohttp.ClientSession) -> None:
        holder: dict[str, float] = {}
        sent = loop.time()
        row["sent_s"] = sent - origin
        try:
            async with session.request(call.method, cfg.base_url.rstrip("/") + call.path, json=call.body,
                                       headers=cfg.headers, trace_request_ctx=holder) as resp:
                body = await resp.read()
                fill_from_response(row, resp.status, resp.headers, body)
        except asyncio.TimeoutError:
            row["error"] = f"timeout after {cfg.timeout_s:g} s"
        except aiohttp.ClientError as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        except asyncio.CancelledError:
            row["error"] = "cancelled at the run's deadline"
        done = loop.time()
        row["done_s"] = done - origin
        row["connect_ms"] = holder.get("connect_ms")
        row["lag_ms"] = (row["sent_s"] - row["intended_s"]) * 1000
        row["latency_ms"] = (row["done_s"] - row["intended_s"]) * 1000
        row["service_ms"] = (done - sent) * 1000
        if on_done is not None:
            on_done(row)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trace_configs=[trace]) as session:
        tasks: list[asyncio.Task] = []
        for row, (at, call) in zip(rows, schedule):
            delay = origin + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(row, call, session)))
        last = schedule[-1][0] if schedule else 0.0
        remaining = max(0.0, origin + last + cfg.drain_s - loop.time())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=remaining)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d requests still in flight at the deadline: recorded as errors", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
    return rows
