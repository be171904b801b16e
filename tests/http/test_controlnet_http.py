"""ControlNet through the HTTP API (alwayson_scripts.controlnet, /controlnet/*), on the demo checkpoints and the
tiny demo ControlNets: the units reach the real diffusers ControlNet pipelines loaded by the real loader."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import close_apps, decode_png, linked_data_root, make_settings

SMALL = {"prompt": "a red house", "steps": 3, "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler"}
XL = {"override_settings": {"sd_model_checkpoint": "demo-sdxl"}}


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def shapes(size: int = 64) -> Image.Image:
    """A picture with edges for canny."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, size // 2, size // 2), fill="black")
    draw.ellipse((size // 2, size // 3, size - 4, size - 4), fill=(200, 30, 30))
    return image


IMAGE = _png(shapes())


def unit(**fields):
    return {"image": IMAGE, "module": "canny", "model": "demo-controlnet-sd15", **fields}


def cn(*units):
    return {"alwayson_scripts": {"controlnet": {"args": list(units)}}}


@pytest.fixture(scope="module")
def root(data_dir, tmp_path_factory):
    from pipelines.builders.demo import write_demo_controlnets

    root = linked_data_root(data_dir, tmp_path_factory.mktemp("controlnet"))
    write_demo_controlnets(root / "models" / "ControlNet")
    return root


@pytest.fixture(scope="module")
def app(root):
    from handler.app import create_app

    app = create_app(make_settings(root, max_images=8))
    yield app
    close_apps([app])


@pytest.fixture
def client(app):
    return app.test_client()


def post(client, path="/sdapi/v1/txt2img", **fields):
    r = client.post(path, json={**SMALL, **fields})
    return r, (json.loads(r.json["info"]) if r.status_code == 200 else None)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_png(b64).convert("RGB"), dtype=np.float32)


def test_listings(client):
    r = client.get("/controlnet/model_list")
    assert r.status_code == 200
    titles = r.json["model_list"]
    assert any(t.startswith("demo-controlnet-sd15 [") for t in titles) and len(titles) == 2
    modules = client.get("/controlnet/module_list").json
    assert {"none", "canny", "invert", "threshold"} <= set(modules["module_list"])
    assert "canny" in modules["module_detail"]
    assert client.get("/controlnet/version").json == {"version": 3}
    assert client.get("/controlnet/settings").json["control_net_unit_count"] >= 1
    assert client.get("/sdapi/v1/scripts").json["txt2img"] == ["controlnet"]


def test_detect_runs_a_preprocessor(client):
    import cv2

    r = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [IMAGE],
                                                "controlnet_processor_res": 64, "controlnet_threshold_a": 100,
                                                "controlnet_threshold_b": 200})
    assert r.status_code == 200, r.json
    edges = np.asarray(decode_png(r.json["images"][0]).convert("L"))
    expected = cv2.Canny(np.asarray(shapes()), 100, 200)
    assert edges.shape == expected.shape and (edges == expected).mean() > 0.99
    bad = client.post("/controlnet/detect", json={"controlnet_module": "openpose", "controlnet_input_images": [IMAGE]})
    assert bad.status_code == 422


def test_controlnet_changes_txt2img_and_weight_zero_is_none(client):
    plain, _ = post(client)
    r, info = post(client, **cn(unit()))
    assert r.status_code == 200, r.json
    images = r.json["images"]
    assert len(images) == 2  # the image, then the unit's detected map (as the extension appends it)
    assert len(info["infotexts"]) == 1
    detected = np.asarray(decode_png(images[1]).convert("L"))
    assert set(np.unique(detected)) <= {0, 255} and detected.max() == 255  # canny edges
    assert np.abs(pixels(images[0]) - pixels(plain.json["images"][0])).max() > 0  # the control changed it
    line = info["infotexts"][0].splitlines()[-1]
    assert 'ControlNet 0: "Module: canny, Model: demo-controlnet-sd15, Weight: 1.0' in line
    zero, _ = post(client, **cn(unit(weight=0)))
    assert np.abs(pixels(zero.json["images"][0]) - pixels(plain.json["images"][0])).max() <= 1
    off, _ = post(client, **cn(unit(enabled=False)))
    assert off.json["images"] == plain.json["images"]


def test_two_units_img2img_init_image_and_no_detected_map(client):
    init = _png(shapes().rotate(90))
    body = {"init_images": [init], "denoising_strength": 0.6}
    plain, _ = post(client, "/sdapi/v1/img2img", **body)
    r, info = post(client, "/sdapi/v1/img2img", **body,
                   **cn(unit(image=None, save_detected_map=False),  # no image: img2img's init image
                        unit(module="invert", weight=0.5, control_mode="ControlNet is more important")))
    assert r.status_code == 200, r.json
    assert len(r.json["images"]) == 2  # one image, one detected map (the first unit keeps its map)
    assert r.json["images"][0] != plain.json["images"][0]
    assert "ControlNet 1" in info["infotexts"][0]


def test_sdxl_controlnet_and_hires_fix(client):
    r, _ = post(client, **XL, **cn(unit(model="demo-controlnet-sdxl")))
    assert r.status_code == 200, r.json
    hr, info = post(client, enable_hr=True, **cn(unit()))
    assert hr.status_code == 200, hr.json
    assert decode_png(hr.json["images"][0]).size == (128, 128)
    # the extension appends the second pass's map, then the first pass's
    assert [decode_png(b).size for b in hr.json["images"][1:]] == [(128, 128), (64, 64)]


def test_saving_returns_image_mask_url(client, root):
    r, _ = post(client, save_images=True, alwayson_scripts={"controlnet": {"args": [unit()]}, "id_task": "t1"})
    assert r.status_code == 200, r.json
    params = r.json["parameters"]
    [mask_url] = params["image_mask_url"].split(",")
    assert mask_url.endswith("-controlnet-0.png")
    with Image.open(mask_url) as saved:
        assert saved.size == (64, 64)
    assert base64.b64decode(r.json["images"][-1]) == open(mask_url, "rb").read()


@pytest.mark.parametrize("fields,status,field", [
    (cn(unit(model="no-such-controlnet")), 404, "alwayson_scripts.controlnet.args.0.model"),
    (cn(unit(model="demo-controlnet-sdxl")), 422, "alwayson_scripts.controlnet.args.0.model"),  # SDXL on SD 1.5
    (cn(unit(weight=3)), 422, "alwayson_scripts.controlnet.args.0.weight"),
    (cn(unit(image=None)), 422, "alwayson_scripts.controlnet.args.0.image"),  # txt2img has no init image
    (cn(unit(module="depth_midas")), 422, "alwayson_scripts.controlnet.args.0.module"),
    (cn(unit(image="not base64!")), 422, "alwayson_scripts.controlnet.args.0.image"),
    ({**cn(unit()), "refiner_checkpoint": "demo-sdxl", "refiner_switch_at": 0.5, **XL}, 422, "refiner_checkpoint"),
])
def test_refusals_name_the_field(client, fields, status, field):
    r, _ = post(client, **fields)
    assert r.status_code == status, r.json
    assert r.json["error"]["field"] == field


def test_unit_image_link_goes_through_the_network_guard(client):
    r, _ = post(client, **cn(unit(image=None, image_link="http://127.0.0.1:9/edges.png")))
    assert r.status_code == 422
    assert r.json["error"]["field"] == "alwayson_scripts.controlnet.args.0.image_link"


def test_preprocessor_edge_inputs(client):
    nan = client.post("/controlnet/detect", data='{"controlnet_module": "canny", "controlnet_input_images": ["%s"], '
                      '"controlnet_threshold_a": NaN, "controlnet_processor_res": NaN}' % IMAGE,
                      content_type="application/json")
    assert nan.status_code in (200, 422), nan.json  # NaN means the default, as out-of-range values do
    tiny = client.post("/controlnet/detect", json={"controlnet_module": "tile_resample", "controlnet_threshold_a": 8,
                                                   "controlnet_input_images": [_png(Image.new("RGB", (4, 4)))]})
    assert tiny.status_code == 200 and decode_png(tiny.json["images"][0]).size == (1, 1)
    strip = _png(Image.new("RGB", (4000, 1), "white"))
    r, _ = post(client, **cn(unit(image=strip, processor_res=512)))
    assert r.status_code == 422 and r.json["error"]["field"] == "alwayson_scripts.controlnet.args.0.image"


@pytest.mark.parametrize(("arch", "model"), [({}, "demo-controlnet-sd15"), (XL, "demo-controlnet-sdxl")])
def test_prompt_editing_and_and_with_a_unit(client, arch, model):
    """The ControlNet sees each model call's conditioning (its first `AND` part); its residuals follow every
    part's row; the unit still steers the image."""
    prompt = {"prompt": "a [red:blue:1] house AND a [cat|dog] :0.5", "steps": 3}
    with_unit, _ = post(client, **arch, **prompt, **cn(unit(model=model)))
    without, _ = post(client, **arch, **prompt)
    assert with_unit.status_code == without.status_code == 200, with_unit.json
    assert not np.array_equal(pixels(with_unit.json["images"][0]), pixels(without.json["images"][0]))
