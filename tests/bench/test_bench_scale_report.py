"""The scale bench's reports say what the raw data say: a run written by `write_run` is checked against numbers
recomputed here straight from its CSV files (numpy on the columns, not the bench's own functions), read back
to the same summary, charted in small valid PNGs, and marked SIMULATION exactly when it is one. Catch-up is
checked on hand-made series with known answers."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from bench.harness.stats import percentile
from bench.scale.analysis import ROW_FIELDS, catch_up_s, cold_flags, last_scale_out_s, summarize, timeseries
from bench.scale.report import compare, read_run, write_run

DURATION = 60.0


def _row(i, level, intended, latency_ms, *, status=200, images=1, cold=False, connect=None):
    ok = status == 200
    lag_ms = 3.0 + (i % 4)
    sent = intended + lag_ms / 1000
    done = intended + latency_ms / 1000
    server = (latency_ms - (4000.0 if cold else 0.0)) * 0.8 if ok else None
    return {
        "id": i, "level": level, "intended_s": intended, "sent_s": sent, "done_s": done, "lag_ms": lag_ms,
        "latency_ms": latency_ms, "service_ms": (done - sent) * 1000, "connect_ms": connect, "status": status,
        "ok": ok, "error": "" if ok else ("throttled" if status == 429 else "timeout, read"),
        "instance": f"i-{i % 3}" if ok else "", "cold_start": cold,
        "platform_start_ms": 4000.0 if cold else None, "billed_ms": int(latency_ms * 0.7) if ok else 0,
        "images": images if ok else 0, "server_ms": server, "queue_ms": 5.5 if ok else None,
        "load_ms": (1500.0 if cold else 0.0) if ok else None, "gen_ms": server * 0.9 if ok else None,
        "encode_ms": 12.25 if ok else None, "fc_request_id": f"req-{i}", "simulated": False,
    }


def _rows():
    """Two levels: 20 requests at 1/s from 0 s (the first two cold, one transport error), then 40 at 2/s from
    20 s (three 429s, some two-image answers)."""
    rows = []
    for i in range(20):
        cold = i < 2
        latency = 6500.0 + 100 * i if cold else 800.0 + 37 * (i % 7)
        rows.append(_row(i, "rate=1", float(i), latency, cold=cold, connect=1.5 if i % 5 == 0 else None,
                         status=0 if i == 9 else 200))
    for k in range(40):
        i = 20 + k
        status = 429 if k in (3, 17, 31) else 200
        rows.append(_row(i, "rate=2", 20.0 + k * 0.5, 5.0 if status == 429 else 900.0 + 53 * (k % 9),
                         status=status, images=2 if k % 4 == 0 else 1))
    return rows


def _instances():
    return [
        {"name": "i-0", "kind": "simulated", "provisioned": True, "spawned_s": 0.0, "ready_s": 1.25,
         "stopped_s": None, "start_ms": 1000.0, "initialize_ms": 250.0, "requests": 30, "busy_s": 28.5},
        {"name": "i-1", "kind": "simulated", "provisioned": False, "spawned_s": 0.5, "ready_s": 4.5,
         "stopped_s": 50.0, "start_ms": 3500.0, "initialize_ms": 500.0, "requests": 20, "busy_s": 19.0},
        {"name": "i-2", "kind": "simulated", "provisioned": False, "spawned_s": 21.0, "ready_s": 25.0,
         "stopped_s": None, "start_ms": 3500.0, "initialize_ms": None, "requests": 7, "busy_s": 6.125},
        {"name": "i-3", "kind": "simulated", "provisioned": False, "spawned_s": 30.0, "ready_s": None,
         "stopped_s": 32.0, "start_ms": None, "initialize_ms": None, "requests": 0, "busy_s": 0.0},
    ]


def _meta(scenario, simulated, **more):
    return {"scenario": scenario, "target": "simulation" if simulated else "local emulator", "simulated": simulated,
            "started_at": "2025-01-01T00:00:00+00:00", "command": f"python -m bench {scenario}",
            "duration_s": DURATION, "config": {"emulator": {"simulate": "fc-gpu-a10", "profile_source": {"device": "A10", "date": "2025-01-01"}}}
            if simulated else {}, **more}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A simulated coldstart run and a real autoscale run (step at 20 s) of the same data."""
    root = tmp_path_factory.mktemp("runs")
    cold = _meta("coldstart", True, offered=[{"level": "rate=1", "rate_rps": 1.0, "duration_s": 20.0}])
    auto = _meta("autoscale", False, step_at_s=20.0)
    extra = {"server_cold_start": {"load_ms": 1500.0}}
    write_run(root / "cold", cold, _rows(), _instances(), extra=extra)
    write_run(root / "auto" / "nested", auto, _rows(), _instances())
    return root / "cold", root / "auto" / "nested"


def _csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(text):
    return None if text == "" else float(text)


@pytest.mark.parametrize("which", [0, 1])
def test_files_exist_and_charts_are_small_pngs(runs, which):
    run = runs[which]
    for name in ("requests.csv", "instances.csv", "timeseries.csv", "summary.json", "summary.md",
                 "latency.png", "throughput.png", "cdf.png"):
        assert (run / name).is_file(), name
    for name in ("latency.png", "throughput.png", "cdf.png"):
        with Image.open(run / name) as image:
            assert image.format == "PNG" and image.width > 100
            image.verify()
        assert (run / name).stat().st_size < 150_000
    with (run / "requests.csv").open(newline="") as f:
        assert tuple(next(csv.reader(f))) == ROW_FIELDS


def test_simulation_is_marked_exactly_when_simulated(runs):
    cold_md, auto_md = ((run / "summary.md").read_text() for run in runs)
    assert cold_md.splitlines()[0].startswith("**SIMULATION**") and "fc-gpu-a10" in cold_md.splitlines()[0]
    assert "SIMULATION" not in auto_md
    assert "python -m bench autoscale" in auto_md and "local emulator" in auto_md


def test_summary_numbers_equal_the_raw_csv(runs):
    for run in runs:
        doc = json.loads((run / "summary.json").read_text())
        summary, meta = doc["summary"], doc["meta"]
        raw = _csv(run / "requests.csv")
        ok = [r for r in raw if r["ok"] == "1"]
        latency = np.array([float(r["latency_ms"]) for r in ok])
        p50, p95, p99 = np.percentile(latency, [50, 95, 99])
        overall = summary["overall"]
        assert overall["latency_p50_ms"] == pytest.approx(p50, abs=1e-3)
        assert overall["latency_p95_ms"] == pytest.approx(p95, abs=1e-3)
        assert overall["latency_p99_ms"] == pytest.approx(p99, abs=1e-3)
        assert overall["count"] == len(raw) == 60
        assert overall["throttled"] == sum(r["status"] == "429" for r in raw) == 3
        assert overall["errors"] == sum(r["ok"] == "0" and r["status"] != "429" for r in raw) == 1
        assert overall["images"] == sum(int(r["images"]) for r in ok)

        assert [lvl["level"] for lvl in summary["levels"]] == ["rate=1", "rate=2"]
        for lvl in summary["levels"]:
            mine = [r for r in raw if r["level"] == lvl["level"]]
            images = sum(int(r["images"]) for r in mine if r["ok"] == "1")
            offered = {o["level"]: o["duration_s"] for o in meta.get("offered") or ()}
            window = offered.get(lvl["level"]) or (max(float(r["intended_s"]) for r in mine)
                                                   - min(float(r["intended_s"]) for r in mine))
            assert lvl["images_per_s"] == pytest.approx(images / window, abs=1e-3)
            lat = [float(r["latency_ms"]) for r in mine if r["ok"] == "1"]
            assert lvl["latency_p99_ms"] == pytest.approx(np.percentile(lat, 99), abs=1e-3)
        # offered: from meta when given, else the schedule: 40 requests 0.5 s apart = 2/s
        assert summary["levels"][1]["offered_rps"] == pytest.approx(2.0)
        assert summary["levels"][0]["offered_rps"] == pytest.approx(1.0)

        inst = _csv(run / "instances.csv")
        end = meta["duration_s"]
        alive = sum((_num(i["stopped_s"]) or end) - float(i["spawned_s"]) for i in inst)
        busy = sum(float(i["busy_s"]) for i in inst)
        billed = sum(int(r["billed_ms"]) for r in ok) / 1000
        seconds = summary["instance_seconds"]
        assert seconds["alive_s"] == pytest.approx(alive, abs=1e-3) and alive == pytest.approx(60 + 49.5 + 39 + 2)
        assert seconds["busy_s"] == pytest.approx(busy, abs=1e-3)
        assert seconds["alive_per_image_s"] == pytest.approx(alive / overall["images"], abs=1e-3)
        assert seconds["billed_s"] == pytest.approx(billed, abs=1e-3)
        assert seconds["billed_over_alive"] == pytest.approx(billed / alive, abs=1e-3)
        assert summary["cold_starts"] == 4 and summary["provisioned"] == 1


def test_coldstart_split_and_step_numbers(runs):
    cold_summary = json.loads((runs[0] / "summary.json").read_text())
    auto_summary = json.loads((runs[1] / "summary.json").read_text())["summary"]
    assert cold_summary["server_cold_start"] == {"load_ms": 1500.0}  # extra lands at the top level
    split = cold_summary["summary"]["coldstart"]
    raw = _csv(runs[0] / "requests.csv")
    cold_ok = [r for r in raw if r["platform_start_ms"] and r["ok"] == "1"]
    warm_ok = [r for r in raw if not r["platform_start_ms"] and r["cold_start"] == "0" and r["ok"] == "1"]
    assert split["cold"]["ok"] == 2 and split["warm"]["ok"] == len(warm_ok) == 54
    assert split["cold"]["platform_start_ms"] == 4000.0 and split["cold"]["load_ms"] == 1500.0
    other = [float(r["latency_ms"]) - float(r["connect_ms"] or 0) - float(r["platform_start_ms"])
             - float(r["server_ms"]) for r in cold_ok]
    assert split["cold"]["other_ms"] == pytest.approx(np.median(other), abs=1e-3)
    warm_p50 = np.median([float(r["latency_ms"]) for r in warm_ok])
    cold_p50 = np.median([float(r["latency_ms"]) for r in cold_ok])
    assert split["cold_over_warm_p50"] == pytest.approx(cold_p50 / warm_p50, abs=1e-3)
    assert auto_summary["coldstart"] is None
    assert auto_summary["last_scale_out_s"] == 10.0  # i-3 spawned at 30 s, the step at 20 s
    assert "catch_up_s" in auto_summary and "## Load step" in (runs[1] / "summary.md").read_text()


def test_read_run_reproduces_the_summary(runs):
    for run in runs:
        meta, rows, instances = read_run(run)
        assert summarize(rows, instances, meta) == json.loads((run / "summary.json").read_text())["summary"]
        assert rows[9]["connect_ms"] is None and rows[9]["status"] == 0 and rows[9]["ok"] is False
        assert rows[0]["connect_ms"] == 1.5 and rows[0]["cold_start"] is True and rows[0]["id"] == 0
        assert instances[0]["stopped_s"] is None and instances[3]["ready_s"] is None


def test_timeseries_counts_every_request_once(runs):
    rows, instances = _rows(), _instances()
    series = timeseries(rows, instances, DURATION)
    assert len(series) == 60 and [s["t"] for s in series[:3]] == [0.0, 1.0, 2.0]
    assert sum(s["arrivals"] for s in series) == len(rows)
    assert sum(s["completions"] for s in series) == len(rows)
    assert sum(s["ok"] + s["errors"] + s["throttled"] for s in series) == len(rows)
    assert sum(s["cold_starts"] for s in series) == 4
    # counted at each bin's end: i-3 lives from 30 to 32 s and is never ready; i-1 is ready at 4.5 s
    assert series[30]["instances_alive"] == 4 and series[31]["instances_alive"] == 3
    assert series[30]["instances_ready"] == 3 and series[2]["instances_ready"] == 1
    # a done time past the run's end gets its own bin rather than being lost
    late = timeseries([_row(0, "x", 0.0, 3500.0)], [], 2.0)
    assert len(late) == 4 and late[3]["completions"] == 1 and late[0]["in_flight"] == 1
    written = _csv(runs[1] / "timeseries.csv")
    assert sum(int(s["arrivals"]) for s in written) == sum(int(s["completions"]) for s in written) == 60


def _series(arrivals, in_time):
    return [{"t": float(k), "arrivals": a, "in_time": i} for k, (a, i) in enumerate(zip(arrivals, in_time))]


def test_catch_up_on_a_hand_made_step():
    # 2/s until 10 s, then 6/s until 25 s. Requests sent before 10 s are all served in time; of those sent from
    # 10 s, none until the one sent at 14 s (cold starts), then all. 10 s windows ending at bin k: at k = 23 the
    # window 14..23 is all in time; at k = 22 (13..22) 54 of 60 = 90 %, which keeps pace; at k = 21 (12..21)
    # 48 of 60 does not: caught up at 22 s.
    arrivals = [2] * 10 + [6] * 15 + [0] * 5
    in_time = [2] * 10 + [0] * 4 + [6] * 11 + [0] * 5
    series = _series(arrivals, in_time)
    assert catch_up_s(series, 10.0) == 12.0
    assert catch_up_s(series, 10.5) == 11.5  # the first bin that starts at or after the step
    assert catch_up_s(series, 23.0) == 0.0
    assert catch_up_s(series, None) is None
    # never: half of what is sent after the step is refused or late, to the end of the load
    assert catch_up_s(_series(arrivals, [2] * 10 + [3] * 15 + [0] * 5), 10.0) is None
    # a steady system whose requests take 3 s keeps pace from the start: the same requests are counted
    assert catch_up_s(_series([2] * 30, [2] * 30), 10.0) == 0.0
    assert catch_up_s(_series([0] * 30, [0] * 30), 10.0) is None  # no load at all


def test_cold_requests_of_a_real_target_are_the_first_of_each_instance():
    rows = [{"instance": "a", "sent_s": 1.0, "platform_start_ms": None, "cold_start": False},
            {"instance": "a", "sent_s": 0.5, "platform_start_ms": None, "cold_start": False},
            {"instance": "b", "sent_s": 2.0, "platform_start_ms": None, "cold_start": False},
            {"instance": "", "sent_s": 0.1, "platform_start_ms": None, "cold_start": False}]
    assert cold_flags(rows) == [False, True, True, False]
    rows[0]["platform_start_ms"] = 10.0  # the emulator says which: only those
    assert cold_flags(rows) == [True, False, False, False]


def test_last_scale_out_and_percentile():
    assert last_scale_out_s(_instances(), 20.0) == 10.0
    assert last_scale_out_s(_instances(), 40.0) is None and last_scale_out_s(_instances(), None) is None
    assert percentile([], 50) is None and percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_compare_puts_runs_side_by_side(runs, tmp_path):
    cold, auto = runs
    faster = [dict(r, latency_ms=r["latency_ms"] / 2) for r in _rows() if r["level"] == "rate=2"]
    faster += [dict(_row(100, "rate=4", 60.0, 700.0))]
    write_run(tmp_path / "b", _meta("autoscale", False, step_at_s=20.0, duration_s=70.0), faster, _instances())
    text = compare(auto, tmp_path / "b")
    sa = json.loads((auto / "summary.json").read_text())["summary"]
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())["summary"]
    a50, b50 = sa["levels"][1]["latency_p50_ms"] / 1000, sb["levels"][0]["latency_p50_ms"] / 1000
    line = next(x for x in text.splitlines() if x.startswith("| p50 latency s @ rate=2 "))
    assert f"{a50:.3f}" in line and f"{b50:.3f}" in line and f"{b50 / a50:.2f}" in line
    assert "Levels only in A (unmatched): rate=1" in text and "Levels only in B (unmatched): rate=4" in text
    assert "SIMULATION" not in text
    marked = compare(cold, auto)
    assert "(SIMULATION)" in marked and "**SIMULATION**" in marked and "cold latency (median) ms" in marked
