"""The files of one scale run, and two runs side by side.

`write_run` puts into a folder: requests.csv (ROW_FIELDS), instances.csv (INSTANCE_FIELDS), timeseries.csv
(1 s bins), summary.json ({"meta", "summary", **extra}), summary.md (readable report) and three PNG charts
(latency.png, throughput.png, cdf.png). In the CSV files an empty cell is None and booleans are 1/0; floats are
written in full, so `read_run` gives back rows on which `summarize` reproduces summary.json's "summary" exactly.
`compare` renders two run folders' key numbers in Markdown with the ratio b/a. A simulated run says SIMULATION
in its report, on its charts and in a comparison. Deterministic, no network.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # the object API renders with Agg; pyplot's global backend is untouched
from matplotlib.ticker import FuncFormatter

from bench.harness.report import num, table
from bench.scale.analysis import (
    INSTANCE_FIELDS,
    INSTANCE_TYPES,
    ROW_FIELDS,
    ROW_TYPES,
    SPLIT_PARTS,
    TIMESERIES_FIELDS,
    TIMESERIES_TYPES,
    cold_flags,
    is_error,
    is_throttled,
    summarize,
    timeseries,
)

logger = logging.getLogger(__name__)

CHARTS = ("latency.png", "throughput.png", "cdf.png")
FIGSIZE = (8, 3.5)
DPI = 80
_TRUE = frozenset({"1", "true", "True"})


# --- CSV -------------------------------------------------------------------------------------------------------

def _cell(value: Any, kind: type) -> str:
    if value is None:
        return ""
    if kind is bool:
        return "1" if value else "0"
    if kind is float:
        return repr(float(value))  # repr round-trips a float exactly
    if kind is int:
        return str(int(value))
    return str(value)


def _parse(text: str, kind: type) -> Any:
    if kind is str:
        return text
    if text == "":
        return None
    if kind is bool:
        return text in _TRUE
    return kind(text)


def _write_csv(path: Path, fields: Sequence[str], types: Mapping[str, type],
               records: Iterable[Mapping[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(fields)
        for record in records:
            writer.writerow([_cell(record.get(name), types[name]) for name in fields])


def _read_csv(path: Path, types: Mapping[str, type]) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as f:
        return [{name: _parse(text, types.get(name, str)) for name, text in record.items()}
                for record in csv.DictReader(f)]


# --- formatting --------------------------------------------------------------------------------------------------

def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def _simulation_line(meta: Mapping[str, Any]) -> str:
    emulator = (meta.get("config") or {}).get("emulator") or {}
    profile = emulator.get("simulate")
    recorded = emulator.get("profile_source") or {}
    source = f"from the recorded profile `{profile}`" if profile else "from a recorded profile"
    if recorded:
        source += f" (measured on {recorded.get('device', '?')}, {recorded.get('date', '?')})"
    return f"**SIMULATION**: instances are simulated {source}; no function ran."


# --- summary.md --------------------------------------------------------------------------------------------------

_PART_NAMES = {"latency_p50_ms": "latency (median)", "connect_ms": "TCP connect (and TLS)",
               "platform_start_ms": "platform start", "queue_ms": "server queue", "load_ms": "model load",
               "gen_ms": "generation", "encode_ms": "encode", "server_ms": "server total",
               "other_ms": "other (latency - connect - platform - server)"}


def markdown(meta: Mapping[str, Any], summary: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    """The readable report of a run (summary.md)."""
    lines: list[str] = []
    if meta.get("simulated"):
        lines += [_simulation_line(meta), ""]
    lines += [f"# Scale run: {meta.get('scenario')}", "",
              f"- Command: `{meta.get('command', '')}`",
              f"- Target: {meta.get('target', '')}",
              f"- Started: {meta.get('started_at', '')}",
              f"- Duration: {num(summary['duration_s'], 1)} s"]
    if meta.get("machine"):
        lines.append(f"- Machine: `{json.dumps(meta['machine'], sort_keys=True)}`")
    if meta.get("config"):
        lines.append(f"- Config: `{json.dumps(meta['config'], sort_keys=True)}`")

    lines += ["", "## Load levels", "",
              "Latency: from the intended send time to the whole answer, over successful requests (seconds).", ""]
    body = []
    for lvl in [*summary["levels"], {**summary["overall"], "level": "**all**", "offered_rps": None,
                                     "images_per_s": None, "served_over_offered": None}]:
        body.append([lvl["level"], num(lvl["offered_rps"]), num(lvl["images_per_s"]),
                     num(lvl.get("served_over_offered"), 2), lvl["count"], lvl["ok"],
                     num(_seconds(lvl["latency_p50_ms"])), num(_seconds(lvl["latency_p95_ms"])),
                     num(_seconds(lvl["latency_p99_ms"])), lvl["errors"], lvl["throttled"],
                     num(_seconds(lvl["lag_max_ms"]))])
    lines += table(["level", "offered req/s", "images/s", "served / offered", "requests", "ok", "p50 s", "p95 s",
                     "p99 s", "errors",
                     "429s", "max send lag s"], body)

    inst = summary["instance_seconds"]
    lines += ["", "## Instance seconds", "",
              (f"{summary['cold_starts']} instances started ({summary['provisioned']} provisioned); "
               f"{inst['images']} images."), ""]
    lines += table(["", "alive", "ready", "busy", "billed"], [
        ["seconds", num(inst["alive_s"]), num(inst["ready_s"]), num(inst["busy_s"]), num(inst["billed_s"])],
        ["per image", num(inst["alive_per_image_s"]), num(inst["ready_per_image_s"]),
         num(inst["busy_per_image_s"]), "-"]])
    lines += ["", (f"Billed / alive: {num(inst['billed_over_alive'])}; billed / busy: "
                   f"{num(inst['billed_over_busy'])}.")]

    split = summary.get("coldstart")
    if split:
        lines += ["", "## Cold start split", "",
                  (f"Cold requests waited for an instance to start ({split['cold']['requests']}, "
                   f"{split['cold']['ok']} ok); warm requests did not ({split['warm']['requests']}, "
                   f"{split['warm']['ok']} ok). Medians in ms over ok requests; they do not add up."), ""]
        lines += table(["part", "cold ms", "warm ms"],
                        [[_PART_NAMES[p], num(split["cold"][p], 1), num(split["warm"][p], 1)]
                         for p in ("latency_p50_ms", *SPLIT_PARTS)])
        lines += ["", f"Cold / warm median latency: {num(split['cold_over_warm_p50'], 2)}."]

    if summary.get("step_at_s") is not None:
        catch_up = summary["catch_up_s"]
        lines += ["", "## Load step", "",
                  f"- Step at {num(summary['step_at_s'], 1)} s.",
                  (f"- Caught up: {'never' if catch_up is None else num(catch_up, 1) + ' s after the step'} "
                   "(from then to the end of the load, in every 10 s window at least 90 % of the requests sent were "
                   f"answered successfully within {num(_seconds(summary.get('slo_ms')), 2)} s, twice the run's "
                   "warm median latency; 429s, errors and waits for a cold start past that are not capacity)."),
                  f"- Last scale-out: {num(summary['last_scale_out_s'], 1)} s after the step."]

    rest = dict(extra or {})
    breakdown = rest.pop("cold_start_breakdown", None)
    if breakdown:
        lines += _breakdown_table(breakdown, rest.pop("really_cold", None))
    if rest:
        lines += ["", "## More", "", "```json", json.dumps(rest, indent=2, sort_keys=True), "```"]
    lines += ["", "## Charts", ""] + [f"![{name[:-4]}]({name})" for name in CHARTS]
    return "\n".join(lines) + "\n"


_COLD_PHASES = ("process_to_app", "imports", "device_init", "read_weights", "to_device", "first_generation")


def _breakdown_table(breakdown: list[Any], really_cold: list[bool] | None) -> list[str]:
    """Per repetition: the platform's start of the instance and the function's own cold-start phases."""
    lines = ["", "## Cold starts, per repetition", "",
             ("The platform's part (process start to /health answering, then POST /initialize) and the function's "
              "own breakdown of its cold start (GET /healthz or the /initialize answer), in seconds."), ""]
    rows = []
    for k, item in enumerate(breakdown):
        item = item or {}
        cold = item.get("cold_start") or {}
        phases = cold.get("phases") or {}
        new = "?" if not really_cold or k >= len(really_cold) else ("yes" if really_cold[k] else "NO")
        rows.append([str(k + 1), str(item.get("instance", "-")), new,
                     num(None if item.get("start_ms") is None else item["start_ms"] / 1000, 2),
                     num(None if item.get("initialize_ms") is None else item["initialize_ms"] / 1000, 2),
                     num(cold.get("total_seconds"), 2), *(num(phases.get(name), 2) for name in _COLD_PHASES)])
    return lines + table(["rep", "instance", "new instance", "start s", "initialize s", "function total s",
                           *_COLD_PHASES], rows)


# --- charts ------------------------------------------------------------------------------------------------------

def _figure(meta: Mapping[str, Any], title: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    prefix = "SIMULATION - " if meta.get("simulated") else ""
    ax.set_title(f"{prefix}{meta.get('scenario', '')}: {title}", fontsize=10)
    return fig, ax


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})


def _latency_chart(path: Path, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
    fig, ax = _figure(meta, "latency by intended send time")
    flags = cold_flags(rows)
    ok = [(r, cold) for r, cold in zip(rows, flags) if r.get("ok")]
    groups = [("warm", [r for r, cold in ok if not cold], {"marker": ".", "color": "tab:blue"}),
              ("cold start", [r for r, cold in ok if cold], {"marker": "^", "color": "tab:orange"}),
              ("error", [r for r in rows if is_error(r)], {"marker": "x", "color": "tab:red"}),
              ("429", [r for r in rows if is_throttled(r)], {"marker": "x", "color": "tab:purple"})]
    for label, group, style in groups:
        if group:
            ax.scatter([float(r["intended_s"]) for r in group], [float(r["latency_ms"]) / 1000 for r in group],
                       s=12, label=f"{label} ({len(group)})", linewidths=1, clip_on=False, **style)
    if meta.get("step_at_s") is not None:
        ax.axvline(float(meta["step_at_s"]), color="grey", linestyle="--", linewidth=1, label="step")
    ax.set_xlabel("intended send time (s)")
    ax.set_ylabel("latency (s)")
    ax.set_ylim(bottom=0)
    if ax.has_data():
        ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def _throughput_chart(path: Path, meta: Mapping[str, Any], series: Sequence[Mapping[str, Any]],
                      bin_s: float) -> None:
    fig, ax = _figure(meta, "per-second load and instances")
    t = [s["t"] for s in series]
    ax.step(t, [s["arrivals"] / bin_s for s in series], where="post", color="tab:grey", linewidth=1,
            label="arrivals/s")
    ax.step(t, [s["images"] / bin_s for s in series], where="post", color="tab:green", linewidth=1.5,
            label="images/s")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("per second")
    ax.set_ylim(bottom=0)
    right = ax.twinx()
    right.step(t, [s["instances_alive"] for s in series], where="post", color="tab:blue", linewidth=1,
               label="instances alive")
    right.step(t, [s["instances_ready"] for s in series], where="post", color="tab:blue", linestyle=":",
               linewidth=1, label="instances ready")
    right.set_ylabel("instances")
    right.set_ylim(bottom=0)
    right.yaxis.get_major_locator().set_params(integer=True)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    _save(fig, path)


def _cdf_chart(path: Path, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
    fig, ax = _figure(meta, "latency CDF per level (ok requests)")
    by_level: dict[str, list[float]] = {}
    for row in rows:
        by_level.setdefault(str(row["level"]), [])
        if row.get("ok"):
            by_level[str(row["level"])].append(float(row["latency_ms"]) / 1000)
    plotted = False
    for label, values in by_level.items():
        if values and min(values) > 0:
            x = np.sort(values)
            ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=f"{label} ({len(x)})")
            plotted = True
    if plotted:
        ax.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("latency (s, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    _save(fig, path)


# --- runs --------------------------------------------------------------------------------------------------------

def write_run(out_dir: Path, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
              instances: Sequence[Mapping[str, Any]], *, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write a run's files into `out_dir` (created with its parents; existing files replaced) and return its
    summary (what summary.json holds under "summary"). `extra` adds top-level keys to summary.json (e.g. the
    server's cold-start breakdown) and a section to summary.md; it can not replace "meta" or "summary"."""
    extra = dict(extra or {})
    if {"meta", "summary"} & extra.keys():
        raise ValueError("extra can not hold the keys 'meta' or 'summary'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows, instances, meta)
    series = timeseries(rows, instances, float(meta["duration_s"]), slo_ms=summary.get("slo_ms"))

    _write_csv(out_dir / "requests.csv", ROW_FIELDS, ROW_TYPES, rows)
    _write_csv(out_dir / "instances.csv", INSTANCE_FIELDS, INSTANCE_TYPES, instances)
    _write_csv(out_dir / "timeseries.csv", TIMESERIES_FIELDS, TIMESERIES_TYPES, series)
    document = {"meta": dict(meta), "summary": summary, **extra}
    (out_dir / "summary.json").write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(markdown(meta, summary, extra), encoding="utf-8")
    _latency_chart(out_dir / "latency.png", meta, rows)
    _throughput_chart(out_dir / "throughput.png", meta, series, 1.0)
    _cdf_chart(out_dir / "cdf.png", meta, rows)
    logger.info("wrote run %s: %d requests, %d instances", out_dir, len(rows), len(instances))
    return summary


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(meta, rows, instances) of a run folder written by write_run, with the types of ROW_TYPES and
    INSTANCE_TYPES (None for an empty cell): with `meta, rows, instances = read_run(d)`,
    `summarize(rows, instances, meta)` equals summary.json's "summary"."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))["meta"]
    rows = _read_csv(run_dir / "requests.csv", ROW_TYPES)
    instances = _read_csv(run_dir / "instances.csv", INSTANCE_TYPES)
    return meta, rows, instances


def rewrite_run(run_dir: Path) -> dict[str, Any]:
    """Recompute a run folder's summary, timeseries, Markdown and charts from its raw CSVs and meta (the
    scenario's extra facts kept); returns the summary."""
    run_dir = Path(run_dir)
    doc = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    extra = {k: v for k, v in doc.items() if k not in ("meta", "summary")}
    meta, rows, instances = read_run(run_dir)
    return write_run(run_dir, meta, rows, instances, extra=extra)


# --- comparison --------------------------------------------------------------------------------------------------

def _ratio(a: Any, b: Any) -> str:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return f"{b / a:.2f}" if numbers and a else "-"


def _run_name(run: Path, doc: Mapping[str, Any]) -> str:
    mark = " (SIMULATION)" if doc["summary"].get("simulated") else ""
    return f"{run.name}{mark}"


def compare(a: Path, b: Path) -> str:
    """Markdown with two runs' key numbers side by side and the ratio b/a: overall latency percentiles and
    counts, images/s and p50 per level (matched by label; unmatched levels listed), instance seconds per image,
    billed/alive, catch-up, last scale-out and the cold-start split medians. A simulated run is marked."""
    a, b = Path(a), Path(b)
    docs = [json.loads((run / "summary.json").read_text(encoding="utf-8")) for run in (a, b)]
    sa, sb = docs[0]["summary"], docs[1]["summary"]
    names = [_run_name(a, docs[0]), _run_name(b, docs[1])]
    lines = [f"# Scale runs compared: A = {names[0]}, B = {names[1]}", ""]
    for label, doc in zip("AB", docs):
        meta = doc["meta"]
        if meta.get("simulated"):
            lines.append(f"- {label}: {_simulation_line(meta)}")
        lines.append(f"- {label}: scenario {meta.get('scenario')}, target {meta.get('target')}, "
                     f"started {meta.get('started_at')}, `{meta.get('command', '')}`")
    body: list[list[str]] = []

    def add(label: str, x: Any, y: Any, digits: int = 3) -> None:
        body.append([label, num(x, digits), num(y, digits), _ratio(x, y)])

    oa, ob = sa["overall"], sb["overall"]
    for key, label in (("count", "requests"), ("ok", "ok"), ("errors", "errors"), ("throttled", "429s"),
                       ("images", "images")):
        add(label, oa[key], ob[key])
    for q in ("p50", "p95", "p99"):
        add(f"{q} latency s", _seconds(oa[f"latency_{q}_ms"]), _seconds(ob[f"latency_{q}_ms"]))

    la = {lvl["level"]: lvl for lvl in sa["levels"]}
    lb = {lvl["level"]: lvl for lvl in sb["levels"]}
    matched = [label for label in la if label in lb]
    for label in matched:
        add(f"images/s @ {label}", la[label]["images_per_s"], lb[label]["images_per_s"])
        add(f"p50 latency s @ {label}", _seconds(la[label]["latency_p50_ms"]), _seconds(lb[label]["latency_p50_ms"]))
        add(f"errors + 429s @ {label}", la[label]["errors"] + la[label]["throttled"],
            lb[label]["errors"] + lb[label]["throttled"])

    ia, ib = sa["instance_seconds"], sb["instance_seconds"]
    add("instances started", sa["cold_starts"], sb["cold_starts"])
    for key, label in (("alive_per_image_s", "alive s per image"), ("ready_per_image_s", "ready s per image"),
                       ("busy_per_image_s", "busy s per image"), ("billed_over_alive", "billed / alive"),
                       ("billed_over_busy", "billed / busy")):
        add(label, ia[key], ib[key])
    if sa.get("step_at_s") is not None or sb.get("step_at_s") is not None:
        add("catch-up s", sa.get("catch_up_s"), sb.get("catch_up_s"), 1)
        add("last scale-out s", sa.get("last_scale_out_s"), sb.get("last_scale_out_s"), 1)
    ca, cb = sa.get("coldstart"), sb.get("coldstart")
    if ca or cb:
        for side in ("cold", "warm"):
            for part in ("latency_p50_ms", *SPLIT_PARTS):
                add(f"{side} {_PART_NAMES[part]} ms", (ca or {}).get(side, {}).get(part),
                    (cb or {}).get(side, {}).get(part), 1)
        add("cold / warm median latency", (ca or {}).get("cold_over_warm_p50"), (cb or {}).get("cold_over_warm_p50"), 2)

    lines += [""] + table(["", "A", "B", "B/A"], body)
    only_a = [label for label in la if label not in lb]
    only_b = [label for label in lb if label not in la]
    if only_a or only_b:
        lines.append("")
    if only_a:
        lines.append(f"Levels only in A (unmatched): {', '.join(only_a)}")
    if only_b:
        lines.append(f"Levels only in B (unmatched): {', '.join(only_b)}")
    return "\n".join(lines) + "\n"
