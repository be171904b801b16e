"""The synchronous PAI-EAS response (handler/runtime/respond.py): a request with PAI-EAS `alwayson_scripts` keys gets
`images: []` when it saves to `save_dir`, `parameters.status` 0, every image's seed, the saved grid then the images
in `image_url`, and `image_mask_url`; a plain A1111 request keeps A1111's response. Also img2img's two input image
sources together (`init_images` and `alwayson_scripts.image_link`): a 422 naming the link, not charged."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import decode_png, png_b64

EAS_KEYS = {"id_task", "status", "image_url", "image_mask_url", "seed", "error_msg", "total_time"}
IMAGE_LINK = "alwayson_scripts.image_link"
PRICE = {"prices": {"cpu": "0.01"}}


@pytest.fixture
def outputs(service) -> Path:
    return service.settings.outputs_dir.resolve()


def eas_sample(outputs: Path, **fields) -> dict:
    """PAI-EAS's synchronous txt2img sample, with what the tiny demo model can do (64x64, two steps)."""
    return {"alwayson_scripts": {"sd_model_checkpoint": "demo-sd15.safetensors", "save_dir": str(outputs / "eas")},
            "prompt": "girls", "batch_size": 1, "n_iter": 2, "steps": 2, "width": 64, "height": 64,
            "negative_prompt": "ugly", **fields}


def txt2img(client, body: dict):
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.json
    return r.json


def infotext_seeds(body: dict) -> list[str]:
    return [re.search(r"\bSeed: (\d+),", text)[1] for text in json.loads(body["info"])["infotexts"]]


def test_the_eas_sample(client, outputs):
    body = txt2img(client, eas_sample(outputs))
    params = body["parameters"]
    assert body["images"] == []  # the results are read from storage
    assert EAS_KEYS <= set(params)
    assert params["status"] == 0 and params["error_msg"] == "" and params["image_mask_url"] == ""
    assert isinstance(params["total_time"], float) and params["total_time"] > 0
    seeds = infotext_seeds(body)
    assert len(seeds) == 2 and params["seed"] == ",".join(seeds)
    assert [str(s) for s in json.loads(body["info"])["all_seeds"]] == seeds
    grid, *images = (Path(p) for p in params["image_url"].split(","))
    assert len(images) == 2 and all(p.is_file() and p.resolve().is_relative_to(outputs) for p in (grid, *images))
    assert grid.parent.parent.name == "txt2img-grids" and grid.name.startswith("grid-")
    assert [p.name.removesuffix(".png").rsplit("-", 1)[1] for p in images] == seeds  # in image order
    assert all(p.resolve().is_relative_to(outputs / "eas") for p in images)
    # sdfunc's own additions stay: the request echoed, the billing, A1111's `info`.
    assert params["prompt"] == "girls" and params["n_iter"] == 2 and "billing" in params
    assert json.loads(body["info"])["sd_model_name"] == "demo-sd15"


def test_one_image_has_no_grid(client, outputs):
    body = txt2img(client, eas_sample(outputs, n_iter=1, seed=77, alwayson_scripts={
        "save_dir": str(outputs / "eas"), "id_task": "14837"}))
    params = body["parameters"]
    assert body["images"] == [] and params["id_task"] == "14837" and params["seed"] == "77"
    [image] = params["image_url"].split(",")
    assert Path(image).is_file() and image.endswith("-77.png") and "-grids/" not in image


def test_send_images_true_sent_explicitly_returns_them(client, outputs):
    body = txt2img(client, eas_sample(outputs, send_images=True))
    params = body["parameters"]
    _, *paths = params["image_url"].split(",")
    assert len(body["images"]) == 2 and params["status"] == 0
    for data, path in zip(body["images"], paths):
        assert decode_png(data).size == (64, 64)
        assert base64.b64decode(data) == Path(path).read_bytes()
    assert txt2img(client, eas_sample(outputs, send_images=False))["images"] == []


def test_infotext_does_not_make_send_images_explicit(client, outputs):
    """`infotext` fills the fields the client left out; `send_images` is still not one the client sent."""
    body = txt2img(client, eas_sample(outputs, n_iter=1, infotext="girls\nSteps: 2, Seed: 5, Size: 64x64"))
    assert body["images"] == [] and body["parameters"]["seed"] == "5"


def test_without_eas_keys_the_response_is_a1111s(client):
    body = txt2img(client, {"prompt": "girls", "negative_prompt": "ugly", "n_iter": 2, "steps": 2, "width": 64,
                            "height": 64, "seed": 3})
    params = body["parameters"]
    assert len(body["images"]) == 2 and all(decode_png(b).size == (64, 64) for b in body["images"])
    assert not EAS_KEYS - {"seed"} & set(params) and params["seed"] == 3  # the request echoed, A1111's way


def test_init_images_and_image_link_together_are_refused(make_app):
    from handler.contract.schemas import Img2ImgRequest
    from handler.errors import InvalidRequest
    from handler.security.auth import ANONYMOUS

    app = make_app(billing=PRICE)
    client = app.test_client()
    both = {"prompt": "girls", "steps": 2, "width": 64, "height": 64,
            "init_images": [png_b64(Image.new("RGB", (64, 64), "white"))],
            "alwayson_scripts": {"image_link": "https://example.com/init.png"}}  # refused before any fetch
    for path in ("/sdapi/v1/img2img", "/sdapi/v1/img2img?async=true"):
        r = client.post(path, json=both)
        assert r.status_code == 422, (path, r.json)
        assert r.json["error"]["field"] == IMAGE_LINK and IMAGE_LINK in r.json["error"]["message"]
        assert r.headers["X-Charge"] == "0"
    service = app.extensions["sdfunc"]
    rows = service.ledger.ledger_rows()
    assert all(row["status"] == "failed" and row["amount_nanos"] == 0 and row["billed_ms"] == 0 for row in rows)
    assert client.get("/billing/usage").json["totals"]["succeeded"] == 0
    # The service refuses it too (a queue calls it, not the route).
    with pytest.raises(InvalidRequest) as refused:
        service.submit_task("img2img", Img2ImgRequest.model_validate(both), ANONYMOUS, tag=None, callback_url=None)
    assert refused.value.field == IMAGE_LINK
    # One source alone is fine.
    only_init = {**both, "alwayson_scripts": {}}
    assert client.post("/sdapi/v1/img2img", json=only_init).headers["X-Charge"] != "0"
