"""The other A1111 endpoints, options per caller, warmth, png-info, FC lifecycle and the OpenAPI document."""

import json
import shutil

import pytest
from PIL import Image

from tests.conftest import hook_headers, png_b64


def test_sd_models_lists_demo_checkpoints_in_a1111_shape(client, service, data_dir):
    client.get("/sdapi/v1/options")  # computes the current checkpoint's hash
    items = client.get("/sdapi/v1/sd-models").json
    names = [i["model_name"] for i in items]
    assert names == ["demo-sd15", "demo-sdxl"]
    first = items[0]
    assert set(first) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    sha = service.store.sha256(service.store.find_checkpoint("demo-sd15"))
    assert first["title"] == f"demo-sd15.safetensors [{sha[:10]}]"
    assert first["hash"] == sha[:10] and first["sha256"] == sha
    assert first["filename"] == str(data_dir / "models" / "Stable-diffusion" / "demo-sd15.safetensors")


def test_samplers_and_schedulers(client):
    samplers = client.get("/sdapi/v1/samplers").json
    assert len(samplers) == 20
    assert samplers[0] == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}
    schedulers = client.get("/sdapi/v1/schedulers").json
    assert len(schedulers) == 12
    assert schedulers[0]["name"] == "automatic" and schedulers[0]["label"] == "Automatic"


@pytest.mark.parametrize("path, expect", [
    ("/sdapi/v1/scripts", {"txt2img": ["controlnet"], "img2img": ["controlnet"]}),
    ("/sdapi/v1/embeddings", {"loaded": {}, "skipped": {}}),
])
def test_simple_getters(client, path, expect):
    assert client.get(path).json == expect


def test_upscalers_and_latent_modes(client):
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json] == ["None", "Lanczos", "Nearest"]
    assert client.get("/sdapi/v1/latent-upscale-modes").json[0] == {"name": "Latent"}


def test_options_get_has_the_keys_clients_read(client):
    options = client.get("/sdapi/v1/options").json
    for key, value in {"sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "samples_format": "png",
                       "send_seed": True, "eta_ancestral": 1.0, "eta_ddim": 0.0}.items():
        assert options[key] == value
    assert options["sd_model_checkpoint"].startswith("demo-sd15.safetensors [")
    assert len(options["sd_checkpoint_hash"]) == 64


def test_options_post_switches_the_callers_checkpoint(client, service):
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "demo-sdxl"})
    assert r.status_code == 200
    assert r.get_data(as_text=True).strip() == "null"
    assert client.get("/sdapi/v1/options").json["sd_model_checkpoint"].startswith("demo-sdxl.safetensors [")
    body = client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64}).json
    assert json.loads(body["info"])["sd_model_name"] == "demo-sdxl"


def test_options_post_refusals_change_nothing(client):
    before = client.get("/sdapi/v1/options").json
    r = client.post("/sdapi/v1/options", json={"send_seed": False, "no_such_option": 1})
    assert r.status_code == 422 and r.json["error"]["field"] == "no_such_option"
    r = client.post("/sdapi/v1/options", json={"send_seed": False, "sd_model_checkpoint": "missing"})
    assert r.status_code == 404
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": "two"})
    assert r.status_code == 422
    assert client.get("/sdapi/v1/options").json == before


def test_options_are_not_written_to_disk(client, data_dir):
    before = sorted(p.name for p in data_dir.rglob("*.json"))
    client.post("/sdapi/v1/options", json={"send_seed": False})
    assert sorted(p.name for p in data_dir.rglob("*.json")) == before


def test_second_request_to_a_checkpoint_does_not_load_it(client, service):
    client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64})
    loads = service.cache.stats.loads
    hits = service.cache.stats.hits
    client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64})
    assert service.cache.stats.loads == loads
    assert service.cache.stats.hits == hits + 1


def test_refresh_checkpoints_finds_new_files(client, data_dir):
    folder = data_dir / "models" / "Stable-diffusion"
    sub = folder / "more"
    sub.mkdir(exist_ok=True)
    shutil.copy(folder / "demo-sd15.safetensors", sub / "copy.safetensors")
    (folder / "old.ckpt").write_bytes(b"pickle")
    try:
        assert client.post("/sdapi/v1/refresh-checkpoints").get_data(as_text=True).strip() == "null"
        items = client.get("/sdapi/v1/sd-models").json
        assert "more_copy" in [i["model_name"] for i in items]
        assert "old" not in json.dumps(items)
        r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64,
                                                    "override_settings": {"sd_model_checkpoint": "old.ckpt"}})
        assert r.status_code == 422 and r.json["error"]["code"] == "pickle_refused"
    finally:
        shutil.rmtree(sub)
        (folder / "old.ckpt").unlink()
        client.post("/sdapi/v1/refresh-checkpoints")


def test_png_info_round_trip(client):
    body = client.post("/sdapi/v1/txt2img", json={"prompt": "a lake, at dawn", "negative_prompt": "fog",
                                                   "steps": 2, "width": 64, "height": 64, "seed": 77}).json
    r = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + body["images"][0]})
    assert r.status_code == 200
    out = r.json
    assert out["info"] == json.loads(body["info"])["infotexts"][0]
    assert out["items"] == {}
    params = out["parameters"]
    assert params["Prompt"] == "a lake, at dawn" and params["Negative prompt"] == "fog"
    assert params["Seed"] == "77" and params["Size-1"] == "64" and params["Size-2"] == "64"
    assert params["Steps"] == "2" and params["Model"] == "demo-sd15"


def test_png_info_without_parameters_and_bad_input(client):
    plain = png_b64(Image.new("RGB", (8, 8)))
    r = client.post("/sdapi/v1/png-info", json={"image": plain})
    assert r.status_code == 200 and r.json["info"] == ""
    r = client.post("/sdapi/v1/png-info", json={"image": "%%%"})
    assert r.status_code == 422 and r.json["error"]["field"] == "image"
    r = client.post("/sdapi/v1/png-info", json={})
    assert r.status_code == 422 and r.json["error"]["field"] == "image"


def test_progress_idle_and_interrupt(client):
    progress = client.get("/sdapi/v1/progress").json
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    assert client.post("/sdapi/v1/interrupt").json == {}
    assert client.post("/sdapi/v1/skip").get_data(as_text=True).strip() == "null"


def test_fc_initialize_is_idempotent_and_health_reports_ready(client):
    first = client.post("/initialize", headers=hook_headers(client))
    assert first.status_code == 200 and first.json["status"] == "READY"
    second = client.post("/initialize", headers=hook_headers(client))
    assert second.status_code == 200 and second.json["warmed"] is False
    health = client.get("/health").json
    assert health["status"] == "READY"
    assert any(t.startswith("demo-sd15.safetensors") for t in health["loaded_models"])


def test_fc_pre_stop_refuses_new_work(data_dir):
    from handler.app import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings(data_dir))
    client = app.test_client()
    body = client.get("/pre-stop", headers=hook_headers(client)).json
    assert body.pop("waited_seconds") >= 0
    assert body == {"status": "stopped", "drained": True, "waited_for": 0, "in_flight": 0, "released_models": 0}
    assert client.get("/pre-stop", headers=hook_headers(client)).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64})
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.json["error"]["code"] == "not_ready"
    assert client.get("/healthz").status_code == 503 and client.get("/healthz").json["status"] == "STOPPING"
    assert client.get("/health").status_code == 200


def test_openapi_document_and_docs_page(client):
    spec = client.get("/openapi/openapi.json").json
    paths = spec["paths"]
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info", "/sdapi/v1/options",
                 "/sdapi/v1/sd-models", "/initialize", "/pre-stop"):
        assert path in paths, path
    schema = spec["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    limit = client.application.extensions["sdfunc"].settings.max_steps
    assert schema["steps"]["anyOf"] == [{"minimum": 1.0, "maximum": min(150, limit), "type": "integer"},
                                        {"type": "null"}]  # null: the default, as A1111 takes it
    assert schema["sampler_index"]["default"] == "Euler"
    err = paths["/sdapi/v1/txt2img"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert err["$ref"].endswith("/ErrorModel")
    page = client.get("/openapi/swagger")
    assert page.status_code == 200 and b"swagger" in page.data.lower()


def test_unknown_route_and_method_use_the_error_shape(client):
    r = client.get("/sdapi/v1/nope")
    assert r.status_code == 404 and r.json["error"]["code"] == "not_found"
    r = client.get("/sdapi/v1/txt2img")
    assert r.status_code == 405 and r.json["error"]["code"] == "method_not_allowed"


def test_pre_stop_waits_for_requests_already_waiting_for_the_device(data_dir):
    """Admitted work is finished, not dropped: pre-stop answers only after the queued request has its image."""
    import threading

    from handler.app import create_app
    from tests.conftest import device_held, make_settings
    from tests.support.waiting import wait_for

    app = create_app(make_settings(data_dir))
    service = app.extensions["sdfunc"]
    results = {}

    def call(name, method, path, **kwargs):
        results[name] = getattr(app.test_client(), method)(path, **kwargs)

    with device_held(service):
        caller = threading.Thread(target=call, args=("gen", "post", "/sdapi/v1/txt2img"),
                                  kwargs={"json": {"steps": 1, "width": 64, "height": 64}})
        caller.start()
        wait_for(lambda: service.device.pending >= 2, what="the request to queue behind the busy job")
        stopper = threading.Thread(target=call, args=("stop", "get", "/pre-stop"),
                                   kwargs={"headers": hook_headers(app)})
        stopper.start()
        wait_for(lambda: service.state == "STOPPING", what="pre-stop")
        late = app.test_client().post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64})
        assert late.status_code == 503  # new work is refused while the admitted request still waits
        assert "stop" not in results and service.in_flight == 1
    for thread in (caller, stopper):
        thread.join(60)
    assert results["gen"].status_code == 200
    stop = results["stop"].json
    assert stop["drained"] is True and stop["waited_for"] == 1 and stop["in_flight"] == 0
    assert stop["released_models"] == 1
    assert service.loaded_models() == []


def test_all_device_work_runs_on_one_thread(app, client, monkeypatch):
    """HTTP threads never run torch themselves (several OpenMP pools on one CPU slow generation 2-3x)."""
    import threading

    import pipelines.generate
    from handler.runtime.executor import THREAD_NAME

    names = []
    real = pipelines.generate.generate

    def spy(*args, **kwargs):
        names.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr("pipelines.generate.generate", spy)
    threads = [threading.Thread(target=lambda: app.test_client().post(
        "/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64})) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(names) == 4
    assert all(name.startswith(THREAD_NAME) for name in names), names


def test_interrupt_stops_after_the_current_batch(app, client, service):
    import threading

    from tests.support.waiting import wait_for

    results = {}

    def call():
        results["r"] = app.test_client().post("/sdapi/v1/txt2img", json={
            "steps": 40, "width": 64, "height": 64, "n_iter": 4, "seed": 1})

    worker = threading.Thread(target=call)
    worker.start()
    def sampling() -> bool:
        state = client.get("/sdapi/v1/progress").json["state"]
        return bool(state["job_count"] and state["sampling_step"] >= 1)

    wait_for(sampling, 120, "the job to be sampling", interval=0.005)  # then interrupt it
    progress = client.get("/sdapi/v1/progress").json
    assert 0 < progress["progress"] <= 1 and progress["state"]["job"] == "txt2img"
    assert client.post("/sdapi/v1/interrupt").json == {}
    worker.join(120)
    body = results["r"].json
    assert results["r"].status_code == 200
    assert 1 <= len(body["images"]) < 4
    assert len(json.loads(body["info"])["all_seeds"]) == len(body["images"])
    assert client.get("/sdapi/v1/progress").json["state"]["job_count"] == 0


@pytest.mark.parametrize("values", [{"img2img_background_color": "zzz"}, {"img2img_background_color": ""},
                                    {"eta_ddim": float("inf")}])
def test_options_refuse_values_that_would_break_later_requests(client, values):
    before = client.get("/sdapi/v1/options").json
    raw = json.dumps(values)  # Infinity is what Python writes for inf
    r = client.post("/sdapi/v1/options", data=raw, content_type="application/json")
    assert r.status_code == 422, r.get_data(as_text=True)
    assert client.get("/sdapi/v1/options").json == before
