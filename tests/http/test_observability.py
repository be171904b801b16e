"""Warm-up settings and behaviour, the cold-start breakdown, health, metrics and the request log, in process
(the gunicorn path is in test_e2e_lifecycle.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.conftest import device_held, hook_headers, make_settings
from tests.support.serving import metric, metric_samples
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
SMALL = {"prompt": "a quiet lake", "steps": 1, "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler"}


def _app(data_dir, **overrides):
    from handler.app import create_app

    return create_app(make_settings(data_dir, **overrides))


# settings -------------------------------------------------------------------------------------------------
def test_warmup_shapes_parse_from_text_and_mappings(data_dir, monkeypatch):
    from handler.settings import Settings, WarmupShape

    assert WarmupShape.model_validate("512x768") == WarmupShape(width=512, height=768, steps=2)
    assert WarmupShape.model_validate("sdxl:1024x1024@4") == WarmupShape(width=1024, height=1024, steps=4, arch="sdxl")
    assert WarmupShape.model_validate({"width": 64, "height": 64}).arch is None
    for bad in ("500x512", "512x", "sd3:512x512", "512x512@0"):
        with pytest.raises(ValidationError):
            WarmupShape.model_validate(bad)
    monkeypatch.setenv("SDFUNC_WARMUP__SHAPES", '["64x64@1", "sdxl:128x96"]')
    monkeypatch.setenv("SDFUNC_WARMUP__CHECKPOINTS", '["demo-sdxl"]')
    monkeypatch.setenv("SDFUNC_WARMUP__ON_START", "false")
    monkeypatch.setenv("FC_INSTANCE_ID", "c-123")
    settings = Settings(data_dir=data_dir)
    assert [(s.width, s.height, s.steps, s.arch) for s in settings.warmup.shapes] == [(64, 64, 1, None),
                                                                                     (128, 96, 2, "sdxl")]
    assert settings.warmup.checkpoints == ["demo-sdxl"] and settings.warmup.on_start is False
    assert settings.instance_id == "c-123"
    assert settings.compile_cache_dir == data_dir / "cache" / "inductor"
    from handler.settings import WarmupSettings

    assert [(s.width, s.arch) for s in WarmupSettings().shapes] == [(512, "sd1"), (1024, "sdxl")]


# warm-up and cold start ------------------------------------------------------------------------------------
def test_warm_up_loads_each_checkpoint_once_and_runs_matching_shapes(data_dir):
    app = _app(data_dir, warmup={"on_start": False, "checkpoints": ["demo-sd15", "demo-sdxl"],
                                 "shapes": ["64x64@1", "sdxl:128x128@1"]})
    client, service = app.test_client(), app.extensions["sdfunc"]
    assert client.get("/healthz").status_code == 200  # no warm-up pending: ready, though cold
    assert client.get("/healthz").json["cold_start"]["complete"] is False
    first = client.post("/initialize", headers=hook_headers(client))
    assert first.status_code == 200, first.json
    body = first.json
    assert body["warmed"] is True and body["status"] == "READY"
    shapes = {c["checkpoint"]: [(g["width"], g["steps"]) for g in c["generations"]] for c in body["checkpoints"]}
    assert shapes == {"demo-sd15.safetensors": [(64, 1)], "demo-sdxl.safetensors": [(64, 1), (128, 1)]}
    cold = body["cold_start"]
    assert cold["complete"] is True
    assert set(cold["phases"]) == {"process_to_app", "imports", "device_init", "read_weights", "to_device",
                                   "first_generation"}
    assert service.cache.stats.loads == 2
    second = client.post("/initialize", headers=hook_headers(client)).json
    assert second["warmed"] is False and second["checkpoints"] == body["checkpoints"]
    assert service.cache.stats.loads == 2
    # A request after the warm-up is not a cold one, and the breakdown no longer changes.
    r = client.post("/sdapi/v1/txt2img", json=SMALL)
    assert r.status_code == 200 and r.headers["X-Cold-Start"] == "false"
    assert client.get("/healthz").json["cold_start"] == cold


def test_first_request_completes_the_cold_start_without_warm_up(data_dir):
    app = _app(data_dir)
    client = app.test_client()
    r = client.post("/sdapi/v1/txt2img", json=SMALL)
    assert r.status_code == 200 and r.headers["X-Cold-Start"] == "true"
    cold = client.get("/health").json["cold_start"]
    assert cold["complete"] is True and cold["phases"]["first_generation"] > 0
    assert cold["phases"]["read_weights"] > 0 and cold["total_seconds"] > 0
    assert client.post("/sdapi/v1/txt2img", json=SMALL).headers["X-Cold-Start"] == "false"


def test_failed_warm_up_reports_failed_and_can_be_retried(data_dir):
    app = _app(data_dir, warmup={"on_start": False, "checkpoints": ["no-such-model"]})
    client, service = app.test_client(), app.extensions["sdfunc"]
    r = client.post("/initialize", headers=hook_headers(client))
    assert r.status_code == 503 and r.json["error"]["code"] == "not_ready"
    assert "Traceback" not in r.get_data(as_text=True)
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json["status"] == "FAILED"
    assert client.get("/health").status_code == 200  # liveness stays up: the process answers
    service.settings.warmup.checkpoints = ["demo-sd15"]  # the operator fixes the mount; FC retries
    assert client.post("/initialize", headers=hook_headers(client)).json["warmed"] is True
    assert client.get("/healthz").json["status"] == "READY"


def test_pending_warm_up_is_starting_and_can_refuse_generation(data_dir):
    app = _app(data_dir, warmup={"on_start": True, "requests_wait": False, "retry_after": 9})
    service, client = app.extensions["sdfunc"], app.test_client()
    assert client.get("/healthz").json["status"] == "READY"  # nothing scheduled: never stuck in STARTING
    with device_held(service):
        service.start_warmup()  # what gunicorn's post_worker_init does; it waits behind the held device
        assert client.get("/healthz").status_code == 503 and client.get("/healthz").json["status"] == "STARTING"
        r = client.post("/sdapi/v1/txt2img", json=SMALL)
        assert r.status_code == 503 and r.headers["Retry-After"] == "9" and r.json["error"]["code"] == "not_ready"
        assert client.get("/sdapi/v1/samplers").status_code == 200  # only generation is held back
    wait_for(lambda: service.state == "READY", what="the warm-up")
    assert client.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200


def test_requests_wait_for_a_running_warm_up_by_default(data_dir, monkeypatch):
    """A request that arrives during the warm-up runs after all of it (not between its load and its
    generations), so it finds the models and kernels warm."""
    app = _app(data_dir, warmup={"on_start": True, "shapes": ["sd1:128x128@2"]})
    service, client = app.extensions["sdfunc"], app.test_client()
    seen = {}
    waiting = threading.Event()  # the request has reached the wait for the warm-up
    wait_for_warm_up = service.admission.warm_done.wait

    def spied_wait(timeout: float | None = None) -> bool:
        waiting.set()
        return wait_for_warm_up(timeout)

    monkeypatch.setattr(service.admission.warm_done, "wait", spied_wait)

    def call() -> None:
        r = client.post("/sdapi/v1/txt2img", json=SMALL)
        seen.update(status=r.status_code, cold=r.headers["X-Cold-Start"],
                    warm_done=service.admission.warm_done.is_set(), report=service.warmer.report is not None)

    with device_held(service):
        service.start_warmup()
        caller = threading.Thread(target=call)
        caller.start()
        assert waiting.wait(60), "the request never waited for the warm-up"
        assert not seen  # still waiting
    caller.join(120)
    assert seen == {"status": 200, "cold": "true", "warm_done": True, "report": True}
    assert service.state == "READY" and service.cache.stats.loads == 1


def test_busy_while_the_device_runs_a_job(data_dir):
    app = _app(data_dir)
    service, client = app.extensions["sdfunc"], app.test_client()
    with device_held(service):
        r = client.get("/healthz")
        assert r.status_code == 200 and r.json["status"] == "BUSY"
        assert metric(metric_samples(client.get("/metrics").get_data(as_text=True)), "sdfunc_device_busy") == 1
    assert client.get("/healthz").json["status"] == "READY"


def test_pre_stop_gives_up_after_its_grace_period(data_dir):
    app = _app(data_dir, prestop_grace_seconds=0.2)
    service = app.extensions["sdfunc"]
    result = {}
    with device_held(service):
        caller = threading.Thread(
            target=lambda: result.update(r=app.test_client().post("/sdapi/v1/txt2img", json=SMALL)))
        caller.start()
        wait_for(lambda: service.in_flight >= 1, what="the request to be admitted")
        body = app.test_client().get("/pre-stop", headers=hook_headers(app)).json
        assert body["drained"] is False and body["waited_for"] == body["in_flight"] == 1
        assert body["released_models"] == 0
        assert body["waited_seconds"] >= 0.2
    caller.join(60)
    assert result["r"].status_code == 200  # admitted before pre-stop: still served


def test_compile_setting_wraps_the_unet_with_its_cache_on_the_mount(data_dir, monkeypatch):
    """Wiring only: compiling itself happens on the first generation and takes a minute on CPU."""
    import torch

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    app = _app(data_dir, warmup={"on_start": False, "compile": True})
    service = app.extensions["sdfunc"]
    entry = service.store.find_checkpoint("demo-sd15")
    model = service.device.run(lambda: service.cache.get(entry))
    assert isinstance(model.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(data_dir / "cache" / "inductor")
    assert (data_dir / "cache" / "inductor").is_dir()
    plain = _app(data_dir).extensions["sdfunc"]
    model = plain.device.run(lambda: plain.cache.get(entry))
    assert not isinstance(model.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)  # off by default


# metrics ----------------------------------------------------------------------------------------------------
def test_metrics_count_requests_images_and_billed_time_exactly(data_dir):
    app = _app(data_dir)
    client = app.test_client()
    before = metric_samples(client.get("/metrics").get_data(as_text=True))
    billed = 0
    for _ in range(2):
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, "batch_size": 2, "n_iter": 2})
        assert r.status_code == 200
    assert client.post("/sdapi/v1/txt2img", json={**SMALL, "width": 63000}).status_code == 422
    assert client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {
        "sd_model_checkpoint": "missing"}}).status_code == 404
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    after = metric_samples(r.get_data(as_text=True))

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    route = {"route": "/sdapi/v1/txt2img", "method": "POST"}
    assert delta("sdfunc_requests_total", status="200", **route) == 2
    assert delta("sdfunc_requests_total", status="422", **route) == 1
    assert delta("sdfunc_requests_total", status="404", **route) == 1
    assert delta("sdfunc_images_generated_total", mode="txt2img") == 8
    assert delta("sdfunc_generation_seconds_count", mode="txt2img") == 2
    assert delta("sdfunc_queue_wait_seconds_count") == 2
    assert delta("sdfunc_encode_seconds_count") == 2
    assert delta("sdfunc_model_load_seconds_count") == 1  # the first request loaded demo-sd15
    assert delta("sdfunc_requests_total", route="/metrics", method="GET", status="200") == 1  # the first scrape
    billed = delta("sdfunc_billed_seconds_total")
    gen = delta("sdfunc_generation_seconds_sum", mode="txt2img")
    assert gen <= billed <= gen + 0.002 + 1e-9  # whole milliseconds, rounded up, per request
    assert metric(after, "sdfunc_pipeline_cache_misses_total") == 1
    assert metric(after, "sdfunc_pipeline_cache_hits_total") == 1
    assert metric(after, "sdfunc_pipeline_cache_models") == 1
    assert metric(after, "sdfunc_pipeline_cache_bytes") > 1_000_000
    assert metric(after, "sdfunc_cold_starts_total") == 1
    assert metric(after, "sdfunc_cold_start_phase_seconds", phase="first_generation") > 0
    assert metric(after, "sdfunc_state", state="READY") == 1 and metric(after, "sdfunc_state", state="BUSY") == 0
    assert metric(after, "sdfunc_uptime_seconds") > 0
    assert "sdfunc_requests_created" not in r.get_data(as_text=True)


def test_metrics_can_be_turned_off(data_dir):
    app = _app(data_dir, metrics=False)
    client = app.test_client()
    r = client.get("/metrics")
    assert r.status_code == 404 and r.json["error"]["code"] == "not_found"
    assert client.get("/health").status_code == 200


def test_metrics_in_multiprocess_mode(data_dir, tmp_path):
    """PROMETHEUS_MULTIPROC_DIR is read when prometheus_client is imported, hence a fresh interpreter."""
    code = f"""
import json, os
from handler.app import create_app
from tests.conftest import device_held, make_settings
from tests.support.serving import metric, metric_samples
from tests.support.waiting import wait_for
from pathlib import Path
client = create_app(make_settings(Path({str(data_dir)!r}))).test_client()
for _ in range(3):
    assert client.get("/health").status_code == 200
samples = metric_samples(client.get("/metrics").get_data(as_text=True))
print(json.dumps([metric(samples, "sdfunc_requests_total", route="/health", method="GET", status="200"),
                  metric(samples, "sdfunc_state", state="READY")]))
"""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [3, 1]
    assert any(p.name.startswith("counter_") for p in tmp_path.iterdir())


# request log and headers --------------------------------------------------------------------------------------
def _request_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sdfunc.request"]


def test_request_log_has_every_field_and_no_prompt(data_dir, caplog):
    app = _app(data_dir)
    client = app.test_client()
    with caplog.at_level(logging.INFO, logger="sdfunc.request"):
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "secret-words-991"},
                        headers={"x-fc-request-id": "log-1"})
        client.post("/sdapi/v1/txt2img", json={**SMALL, "steps": 0}, headers={"x-fc-request-id": "log-2"})
    assert r.status_code == 200
    records = {rec.fields["request_id"]: rec.fields for rec in _request_records(caplog)}
    ok, bad = records["log-1"], records["log-2"]
    assert ok["instance_id"] == r.headers["X-Instance-Id"] == app.extensions["sdfunc"].instance_id
    assert (ok["route"], ok["method"], ok["status"], ok["mode"], ok["checkpoint"]) == (
        "/sdapi/v1/txt2img", "POST", 200, "txt2img", "demo-sd15.safetensors")
    assert (ok["width"], ok["height"], ok["steps"], ok["images"], ok["consumer"]) == (64, 64, 1, 1, "anonymous")
    for key in ("queue_wait_seconds", "generation_seconds", "encode_seconds", "total_seconds"):
        assert ok[key] >= 0, key
    assert ok["total_seconds"] >= ok["generation_seconds"] and ok["billed_ms"] >= 1
    assert ok["billed_ms"] == int(r.headers["X-Billed-Duration-Ms"]) and ok["charged"] == r.headers["X-Charge"]
    assert "prompt" not in ok and "negative_prompt" not in ok
    assert "secret-words-991" not in caplog.text
    assert bad["status"] == 422 and bad["error"] == "invalid_request" and bad["billed_ms"] == 0
    assert bad["generation_seconds"] is None and bad["images"] == 0


def test_request_log_in_json_carries_the_fields_at_top_level(data_dir):
    from handler.logs import JsonFormatter
    from handler.records.billing import Pricing
    from handler.records.metering import RequestMeter, request_log
    from handler.settings import BillingSettings

    meter = RequestMeter(request_id="r1", instance_id="i1", method="POST", route="/x", cold_start=False,
                         status=200, mode="txt2img", generation_seconds=0.0101, prompt="p")
    meter.charge = Pricing(BillingSettings(prices={"cpu": "2"})).charge(0.0101, 1, "cpu")
    captured: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = captured.append  # type: ignore[method-assign]
    request_log.addHandler(handler)
    try:
        from handler.records.metering import log_request

        log_request(meter, with_prompts=False)
        log_request(meter, with_prompts=True)
    finally:
        request_log.removeHandler(handler)
    plain, with_prompt = (json.loads(JsonFormatter().format(rec)) for rec in captured)
    assert plain["logger"] == "sdfunc.request" and plain["billed_ms"] == 11 and plain["charged"] == "0.022"
    assert plain["cold_start"] is False
    assert "prompt" not in plain and with_prompt["prompt"] == "p"


def test_prompt_logging_is_an_operator_switch(data_dir, caplog):
    client = _app(data_dir, log_prompts=True).test_client()
    with caplog.at_level(logging.INFO, logger="sdfunc.request"):
        client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "visible-words"}, headers={"x-fc-request-id": "lp"})
    fields = next(r.fields for r in _request_records(caplog) if r.fields["request_id"] == "lp")
    assert fields["prompt"] == "visible-words" and fields["negative_prompt"] == ""


def test_request_log_can_be_turned_off(data_dir, caplog):
    client = _app(data_dir, request_log=False).test_client()
    with caplog.at_level(logging.INFO, logger="sdfunc.request"):
        r = client.get("/health")
    assert r.headers["X-Instance-Id"] and r.headers["X-Cold-Start"] in ("true", "false")
    assert not _request_records(caplog)


def test_every_response_carries_instance_and_cold_start_headers(client):
    for r in (client.get("/health"), client.get("/nope"), client.post("/sdapi/v1/txt2img", json={"steps": "x"}),
              client.get("/metrics"), client.get("/openapi/openapi.json")):
        assert r.headers["X-Instance-Id"], r.status_code
        assert r.headers["X-Cold-Start"] in ("true", "false")


def test_lifecycle_routes_are_documented(client):
    paths = client.get("/openapi/openapi.json").json["paths"]
    for path in ("/initialize", "/pre-stop", "/health", "/healthz", "/metrics"):
        assert path in paths, path
    health = paths["/healthz"]["get"]["responses"]
    assert "200" in health and "503" in health


def test_importing_the_app_and_answering_health_never_imports_torch(data_dir):
    """The health check must answer at once while models load: the app stays light until the device thread
    needs torch."""
    code = f"""
import sys
from pathlib import Path
from handler.app import create_app
from tests.conftest import device_held, make_settings
from tests.support.waiting import wait_for
client = create_app(make_settings(Path({str(data_dir)!r}))).test_client()
for path in ("/health", "/healthz", "/metrics", "/sdapi/v1/sd-models"):
    assert client.get(path).status_code == 200, path
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print(",".join(heavy) or "none")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "none"


def test_gpu_memory_gauges_when_the_cache_is_on_cuda(data_dir, monkeypatch):
    """Wiring on CPU: with a CUDA cache and an initialised CUDA context, the scrape reports torch's numbers."""
    import torch

    app = _app(data_dir)
    service = app.extensions["sdfunc"]
    service.cache.device = "cuda"  # nothing is loaded; only the collector looks at it
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 123)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 456)
    samples = metric_samples(app.test_client().get("/metrics").get_data(as_text=True))
    assert metric(samples, "sdfunc_gpu_memory_allocated_bytes") == 123
    assert metric(samples, "sdfunc_gpu_memory_reserved_bytes") == 456


def test_root_gunicorn_config_loads_with_its_hooks():
    """`gunicorn 'handler.app:create_app()'` from the repository root reads ./gunicorn.conf.py."""
    import runpy

    config = runpy.run_path(str(REPO / "gunicorn.conf.py"))
    assert config["workers"] == 1 and config["accesslog"] is None and config["wsgi_app"] == "handler.app:create_app()"
    for hook in ("post_fork", "post_worker_init", "child_exit"):
        assert callable(config[hook]), hook


def test_warm_up_shapes_must_fit_the_request_limits(data_dir):
    with pytest.raises(ValidationError, match="warmup.shapes.0"):
        make_settings(data_dir, max_width=512, warmup={"shapes": ["1024x512"]})
