"""End to end: `sdfunc serve` on an empty data folder (demo models built first), real gunicorn on a free
loopback port, called with `requests` and with the `webuiapi` client."""

import base64
import io
import json

import pytest
import requests
from PIL import Image

from tests.support.serving import ServeProcess, json_log_entries
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("e2e-data")
    proc = ServeProcess(data)
    try:
        proc.wait_state("READY", timeout=240)
    except AssertionError:
        proc.stop()
        raise
    yield {"url": proc.url, "port": proc.port, "log": proc.log_path, "data": data}
    proc.stop()


def test_demo_models_were_built_in_the_empty_data_folder(server):
    names = sorted(p.name for p in (server["data"] / "models" / "Stable-diffusion").glob("*.safetensors"))
    assert names == ["demo-sd15.safetensors", "demo-sdxl.safetensors"]


def test_txt2img_over_http_with_requests(server):
    r = requests.post(f"{server['url']}/sdapi/v1/txt2img", timeout=120,
                      json={"prompt": "a red house", "steps": 4, "width": 128, "height": 128, "seed": 42},
                      headers={"x-fc-request-id": "e2e-request-0001"})
    assert r.status_code == 200, r.text
    assert r.headers["x-fc-request-id"] == "e2e-request-0001"
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.format == "PNG" and image.size == (128, 128)
    text = image.info["parameters"]
    assert text.startswith("a red house\nSteps: 4, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.0, Seed: 42,")
    assert "Model: demo-sd15," in text and "Version: sdfunc-" in text
    assert json.loads(r.json()["info"])["infotexts"][0] == text
    # The worker's log lines carry the request id (JSON lines).
    def logged() -> bool:
        return any(entry["request_id"] == "e2e-request-0001" and "txt2img" in entry["msg"]
                   for entry in json_log_entries(server["log"]))

    wait_for(logged, 10, "the request's log line with its request id")


def test_errors_over_http_are_json_without_traceback(server):
    r = requests.post(f"{server['url']}/sdapi/v1/txt2img", json={"steps": -3}, timeout=30)
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "steps"
    r = requests.post(f"{server['url']}/sdapi/v1/txt2img", data=b"x" * (33 * 1024 * 1024), timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert "Traceback" not in r.text


def test_webuiapi_client(server):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server["port"])
    api.util_wait_for_ready(check_interval=0.5)
    result = api.txt2img(prompt="a cat", steps=2, width=64, height=64, seed=5)
    assert result.image.size == (64, 64)
    assert result.info["seed"] == 5 and result.info["all_seeds"] == [5]
    assert "Sampler: Euler a," in result.info["infotexts"][0]
    info = api.png_info(result.image)
    assert info.info == result.info["infotexts"][0]
    assert info.parameters["Seed"] == "5"
    names = api.util_get_model_names()
    assert any(n.startswith("demo-sdxl.safetensors") for n in names)
    assert api.util_get_current_model().startswith("demo-sd15.safetensors")
    api.util_set_model("demo-sdxl")
    assert api.util_get_current_model().startswith("demo-sdxl.safetensors")
    out = api.img2img(images=[result.image], prompt="a cat", steps=2, width=64, height=64, seed=6,
                      denoising_strength=0.5)
    assert out.image.size == (64, 64) and out.info["sd_model_name"] == "demo-sdxl"
    assert [s["name"] for s in api.get_samplers()][:2] == ["DPM++ 2M", "DPM++ SDE"]
    assert api.interrupt() == {}
    api.util_set_model("demo-sd15")


def test_webuiapi_extras_on_the_demo_upscalers(server):
    """`sdfunc serve` puts tiny demo upscalers beside the demo checkpoints: webuiapi's extras calls work unchanged."""
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server["port"])
    names = [u["name"] for u in api.get_upscalers()]
    assert names[:3] == ["None", "Lanczos", "Nearest"] and "demo-esrgan-4x" in names
    image = Image.new("RGB", (48, 32), (120, 60, 30))
    single = api.extra_single_image(image=image, upscaler_1="demo-esrgan-4x", upscaling_resize=2)
    assert single.image.size == (96, 64)
    assert single.info == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: demo-esrgan-4x</p>"  # html_info
    batch = api.extra_batch_images(images=[image, image], upscaler_1="demo-srvgg-2x", upscaling_resize=2,
                                   gfpgan_visibility=0.5)
    assert [im.size for im in batch.images] == [(96, 64), (96, 64)]
    assert batch.info.endswith(", GFPGAN visibility: 0.5</p>")
