"""End to end through gunicorn: warm start (STARTING -> READY, /initialize), requests during warm-up, the
cold-start breakdown, Prometheus metrics that count exactly, the request log, and a draining pre-stop."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import pytest
import requests

from tests.support.serving import ServeProcess, metric, metric_samples
from tests.support.waiting import wait_for

PHASES = {"process_to_app", "imports", "device_init", "read_weights", "to_device", "first_generation", "prefetch"}
LOG_FIELDS = {"request_id", "instance_id", "method", "route", "status", "error", "consumer", "cold_start", "mode",
              "checkpoint", "width", "height", "steps", "images", "queue_wait_seconds", "model_load_seconds",
              "generation_seconds", "encode_seconds", "total_seconds", "billed_ms"}
SECRET_PROMPT = "a zebra-secret-prompt-7731 on a hill"
SMALL = {"prompt": SECRET_PROMPT, "steps": 1, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler"}
# A warm-up long enough (a few seconds on this CPU) that the test sees it happen.
SLOW_WARMUP = '["sd1:512x512@6"]'


@pytest.fixture(scope="module")
def models(tmp_path_factory, data_dir):
    """A data root per server, each with copies of the session's demo checkpoints (no rebuild)."""

    def fresh() -> object:
        root = tmp_path_factory.mktemp("lifecycle")
        shutil.copytree(data_dir / "models" / "Stable-diffusion", root / "models" / "Stable-diffusion")
        return root

    return fresh


def _txt2img(server: ServeProcess, body: dict, **headers: str) -> requests.Response:
    return requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=headers, timeout=180)


def _scrape(server: ServeProcess) -> dict:
    r = requests.get(f"{server.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    return metric_samples(r.text)


def _request_lines(server: ServeProcess, request_ids: set[str]) -> list[dict]:
    """The request log lines of `request_ids`, once there is one for each (a line is written after its answer)."""
    def lines() -> list[dict]:
        return [e for e in server.log_entries() if e["logger"] == "sdfunc.request" and e["request_id"] in request_ids]

    wait_for(lambda: len(lines()) >= len(request_ids), 10, lambda: f"request log lines for {sorted(request_ids)}, "
             f"found {sorted(e['request_id'] for e in lines())}")
    return lines()


def test_warm_start_metrics_request_log_and_pre_stop(models):
    server = ServeProcess(models(), SDFUNC_WARMUP__SHAPES=SLOW_WARMUP)
    try:
        # A fresh server answers liveness at once and says STARTING while it warms up.
        first = server.wait_answering()
        assert first["status"] == "STARTING" and first["loaded_models"] == []
        assert first["cold_start"]["complete"] is False
        ready = requests.get(f"{server.url}/healthz", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "STARTING" and ready.headers["Retry-After"]

        # A request during the warm-up waits for it (the default) and says it met a cold instance.
        early = _txt2img(server, SMALL, **{"x-fc-request-id": "during-warmup"})
        assert early.status_code == 200, early.text
        assert early.headers["X-Cold-Start"] == "true"
        instance = early.headers["X-Instance-Id"]
        assert instance

        health = server.wait_state("READY")
        assert any(t.startswith("demo-sd15.safetensors") for t in health["loaded_models"])
        ready = requests.get(f"{server.url}/healthz", timeout=5)
        assert ready.status_code == 200 and ready.headers["X-Instance-Id"] == instance
        cold = ready.json()["cold_start"]
        assert cold["complete"] is True and set(cold["phases"]) == PHASES
        assert all(v >= 0 for v in cold["phases"].values())
        # The foreground phases are disjoint parts of the total; the prefetch ran behind them (the master read
        # and hashed demo-sd15 while it imported the runtime, before it forked this worker).
        foreground = sum(v for k, v in cold["phases"].items() if k != "prefetch")
        assert cold["critical_path_seconds"] == pytest.approx(foreground, abs=0.01)
        assert foreground <= cold["total_seconds"] + 0.05
        assert 0 < cold["overlapped_seconds"] <= cold["phases"]["prefetch"]
        assert "imported the runtime (sd1)" in server.log_path.read_text()
        assert any(e["msg"].startswith("prefetched demo-sd15.safetensors") for e in server.log_entries())

        # /initialize after the warm-up (twice): nothing loads again.
        for _ in range(2):
            init = requests.post(f"{server.url}/initialize", headers=server.hook_headers(), timeout=120)
            assert init.status_code == 200 and init.json()["warmed"] is False
            assert init.json()["cold_start"] == cold
            assert [g["width"] for g in init.json()["checkpoints"][0]["generations"]] == [512]
        before = _scrape(server)
        assert metric(before, "sdfunc_pipeline_cache_loads_total") == 1
        assert metric(before, "sdfunc_cold_starts_total") == 1
        assert metric(before, "sdfunc_state", state="READY") == 1

        # Metrics move by exactly what N requests did.
        ids = {f"metrics-{i}" for i in range(3)}
        for rid in sorted(ids):
            r = _txt2img(server, {**SMALL, "batch_size": 2}, **{"x-fc-request-id": rid})
            assert r.status_code == 200 and r.headers["X-Cold-Start"] == "false"
        bad = _txt2img(server, {**SMALL, "steps": -1}, **{"x-fc-request-id": "metrics-bad"})
        assert bad.status_code == 422
        after = _scrape(server)
        route = {"route": "/sdapi/v1/txt2img", "method": "POST"}

        def delta(name: str, **labels: str) -> float:
            return metric(after, name, **labels) - metric(before, name, **labels)

        assert delta("sdfunc_requests_total", status="200", **route) == 3
        assert delta("sdfunc_requests_total", status="422", **route) == 1
        assert delta("sdfunc_images_generated_total", mode="txt2img") == 6
        assert delta("sdfunc_generation_seconds_count", mode="txt2img") == 3
        assert delta("sdfunc_request_duration_seconds_count", route="/sdapi/v1/txt2img") == 4
        assert delta("sdfunc_pipeline_cache_hits_total") == 3 and delta("sdfunc_pipeline_cache_loads_total") == 0
        assert metric(after, "sdfunc_pipeline_cache_bytes") > 1_000_000
        assert metric(after, "sdfunc_requests_in_flight") == 1  # the scrape itself

        # One request log line per request, every field, billed = device time, never the prompt.
        lines = _request_lines(server, ids | {"metrics-bad", "during-warmup"})
        by_id = {line["request_id"]: line for line in lines}
        assert set(by_id) == ids | {"metrics-bad", "during-warmup"}
        for rid in ids:
            line = by_id[rid]
            assert LOG_FIELDS <= set(line), LOG_FIELDS - set(line)
            assert line["instance_id"] == instance and line["status"] == 200 and line["cold_start"] is False
            assert (line["checkpoint"], line["width"], line["height"], line["steps"], line["images"]) == (
                "demo-sd15.safetensors", 64, 64, 1, 2)
            assert line["model_load_seconds"] is None and line["queue_wait_seconds"] >= 0
            assert line["billed_ms"] >= line["generation_seconds"] * 1000 > 0
        billed = sum(by_id[rid]["billed_ms"] for rid in ids) / 1000
        assert delta("sdfunc_billed_seconds_total") == pytest.approx(billed, abs=1e-9)
        assert by_id["metrics-bad"]["billed_ms"] == 0 and by_id["metrics-bad"]["error"] == "invalid_request"
        assert by_id["during-warmup"]["cold_start"] is True and by_id["during-warmup"]["queue_wait_seconds"] > 0
        assert SECRET_PROMPT.split()[1] not in server.log_path.read_text()

        # Pre-stop drains a slow request that started before it, and refuses new work meanwhile.
        done: dict[str, requests.Response] = {}
        in_flight_after_stop: list[int] = []

        def slow() -> None:
            done["slow"] = _txt2img(server, {**SMALL, "width": 512, "height": 512, "steps": 10})

        def stop() -> None:
            done["stop"] = requests.get(f"{server.url}/pre-stop", headers=server.hook_headers(), timeout=180)
            # what the server has in flight the moment pre-stop has answered
            in_flight_after_stop.append(requests.get(f"{server.url}/health", timeout=5).json()["in_flight"])

        worker = threading.Thread(target=slow)
        worker.start()
        wait_for(lambda: requests.get(f"{server.url}/health", timeout=5).json()["in_flight"] >= 1, 30,
                 "the slow request to start")
        stopper = threading.Thread(target=stop)
        stopper.start()
        server.wait_state("STOPPING", timeout=30)
        refused = _txt2img(server, SMALL)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        assert refused.headers["Retry-After"] == "5"
        worker.join(180)
        stopper.join(180)
        slow_response, stop_response = done["slow"], done["stop"]
        assert slow_response.status_code == 200 and len(slow_response.json()["images"]) == 1
        body = stop_response.json()
        assert stop_response.status_code == 200 and body["drained"] is True and body["released_models"] == 1
        assert body["waited_for"] == 1  # pre-stop began while the slow request ran...
        assert in_flight_after_stop == [0]  # ...and answered once it was served
        assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 503
        assert requests.get(f"{server.url}/health", timeout=5).json()["loaded_models"] == []
    finally:
        server.stop()


def test_requests_during_warm_up_can_be_refused(models):
    server = ServeProcess(models(), SDFUNC_WARMUP__SHAPES=SLOW_WARMUP, SDFUNC_WARMUP__REQUESTS_WAIT="false",
                          SDFUNC_WARMUP__RETRY_AFTER="7")
    try:
        first = server.wait_answering()
        assert first["status"] == "STARTING" and first["loaded_models"] == []
        r = _txt2img(server, SMALL)
        assert r.status_code == 503 and r.headers["Retry-After"] == "7"
        assert r.json()["error"]["code"] == "not_ready" and "warming up" in r.json()["error"]["message"]
        assert r.headers["X-Cold-Start"] == "true"
        assert requests.get(f"{server.url}/sdapi/v1/sd-models", timeout=10).status_code == 200  # only generation waits
        server.wait_state("READY")
        assert _txt2img(server, SMALL).status_code == 200
    finally:
        server.stop()


def test_cold_request_without_warm_up_then_initialize_loads_nothing(models, tmp_path):
    """Warm-up off: the first request pays the cold start and says so; /initialize later loads nothing again.
    Metrics run in prometheus_client's multiprocess mode here (PROMETHEUS_MULTIPROC_DIR), as with several
    workers."""
    server = ServeProcess(models(), SDFUNC_WARMUP__ON_START="false", SDFUNC_WARMUP__SHAPES='["64x64@1"]',
                          PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    try:
        health = server.wait_answering()
        assert health["status"] == "READY" and health["cold_start"]["complete"] is False
        first = _txt2img(server, SMALL, **{"x-fc-request-id": "cold-1"})
        second = _txt2img(server, SMALL, **{"x-fc-request-id": "warm-2"})
        assert first.status_code == second.status_code == 200
        assert first.headers["X-Cold-Start"] == "true" and second.headers["X-Cold-Start"] == "false"
        assert first.json()["images"] == second.json()["images"]
        lines = {e["request_id"]: e for e in _request_lines(server, {"cold-1", "warm-2"})}
        assert lines["cold-1"]["model_load_seconds"] > 0 and lines["warm-2"]["model_load_seconds"] is None
        cold = requests.get(f"{server.url}/healthz", timeout=5).json()["cold_start"]
        assert cold["complete"] is True and set(cold["phases"]) == PHASES
        for expected in (True, False):
            init = requests.post(f"{server.url}/initialize", headers=server.hook_headers(), timeout=120).json()
            assert init["warmed"] is expected and init["cold_start"] == cold
        samples = _scrape(server)
        assert metric(samples, "sdfunc_pipeline_cache_loads_total") == 1
        assert metric(samples, "sdfunc_requests_total", route="/sdapi/v1/txt2img", method="POST", status="200") == 2
        assert metric(samples, "sdfunc_images_generated_total", mode="txt2img") == 2
        assert any(tmp_path.iterdir())  # the multiprocess files

        # The master imported the runtime before it forked (warmup.preimport, on by default): a worker that
        # replaces a dead one starts with torch and diffusers in memory, and serves the same image.
        assert _maps_torch(server.proc.pid)
        dead = server.worker_pid()
        os.kill(dead, signal.SIGKILL)
        server.worker_pid(other_than=dead)
        server.wait_state("READY")
        again = _txt2img(server, SMALL, **{"x-fc-request-id": "after-respawn"})
        assert again.status_code == 200 and again.json()["images"] == first.json()["images"]
        assert again.headers["X-Cold-Start"] == "true"  # a new process: its own cold start
        cold = requests.get(f"{server.url}/healthz", timeout=5).json()["cold_start"]
        assert cold["complete"] is True and "prefetch" not in cold["phases"]  # the prefetch was the first's
    finally:
        server.stop()


def _maps_torch(pid: int) -> bool:
    """Whether process `pid` has libtorch mapped: it imported torch."""
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


def test_a_broken_default_checkpoint_fails_the_warm_up_cleanly_after_its_prefetch(models):
    """The prefetch only reads bytes: a default checkpoint that cannot load is found out by the load, which
    fails the warm-up as before (FAILED, the cause logged). With `warmup.preimport` off the master imports
    nothing heavy (the worker does)."""
    root = models()
    good = root / "models" / "Stable-diffusion" / "demo-sd15.safetensors"
    (root / "models" / "Stable-diffusion" / "broken.safetensors").write_bytes(good.read_bytes()[:4096])
    server = ServeProcess(root, SDFUNC_DEFAULT_CHECKPOINT="broken", SDFUNC_WARMUP__SHAPES='["64x64@1"]',
                          SDFUNC_WARMUP__PREIMPORT="false")
    try:
        failed = server.wait_state("FAILED")
        assert failed["cold_start"]["complete"] is False
        entries = server.log_entries()
        assert any(e["msg"].startswith("prefetched broken.safetensors") for e in entries)
        assert any(e["msg"] == "warm-up failed" for e in entries)
        assert server.proc.poll() is None and not _maps_torch(server.proc.pid)
        assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 503
    finally:
        server.stop()
