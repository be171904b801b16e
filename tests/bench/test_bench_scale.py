"""bench/scale: the open-loop load, the local FC emulator with real gunicorn instances, simulated instances from
a recorded profile, and `python -m bench` end to end. Behaviour only: no bound on how fast anything ran is
asserted; times are compared with each other or with the sleeps they must contain (a sleep never ends early).
The tests that start gunicorn are marked `e2e`."""

import asyncio
import csv
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from bench.scale.emulator import EmulatorConfig, EmulatorThread
from bench.scale.load import Call, LoadConfig, Shape, arrivals, parse_server_timing, parse_shape, run_open_loop
from bench.scale.profile import Profile, shape_key
from bench.scale.scenarios import RequestSpec, default_instance_env
from tests.conftest import basic
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
SPEC = RequestSpec(size=64, steps=1)
BODY = SPEC.body(7)
LIFECYCLE = ["spawn", "health", "initialize", "initialized", "ready", "reclaim", "pre-stop", "stopped"]


# ---------------------------------------------------------------------------------------------------------
# load: schedules and the open loop


def test_shapes_parse_and_refuse():
    step = parse_shape("step:base=0,peak=2,at=5", 20)
    assert (step.rate(4.9), step.rate(5), step.step_at()) == (0, 2, 5)
    assert parse_shape("ramp:start=1,end=3", 10).rate(5) == pytest.approx(2)
    assert parse_shape("spike:base=1,peak=9,at=2,width=1", 10).rate(2.5) == 9
    diurnal = parse_shape("diurnal:mean=2,amplitude=0.5,period=10", 10)
    assert diurnal.rate(0) == pytest.approx(1) and diurnal.rate(5) == pytest.approx(3)
    for bad, needle in [("wave:rate=1", "one of"), ("step:base=0,peak=2", "takes"), ("constant:rate=x", "number"),
                        ("constant:rate=-1", ">= 0"), ("constant:rate", "key=value")]:
        with pytest.raises(ValueError, match=needle):
            parse_shape(bad, 10)


def test_arrivals_follow_the_rate():
    uniform = arrivals(Shape("constant", {"rate": 4}, 10), process="uniform")
    assert len(uniform) == 40 and all(b > a for a, b in zip(uniform, uniform[1:]))
    step = arrivals(Shape("step", {"base": 0, "peak": 5, "at": 4}, 10), process="uniform", start=100)
    assert len(step) == 30 and min(step) >= 104
    poisson = arrivals(Shape("constant", {"rate": 50}, 20), seed=3)
    assert 850 < len(poisson) < 1150 and poisson == arrivals(Shape("constant", {"rate": 50}, 20), seed=3)
    gaps = [b - a for a, b in zip(poisson, poisson[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.1)
    assert len(arrivals(Shape("constant", {"rate": 50}, 20), max_requests=7)) == 7


def test_server_timing_parse():
    assert parse_server_timing("queue;dur=1.5, gen;dur=523.2, cache;desc=hit, total;dur=530") == {
        "queue": 1.5, "gen": 523.2, "total": 530.0}
    assert parse_server_timing(None) == {}


def test_open_loop_measures_from_the_intended_time():
    """One connection and a server that takes 0.3 s: requests queue on the client, and their latency counts
    the wait from their intended send time (a closed loop would hide it: coordinated omission)."""
    from aiohttp import web

    async def slow(request):
        await asyncio.sleep(0.3)
        return web.json_response({"images": ["x"]}, headers={"X-Instance-Id": "s1", "Server-Timing": "gen;dur=300"})

    async def main():
        app = web.Application()
        app.router.add_post("/sdapi/v1/txt2img", slow)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            cfg = LoadConfig(f"http://127.0.0.1:{port}", max_connections=1, timeout_s=10, drain_s=10)
            schedule = [(i * 0.05, Call("/sdapi/v1/txt2img", {}, "x")) for i in range(5)]
            return await run_open_loop(cfg, schedule)
        finally:
            await runner.cleanup()

    rows = asyncio.run(main())
    assert [r["ok"] for r in rows] == [True] * 5
    assert [r["gen_ms"] for r in rows] == [300.0] * 5 and rows[0]["instance"] == "s1"
    ahead, last = rows[-2], rows[-1]
    # the fifth waited for four 0.3 s answers on the one connection: ~1.5 s from its intended time
    assert last["latency_ms"] > 1200
    # it was sent on time, before the answer it queued behind (a closed loop would send it only after that):
    # the wait was for the connection, and its latency counts it
    assert last["sent_s"] < ahead["done_s"] < last["done_s"]
    assert last["latency_ms"] == pytest.approx((last["done_s"] - last["intended_s"]) * 1000)
    assert rows[0]["connect_ms"] is not None


# ---------------------------------------------------------------------------------------------------------
# the emulator with real gunicorn instances


def _instance_routes(home: Path) -> list[tuple[str, int]]:
    routes = []
    for line in (home / "server.log").read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == "sdfunc.request":
            routes.append((entry["route"], entry["status"]))
    return routes


@pytest.mark.e2e
def test_emulator_scales_out_throttles_and_reclaims_real_instances(data_dir, tmp_path):
    """Two concurrent requests start two gunicorn instances (auth on: the lifecycle hooks use the instance's
    key); a third at the maximum gets 429; idle instances get pre-stop and are stopped, back to zero; the next
    request scales from zero again."""
    cfg = EmulatorConfig(max_instances=2, idle_timeout_s=1.5, data=data_dir, workdir=tmp_path)
    cfg.instance_env = {**default_instance_env(cfg, SPEC), "SDFUNC_AUTH__MODE": "basic",
                        "SDFUNC_AUTH__USERS": "alice:secret-pw"}
    auth = basic("alice", "secret-pw")
    with EmulatorThread(cfg) as emu:
        url = emu.url + "/sdapi/v1/txt2img"
        results: dict[int, requests.Response] = {}

        def send(i: int) -> None:
            results[i] = requests.post(url, json={**BODY, "seed": i}, headers=auth, timeout=300)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: emu.state()["alive"] == 2, 30, "two instances")
        throttled = requests.post(url, json=BODY, headers=auth, timeout=30)
        for t in threads:
            t.join()
        assert throttled.status_code == 429 and throttled.json()["ErrorCode"] == "ResourceThrottled"
        assert throttled.headers["x-fc-request-id"]
        assert [results[i].status_code for i in range(2)] == [200, 200], results[0].text[:300]
        assert results[0].headers["X-Instance-Id"] != results[1].headers["X-Instance-Id"]
        for r in results.values():
            assert float(r.headers["X-Fc-Emulator-Start-Ms"]) > 0 and r.headers["x-fc-request-id"]
            assert "gen;dur=" in r.headers["Server-Timing"] and int(r.headers["X-Billed-Duration-Ms"]) > 0
        unauthenticated = requests.post(url, json=BODY, timeout=120)
        assert unauthenticated.status_code == 401  # the function's own auth, through the emulator

        wait_for(lambda: emu.state()["alive"] == 0, 90, "reclaim to zero")
        state = emu.state()
        assert state["counters"]["reclaimed"] == 2 and state["counters"]["throttled"] == 1
        events = emu.events()
        for name in ("i1", "i2"):
            mine = [e["event"] for e in events if e["instance"] == name]
            assert mine == LIFECYCLE, mine
        for name in ("i1", "i2"):
            routes = [r for r in _instance_routes(tmp_path / name) if r[0] != "/health"]
            assert routes[0] == ("/initialize", 200) and routes[-1] == ("/pre-stop", 200), routes
            assert ("/sdapi/v1/txt2img", 200) in routes[1:-1]

        again = requests.post(url, json=BODY, headers=auth, timeout=300)
        assert again.status_code == 200 and float(again.headers["X-Fc-Emulator-Start-Ms"]) > 0
        assert emu.state()["counters"]["spawned"] == 3
    # leaving the context stops the last instance with pre-stop too
    assert [e["event"] for e in emu.emulator.events if e["instance"] == "i3"][-2:] == ["pre-stop", "stopped"]


# ---------------------------------------------------------------------------------------------------------
# simulated instances


def _profile(gen_ms: list[float], overhead_ms: list[float] | None = None) -> Profile:
    return Profile(name="synthetic", source={"device": "test"}, start_ms=[300.0], initialize_ms=[100.0],
                   generation={shape_key(BODY): {"gen_ms": gen_ms, "overhead_ms": overhead_ms or [10.0]}})


def _send(url: str, times: list[float], body=BODY) -> list[dict]:
    schedule = [(t, Call("/sdapi/v1/txt2img", {**body, "seed": i}, "x")) for i, t in enumerate(times)]
    return asyncio.run(run_open_loop(LoadConfig(url, timeout_s=30, drain_s=30), schedule))


def test_simulation_reproduces_the_profile_median():
    gen = [float(x) for x in range(100, 301, 10)]  # median 200 ms
    cfg = EmulatorConfig(max_instances=20, idle_timeout_s=60, simulate=_profile(gen), seed=1)
    with EmulatorThread(cfg) as emu:
        rows = _send(emu.url, arrivals(Shape("constant", {"rate": 20}, 6), process="uniform"))
        state = emu.state()
    ok = [r for r in rows if r["ok"]]
    assert len(ok) == len(rows) == 120 and all(r["simulated"] for r in ok)
    warm = [r for r in ok if r["platform_start_ms"] is None]
    assert statistics.median(r["gen_ms"] for r in ok) == pytest.approx(200, rel=0.1)  # the draws, not timings
    # a warm request's time at the server holds its draw plus the 10 ms overhead, and it queued on nothing: a
    # wait behind another request on its instance would be at least that one's draw (>= 100 ms)
    assert warm and all(r["service_ms"] >= r["gen_ms"] + 10 for r in warm)
    assert all(r["queue_ms"] < min(gen) for r in warm)
    assert state["counters"]["throttled"] == 0 and all(i["kind"] == "simulated" for i in state["instances"])
    cold = [r for r in ok if r["platform_start_ms"] is not None]
    assert cold and all(r["platform_start_ms"] >= 390 for r in cold)  # start 300 + initialize 100


def test_simulation_throttles_at_max_and_keeps_provisioned():
    cfg = EmulatorConfig(max_instances=2, provisioned=1, instance_concurrency=2, idle_timeout_s=0.3,
                         simulate=_profile([400.0]))
    with EmulatorThread(cfg) as emu:
        wait_for(lambda: emu.state()["instances"][0]["state"] == "ready", 10, "the provisioned instance")
        rows = _send(emu.url, [0.0] * 6)
        assert sorted(r["status"] for r in rows) == [200, 200, 200, 200, 429, 429]
        by_instance = {}
        for r in rows:
            if r["ok"]:
                by_instance[r["instance"]] = by_instance.get(r["instance"], 0) + 1
        assert sorted(by_instance.values()) == [2, 2]  # instance concurrency 2: each took two
        wait_for(lambda: emu.state()["alive"] == 1, 10, "the on-demand instance reclaimed")
        assert [i["state"] for i in emu.state()["instances"]] == ["ready", "stopped"]
        other = _send(emu.url, [0.0], body={**BODY, "width": 128})
        assert other[0]["status"] == 422 and other[0]["error"] == "422 shape_not_in_profile"


def test_a_starting_instance_is_not_busy_until_ready():
    """Busy time (what FC bills an on-demand instance by request) starts when the instance is ready, not
    when the first request was routed to it while it started."""
    cfg = EmulatorConfig(max_instances=1, idle_timeout_s=60, simulate=_profile([100.0], [0.0]))
    with EmulatorThread(cfg) as emu:
        (row,) = _send(emu.url, [0.0])
        answered = time.monotonic()  # the emulator's clock: it runs in this process
        (instance,) = emu.state()["instances"]
    assert row["ok"] and row["platform_start_ms"] >= 390
    assert instance["busy_s"] >= 0.09  # the 100 ms generation is busy time...
    assert instance["busy_s"] <= answered - instance["ready"]  # ...the 400 ms start before "ready" is not


# ---------------------------------------------------------------------------------------------------------
# python -m bench, end to end


def _bench(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


@pytest.mark.e2e
def test_cli_coldstart_local_then_simulated_autoscale_and_compare(data_dir, tmp_path):
    cold_dir = tmp_path / "cold"
    done = _bench("coldstart", "--local", "--data", str(data_dir), "--reps", "2", "--warm", "1", "--size", "64",
                  "--steps", "1", "--out", str(cold_dir), "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("requests.csv", "instances.csv", "timeseries.csv", "summary.json", "summary.md", "latency.png",
                 "throughput.png", "cdf.png", "profile.json"):
        assert (cold_dir / name).is_file(), name
    result = json.loads((cold_dir / "summary.json").read_text())
    assert result["meta"]["scenario"] == "coldstart" and not result["meta"]["simulated"]
    assert result["really_cold"] == [True, True]
    assert [b["cold_start"]["complete"] for b in result["cold_start_breakdown"]] == [True, True]
    with open(cold_dir / "requests.csv", newline="") as fh:
        raw = list(csv.DictReader(fh))
    assert len(raw) == 4 and [r["level"] for r in raw] == ["cold", "warm", "cold", "warm"]
    latency = [float(r["latency_ms"]) for r in raw if r["ok"] == "1"]
    overall = result["summary"]["overall"]
    assert overall["latency_p50_ms"] == pytest.approx(float(np.percentile(latency, 50)), abs=1e-3)
    assert overall["ok"] == 4 and overall["images"] == sum(int(r["images"]) for r in raw)
    billed = sum(int(r["billed_ms"]) for r in raw) / 1000
    assert result["summary"]["instance_seconds"]["billed_s"] == pytest.approx(billed, abs=1e-3)
    cold_rows = [r for r in raw if r["level"] == "cold"]
    assert all(float(r["platform_start_ms"]) > 0 for r in cold_rows)
    assert all(r["platform_start_ms"] == "" for r in raw if r["level"] == "warm")
    recomputed = _bench("report", str(cold_dir), cwd=tmp_path)
    assert recomputed.returncode == 0, recomputed.stderr[-2000:]
    assert json.loads((cold_dir / "summary.json").read_text()) == result
    profile = Profile.load(cold_dir / "profile.json")
    assert len(profile.start_ms) == 2 and len(profile.generation[shape_key(BODY)]["gen_ms"]) == 4

    sim_dir = tmp_path / "sim"
    done = _bench("autoscale", "--local", "--simulate", str(cold_dir / "profile.json"), "--shape",
                  "step:base=0,peak=10,at=1", "--duration", "4", "--max-instances", "50", "--size", "64", "--steps",
                  "1", "--out", str(sim_dir), "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sim = json.loads((sim_dir / "summary.json").read_text())
    assert sim["meta"]["simulated"] and "SIMULATION" in (sim_dir / "summary.md").read_text()
    assert sim["summary"]["overall"]["ok"] > 10 and sim["meta"]["step_at_s"] is not None

    compared = _bench("compare", str(cold_dir), str(sim_dir), cwd=tmp_path)
    assert compared.returncode == 0 and "SIMULATION" in compared.stdout.upper()


def test_cli_refuses_bad_arguments(tmp_path):
    profile = tmp_path / "p.json"
    _profile([100.0]).save(profile)  # samples for 64x64@1*1 only
    for args, needle in [(["coldstart"], "--target"), (["coldstart", "--target", "ftp://x"], "http(s)"),
                         (["autoscale", "--local", "--simulate", str(tmp_path / "none.json")], "no file"),
                         (["autoscale", "--local", "--simulate", str(profile)], "no samples for 256x256@8*1"),
                         (["autoscale", "--local", "--shape", "diurnal:mean=1,amplitude=0.5,period=0"], "period"),
                         (["coldstart", "--local", "--reps", "0"], "--reps: must be > 0"),
                         (["coldstart", "--local", "--provisioned", "1"], "--provisioned must be 0"),
                         (["throughput", "--local", "--rates", "0,1"], "> 0")]:
        done = _bench(*args, cwd=tmp_path, timeout=60)
        assert done.returncode == 2 and needle in done.stderr, (args, done.stderr[-500:])
