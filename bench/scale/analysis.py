"""The numbers of one scale run, computed from its request rows, its instances and its meta: latency per load
level, a time series in fixed bins, catch-up after a load step, instance seconds per image and the cold-start
split.

Pure functions, no I/O. `summarize(rows, instances, meta)` is what a run's `summary.json` holds; it depends on
nothing but the rows, the instances and the meta, so it can be recomputed from `requests.csv`,
`instances.csv` and the meta (`bench.scale.report.read_run`). Times are seconds since the run's start, durations
of requests milliseconds. Latency percentiles are over successful requests only; errors and 429s are counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from bench.harness.stats import percentile

Row = Mapping[str, Any]

ROW_FIELDS = ("id", "level", "intended_s", "sent_s", "done_s", "lag_ms", "latency_ms", "service_ms", "connect_ms",
              "status", "ok", "error", "instance", "cold_start", "platform_start_ms", "billed_ms", "images",
              "server_ms", "queue_ms", "load_ms", "gen_ms", "encode_ms", "fc_request_id", "simulated")
INSTANCE_FIELDS = ("name", "kind", "provisioned", "spawned_s", "ready_s", "stopped_s", "start_ms", "initialize_ms",
                   "requests", "busy_s")
TIMESERIES_FIELDS = ("t", "arrivals", "completions", "ok", "errors", "throttled", "images", "p50_latency_ms",
                     "in_flight", "instances_alive", "instances_ready", "in_time", "cold_starts")

# The type of each column, for writing and parsing CSV files; a missing value is None (an empty cell).
ROW_TYPES: dict[str, type] = {
    "id": int, "level": str, "intended_s": float, "sent_s": float, "done_s": float, "lag_ms": float,
    "latency_ms": float, "service_ms": float, "connect_ms": float, "status": int, "ok": bool, "error": str,
    "instance": str, "cold_start": bool, "platform_start_ms": float, "billed_ms": int, "images": int,
    "server_ms": float, "queue_ms": float, "load_ms": float, "gen_ms": float, "encode_ms": float,
    "fc_request_id": str, "simulated": bool,
}
INSTANCE_TYPES: dict[str, type] = {
    "name": str, "kind": str, "provisioned": bool, "spawned_s": float, "ready_s": float, "stopped_s": float,
    "start_ms": float, "initialize_ms": float, "requests": int, "busy_s": float,
}
TIMESERIES_TYPES: dict[str, type] = {
    "t": float, "arrivals": int, "completions": int, "ok": int, "errors": int, "throttled": int, "images": int,
    "p50_latency_ms": float, "in_flight": int, "instances_alive": int, "instances_ready": int, "in_time": int,
    "cold_starts": int,
}

# The parts of a request's latency that the cold-start split reports (medians, in ms).
SPLIT_PARTS = ("connect_ms", "platform_start_ms", "queue_ms", "load_ms", "gen_ms", "encode_ms", "server_ms",
               "other_ms")


def is_cold_request(row: Row) -> bool:
    """A request that paid for a cold start: it waited for the platform to start an instance, or the instance
    said the request was its cold one."""
    return row.get("platform_start_ms") is not None or bool(row.get("cold_start"))


def cold_flags(rows: Sequence[Row]) -> list[bool]:
    """Which rows paid for a cold start (is_cold_request). A real FC target does not say which request an
    instance was started for (and after FC's initializer the function no longer says X-Cold-Start: true), so
    when no row carries the emulator's platform start, the first request each instance answered counts as
    cold too; a provisioned instance's first request is then counted cold as well."""
    flags = [is_cold_request(r) for r in rows]
    if any(r.get("platform_start_ms") is not None for r in rows):
        return flags
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        name = row.get("instance") or ""
        if not name or row.get("sent_s") is None:
            continue
        if name not in first or float(row["sent_s"]) < float(rows[first[name]]["sent_s"]):
            first[name] = i
    for i in first.values():
        flags[i] = True
    return flags


def is_throttled(row: Row) -> bool:
    """The platform or the function answered 429 (too many requests)."""
    return row.get("status") == 429


def is_error(row: Row) -> bool:
    """A failed request that is not a 429: a transport error or timeout (status 0), another status, or a body
    without images."""
    return not row.get("ok") and not is_throttled(row)


def latency_stats(rows: Iterable[Row]) -> dict[str, Any]:
    """Counts (count, ok, errors, throttled) over all rows; latency percentiles, mean and max, the median
    service time and the images over ok rows; the largest send lag over all rows (a lag is the load
    generator's, whatever the answer)."""
    rows = list(rows)
    ok = [r for r in rows if r.get("ok")]
    latency = [float(r["latency_ms"]) for r in ok]
    service = [float(r["service_ms"]) for r in ok if r.get("service_ms") is not None]
    lags = [float(r["lag_ms"]) for r in rows if r.get("lag_ms") is not None]
    return {
        "count": len(rows),
        "ok": len(ok),
        "errors": sum(1 for r in rows if is_error(r)),
        "throttled": sum(1 for r in rows if is_throttled(r)),
        "latency_p50_ms": percentile(latency, 50),
        "latency_p95_ms": percentile(latency, 95),
        "latency_p99_ms": percentile(latency, 99),
        "latency_mean_ms": float(np.mean(latency)) if latency else None,
        "latency_max_ms": max(latency) if latency else None,
        "service_p50_ms": percentile(service, 50),
        "lag_max_ms": max(lags) if lags else None,
        "images": sum(int(r.get("images") or 0) for r in ok),
    }


def levels(rows: Iterable[Row], meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One entry per load level, in the order the rows first show it: the offered rate in requests/s
    (`meta["offered"]`'s `rate_rps` for the level when given, else (count - 1) / the span of the intended send
    times: n requests on a schedule span n - 1 gaps; None for one request), the achieved images/s (images of ok
    rows / the level's send window: `meta["offered"]`'s `duration_s`, else the span of the intended send times;
    None for a zero window; answers that come after the window count, so a backlog is not lost),
    `served_over_offered` (the images served over the images asked for: the level's requests times the median
    images of an ok request; the baseline is the load itself, as the arrivals really came, so 1.0 when every
    request is served) and the level's latency_stats."""
    offered = {str(o["level"]): o.get("rate_rps") for o in meta.get("offered") or ()}
    durations = {str(o["level"]): o.get("duration_s") for o in meta.get("offered") or ()}
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(str(row["level"]), []).append(row)
    out = []
    for label, group in groups.items():
        intended = [float(r["intended_s"]) for r in group]
        done = [float(r["done_s"]) for r in group if r.get("done_s") is not None]
        schedule_span = max(intended) - min(intended)
        if label in offered:
            rate = offered[label]
        else:
            rate = (len(group) - 1) / schedule_span if schedule_span > 0 else None
        stats = latency_stats(group)
        span = (max(done) - min(intended)) if done else 0.0
        window = durations.get(label) or schedule_span
        images_per_s = stats["images"] / window if window > 0 else None
        per_request = [int(r.get("images") or 0) for r in group if r.get("ok")]
        sent_images = len(group) * float(np.median(per_request)) if per_request else 0.0
        out.append({"level": label, "offered_rps": rate, "images_per_s": images_per_s,
                    "served_over_offered": stats["images"] / sent_images if sent_images else None,
                    "span_s": span, **stats})
    return out


def _bin_index(times: np.ndarray, bin_s: float) -> np.ndarray:
    """The bin of each time; times before 0 fall into bin 0."""
    return np.clip(np.floor(times / bin_s).astype(int), 0, None)


def _optional(values: Iterable[Any], missing: float) -> np.ndarray:
    return np.array([missing if v is None else float(v) for v in values], dtype=float)


def timeseries(rows: Sequence[Row], instances: Sequence[Row], duration_s: float,
               bin_s: float = 1.0, slo_ms: float | None = None) -> list[dict[str, Any]]:
    """Per-bin counts over bins [k*bin_s, (k+1)*bin_s) from 0 to ceil(duration_s / bin_s) bins, extended when a
    request was intended or done later, so that every row is counted once as an arrival and once as a
    completion (times before 0 count in bin 0).

    Per bin starting at t, with e = t + bin_s its end: arrivals (intended_s in the bin), completions (done_s in
    the bin, any status) split into ok, errors and throttled, images (of ok rows done in the bin),
    p50_latency_ms (of ok rows done in the bin; None if none), in_flight (rows with sent_s <= e < done_s),
    instances_alive (spawned_s <= e and not stopped by e), instances_ready (the same with ready_s),
    cold_starts (instances spawned in the bin), and in_time: the requests *intended* in the bin that succeeded
    with a latency of at most `slo_ms` (any latency when None), so that in_time <= arrivals in every bin."""
    if bin_s <= 0:
        raise ValueError(f"bin_s must be positive, not {bin_s}")
    rows = list(rows)
    n = math.ceil(duration_s / bin_s)
    intended = np.array([float(r["intended_s"]) for r in rows], dtype=float)
    done = np.array([float(r["done_s"]) for r in rows], dtype=float)
    if rows:
        n = max(n, math.floor(max(intended.max(), done.max()) / bin_s) + 1)
    if n <= 0:
        return []

    def count(index: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(index, weights=weights, minlength=n)

    arrive_bin, done_bin = _bin_index(intended, bin_s), _bin_index(done, bin_s)
    ok = np.array([bool(r.get("ok")) for r in rows], dtype=bool)
    throttled = np.array([is_throttled(r) for r in rows], dtype=bool)
    images = np.array([int(r.get("images") or 0) for r in rows], dtype=float)
    latencies: list[list[float]] = [[] for _ in range(n)]
    for row, k in zip(rows, done_bin):
        if row.get("ok"):
            latencies[k].append(float(row["latency_ms"]))

    ends = (np.arange(n) + 1) * bin_s
    sent_done = [(float(r["sent_s"]), float(r["done_s"])) for r in rows if r.get("sent_s") is not None]
    sent = np.sort(np.array([s for s, _ in sent_done], dtype=float))
    finished = np.sort(np.array([d for _, d in sent_done], dtype=float))
    # sent_s <= e < done_s, counted as #(sent_s <= e) - #(done_s <= e), since sent_s <= done_s in every row
    in_flight = np.searchsorted(sent, ends, side="right") - np.searchsorted(finished, ends, side="right")

    spawned = _optional((i["spawned_s"] for i in instances), math.inf)
    ready = _optional((i.get("ready_s") for i in instances), math.inf)
    stopped = _optional((i.get("stopped_s") for i in instances), math.inf)
    alive = [int(np.count_nonzero((spawned <= e) & (stopped > e))) for e in ends]
    ready_n = [int(np.count_nonzero((ready <= e) & (stopped > e))) for e in ends]
    spawn_bin = _bin_index(spawned, bin_s)
    cold = count(spawn_bin[spawn_bin < n])

    served = np.array([bool(r.get("ok")) and (slo_ms is None or float(r["latency_ms"]) <= slo_ms) for r in rows],
                      dtype=bool)
    in_time = count(arrive_bin[served])
    arrivals, completions = count(arrive_bin), count(done_bin)
    ok_n, throttled_n = count(done_bin[ok]), count(done_bin[throttled])
    image_n = count(done_bin[ok], images[ok])
    return [{
        "t": k * bin_s,
        "arrivals": int(arrivals[k]),
        "completions": int(completions[k]),
        "ok": int(ok_n[k]),
        "errors": int(completions[k] - ok_n[k] - throttled_n[k]),
        "throttled": int(throttled_n[k]),
        "images": int(image_n[k]),
        "p50_latency_ms": percentile(latencies[k], 50),
        "in_flight": int(in_flight[k]),
        "instances_alive": alive[k],
        "instances_ready": ready_n[k],
        "in_time": int(in_time[k]),
        "cold_starts": int(cold[k]),
    } for k in range(n)]


def catch_up_s(series: Sequence[Mapping[str, Any]], step_at_s: float | None, window: int = 10,
               share: float = 0.9) -> float | None:
    """Seconds from the load step until capacity follows the load; None if it never does before the load ends
    (or there is no step, or no arrival at or after it).

    Over the bins of `timeseries` (bin k starts at t_k): bin k keeps pace when, of the requests intended in the
    `window` bins ending with bin k, at least `share` were served in time (`in_time`: successful within the
    run's latency objective; a window without arrivals keeps pace). Both counts are of the same requests, so a
    steady system that serves everything in time keeps pace in every window; a 429, an error or a request that
    waited for a cold start past the objective does not count. With e the last bin that has an arrival, the
    answer is t_k - step_at_s for the first bin k with t_k >= step_at_s such that every bin k, k + 1, ..., e
    keeps pace.
    """
    if step_at_s is None or not series:
        return None
    arrivals = np.array([s["arrivals"] for s in series], dtype=float)
    in_time = np.array([s["in_time"] for s in series], dtype=float)
    with_arrivals = np.flatnonzero(arrivals)
    if with_arrivals.size == 0:
        return None
    last = int(with_arrivals[-1])
    cum_arrivals = np.concatenate(([0.0], np.cumsum(arrivals)))
    cum_in_time = np.concatenate(([0.0], np.cumsum(in_time)))
    keeps_pace = []
    for k in range(len(series)):
        lo = max(0, k + 1 - window)
        offered = cum_arrivals[k + 1] - cum_arrivals[lo]
        keeps_pace.append(offered == 0 or cum_in_time[k + 1] - cum_in_time[lo] >= share * offered)
    answer = None
    for k in range(last, -1, -1):  # walk back from the end of the load while every bin keeps pace
        if not keeps_pace[k] or float(series[k]["t"]) < step_at_s:
            break
        answer = float(series[k]["t"]) - step_at_s
    return answer


def latency_objective_ms(rows: Sequence[Row], meta: Mapping[str, Any]) -> float | None:
    """The latency a request must meet to count as served in time: meta["slo_ms"] when given, else twice the
    median latency of the run's successful warm requests (cold_flags) - the run's own steady state as the
    baseline. None when there is no warm success."""
    if meta.get("slo_ms") is not None:
        return float(meta["slo_ms"])
    warm = [float(r["latency_ms"]) for r, cold in zip(rows, cold_flags(rows)) if r.get("ok") and not cold]
    p50 = percentile(warm, 50)
    return None if p50 is None else 2.0 * p50


def last_scale_out_s(instances: Iterable[Row], step_at_s: float | None) -> float | None:
    """When, after the step, the platform started its last instance: max spawned_s of the instances spawned
    at or after `step_at_s`, minus `step_at_s`; None if none (or no step)."""
    if step_at_s is None:
        return None
    later = [float(i["spawned_s"]) for i in instances if float(i["spawned_s"]) >= step_at_s]
    return max(later) - step_at_s if later else None


def instance_seconds(instances: Iterable[Row], end_s: float, rows: Iterable[Row]) -> dict[str, Any]:
    """What the instances cost against what was served: alive_s = sum of (stopped_s, or end_s while still
    alive) - spawned_s; ready_s = the same from ready_s (instances never ready add 0); busy_s = sum of busy_s;
    each per image of the ok rows (None for no images); billed_s = sum of billed_ms of ok rows / 1000; and
    billed_s / alive_s and billed_s / busy_s (None when the divisor is 0)."""
    alive = ready = busy = 0.0
    for inst in instances:
        end = float(inst["stopped_s"]) if inst.get("stopped_s") is not None else end_s
        alive += end - float(inst["spawned_s"])
        if inst.get("ready_s") is not None:
            ready += max(0.0, end - float(inst["ready_s"]))
        busy += float(inst.get("busy_s") or 0.0)
    ok = [r for r in rows if r.get("ok")]
    images = sum(int(r.get("images") or 0) for r in ok)
    billed = sum(int(r.get("billed_ms") or 0) for r in ok) / 1000

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    return {
        "alive_s": alive, "ready_s": ready, "busy_s": busy, "images": images,
        "alive_per_image_s": ratio(alive, images), "ready_per_image_s": ratio(ready, images),
        "busy_per_image_s": ratio(busy, images),
        "billed_s": billed, "billed_over_alive": ratio(billed, alive), "billed_over_busy": ratio(billed, busy),
    }


def _other_ms(row: Row) -> float:
    """The latency not explained by connect, platform start and the server's own time: network, proxies,
    the platform's routing."""
    return (float(row["latency_ms"]) - float(row.get("connect_ms") or 0.0)
            - float(row.get("platform_start_ms") or 0.0) - float(row.get("server_ms") or 0.0))


def _split_medians(rows: list[Row]) -> dict[str, Any]:
    ok = [r for r in rows if r.get("ok")]
    out: dict[str, Any] = {"requests": len(rows), "ok": len(ok),
                           "latency_p50_ms": percentile((float(r["latency_ms"]) for r in ok), 50)}
    for part in SPLIT_PARTS:
        if part == "other_ms":
            values = [_other_ms(r) for r in ok]
        else:
            values = [float(r[part]) for r in ok if r.get(part) is not None]
        out[part] = percentile(values, 50)
    return out


def coldstart_split(rows: Iterable[Row]) -> dict[str, Any]:
    """Where the time of cold and of warm requests goes: for the cold rows (cold_flags) and the rest,
    the request and ok counts and, over ok rows, the median latency and the median of each of SPLIT_PARTS
    (each over the rows that have it; other_ms = latency - connect - platform start - server time, a missing
    part counting 0). Medians of parts do not add up to the median latency. cold_over_warm_p50 = cold median
    latency / warm median latency."""
    rows = list(rows)
    flags = cold_flags(rows)
    cold = _split_medians([r for r, c in zip(rows, flags) if c])
    warm = _split_medians([r for r, c in zip(rows, flags) if not c])
    ratio = None
    if cold["latency_p50_ms"] is not None and warm["latency_p50_ms"]:
        ratio = cold["latency_p50_ms"] / warm["latency_p50_ms"]
    return {"cold": cold, "warm": warm, "cold_over_warm_p50": ratio}


def _rounded(value: Any) -> Any:
    """Floats to 3 decimals (not finite -> None), numpy scalars to Python ones, tuples to lists: JSON as is."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), 3) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def summarize(rows: Sequence[Row], instances: Sequence[Row], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The run's key numbers, floats rounded to 3 decimals, JSON-serialisable: overall latency_stats, levels,
    instance_seconds up to meta["duration_s"], cold_starts (instances the platform started, provisioned ones
    included; `provisioned` counts those), catch_up_s and last_scale_out_s after meta["step_at_s"] (None without
    a step; time series in 1 s bins), and for the "coldstart" scenario the coldstart_split (else None)."""
    duration = float(meta["duration_s"])
    step = meta.get("step_at_s")
    slo = latency_objective_ms(rows, meta)
    series = timeseries(rows, instances, duration, slo_ms=slo) if step is not None else []
    return _rounded({
        "scenario": meta.get("scenario"),
        "simulated": bool(meta.get("simulated")),
        "duration_s": duration,
        "overall": latency_stats(rows),
        "levels": levels(rows, meta),
        "instance_seconds": instance_seconds(instances, duration, rows),
        "cold_starts": len(instances),
        "provisioned": sum(1 for i in instances if i.get("provisioned")),
        "step_at_s": step,
        "slo_ms": slo,
        "catch_up_s": catch_up_s(series, step),
        "last_scale_out_s": last_scale_out_s(instances, step),
        "coldstart": coldstart_split(rows) if meta.get("scenario") == "coldstart" else None,
    })
