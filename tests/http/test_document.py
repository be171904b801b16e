"""The served OpenAPI document is the contract (handler/api/document.py): it states this deployment's limits and
defaults, the closed sets, formats and links, and every rule it states the server applies, no more and no less.
The fuzz run (tests/e2e/test_fuzz.py) checks the same with generated data; these are the cases by name."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from handler.contract.options import DEFAULT_OPTIONS
from tests.conftest import png_b64
from tests.support.waiting import wait_for

SMALL = {"max_width": 64, "max_height": 64, "max_steps": 1, "max_images": 2, "max_prompt_chars": 300}


@pytest.fixture(scope="module")
def small(data_dir, tmp_path_factory):
    """One app with a small deployment's limits, its document, and its test client."""
    from handler.app import create_app
    from tests.conftest import close_apps, make_settings

    db = tmp_path_factory.mktemp("document") / "records.sqlite3"
    app = create_app(make_settings(data_dir, database_url=f"sqlite:///{db}", warmup={"on_start": False, "shapes": ["64x64@1"]},
                                   **SMALL))
    client = app.test_client()
    yield app, client.get("/openapi/openapi.json").json, client
    close_apps([app])


def _inner(prop: dict) -> dict:
    return next((a for a in prop.get("anyOf", ()) if a.get("type") != "null"), prop)


def test_the_document_states_the_deployments_limits_and_defaults(small):
    app, doc, client = small
    for name in ("Txt2ImgRequest", "Img2ImgRequest"):
        props = doc["components"]["schemas"][name]["properties"]
        assert _inner(props["width"])["maximum"] == 71 and props["width"]["default"] == 64  # floored to 64
        assert _inner(props["height"])["maximum"] == 71 and props["height"]["default"] == 64
        assert _inner(props["steps"])["maximum"] == 1 and props["steps"]["default"] == 1
        assert _inner(props["batch_size"])["maximum"] == _inner(props["n_iter"])["maximum"] == 2
        assert _inner(props["prompt"])["maxLength"] == 300
    # A request that leaves them out gets the defaults the document shows, not A1111's 512 x 512 x 50 (a 422 here).
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red house", "seed": 7})
    assert r.status_code == 200, r.json
    info = json.loads(r.json["info"])
    assert (info["width"], info["height"], info["steps"]) == (64, 64, 1)
    # What it sends is still held to them.
    r = client.post("/sdapi/v1/txt2img", json={"width": 72, "steps": 1})
    assert r.status_code == 422 and r.json["error"]["field"] == "width"
    assert client.post("/sdapi/v1/txt2img", json={"width": 71, "steps": 1}).status_code == 200  # 64, floored
    # the legacy first pass: its target (width) is held to the limit too
    r = client.post("/sdapi/v1/txt2img", json={"width": 200, "enable_hr": True, "firstphase_width": 32, "steps": 1})
    assert r.status_code == 422 and r.json["error"]["field"] == "width"


def test_every_example_in_the_document_is_served(small):
    """The request examples (the docs page's "try it out", a fuzzer's examples phase) fit this deployment."""
    app, doc, client = small
    examples = {path: item["post"]["requestBody"]["content"]["application/json"]["example"]
                for path, item in doc["paths"].items()
                if "example" in item.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json", {})}
    assert set(examples) == {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info", "/controlnet/detect",
                             "/sdapi/v1/extra-single-image", "/sdapi/v1/extra-batch-images"}
    for path, example in examples.items():
        r = client.post(path, json=example)
        assert r.status_code == 200, (path, r.json)


def test_sampler_names_are_exactly_the_servers(small):
    from pipelines.samplers import resolve_sampler

    app, doc, client = small
    names = doc["components"]["schemas"]["SamplerName"]["enum"]
    assert {"", "Euler a", "k_euler_a", "DPM++ 2M Karras", "DPM++ 2M SDE Exponential", "UniPC SGMUniform"} <= set(names)
    for name in names:  # every name the document offers is resolved
        resolve_sampler(name or None)
    r = client.post("/sdapi/v1/txt2img", json={"sampler_name": "Euler b", "steps": 1})
    assert r.status_code == 422 and r.json["error"]["field"] == "sampler_name"


def test_options_take_the_documented_keys_only(small):
    app, doc, client = small
    schema = doc["components"]["schemas"]["OptionsUpdate"]
    assert schema["additionalProperties"] is False and set(schema["properties"]) == set(DEFAULT_OPTIONS)
    assert schema["properties"]["CLIP_stop_at_last_layers"] == {"type": "integer", "minimum": 1, "maximum": 12}
    r = client.post("/sdapi/v1/options", json={"not_an_option": 1})
    assert r.status_code == 422 and r.json["error"]["field"] == "not_an_option"
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2.0}).status_code == 200
    assert client.get("/sdapi/v1/options").json["CLIP_stop_at_last_layers"] == 2  # JSON's 2.0 is an integer
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}).status_code == 200


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/sdapi/v1/txt2img", {"steps": 1, "tiling": "yes"}, "tiling"),  # a flag is true, false, 1 or 0
    ("/sdapi/v1/txt2img", {"steps": 1, "tiling": 2}, "tiling"),
    ("/sdapi/v1/txt2img", {"steps": 1, "restore_faces": True}, "restore_faces"),  # only false (0) is documented
    ("/sdapi/v1/txt2img", {"steps": 1, "seed_resize_from_w": 64}, "seed_resize_from_w"),
    ("/sdapi/v1/img2img", {"steps": 1, "init_images": ["x"], "mask_blur": 300}, "mask_blur"),
    ("/internal/progress", {"live_preview": "false"}, "live_preview"),
    ("/controlnet/detect", {"controlnet_module": "no-such-module"}, "controlnet_module"),  # with no images too
    ("/controlnet/detect", {"controlnet_threshold_b": False}, "controlnet_threshold_b"),
    ("/models/download", {"source": "0", "type": "VAE", "file_name": "v.safetensors"}, "source"),
])
def test_what_the_document_refuses_the_server_refuses(small, path, body, field):
    app, doc, client = small
    r = client.post(path, json=body)
    assert r.status_code == 422 and r.json["error"]["field"] == field, r.json


def test_unknown_query_parameters_of_the_listings_are_refused(small):
    app, doc, client = small
    for path in ("/controlnet/model_list?nope=1", "/controlnet/module_list?nope=1", "/sdapi/v1/progress?nope=1"):
        r = client.get(path)
        assert r.status_code == 422 and r.json["error"]["field"] == "nope", path


def test_urls_the_server_uses_have_their_pattern(small):
    app, doc, client = small
    source = doc["components"]["schemas"]["DownloadRequest"]["properties"]["source"]["pattern"]
    assert source.startswith("^(?:[Hh][Tt][Tt][Pp][Ss]://")  # downloads.allow_http is off: https only,
    assert "[Oo][Ss][Ss]" not in source  # and no OSS endpoint is set: no oss:// either
    r = client.post("/models/download", json={"source": "oss://bucket/key", "type": "VAE", "file_name": "v.safetensors"})
    assert r.status_code == 422 and r.json["error"]["field"] == "source"
    callback = next(p for p in doc["paths"]["/sdapi/v1/txt2img"]["post"]["parameters"] if p["name"] == "callback_url")
    assert _inner(callback["schema"])["pattern"].startswith("^[Hh][Tt][Tt][Pp][Ss]?://")
    r = client.post("/sdapi/v1/txt2img?callback_url=not-a-url", json={"steps": 1})
    assert r.status_code == 422 and r.json["error"]["field"] == "callback_url"


def test_links_lead_from_each_answer_to_its_resource(small):
    app, doc, client = small
    paths = doc["paths"]
    get_task = paths["/tasks/{task_id}"]["get"]["operationId"]
    for route in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
        link = paths[route]["post"]["responses"]["202"]["links"]["GetTask"]
        assert link == {"operationId": get_task, "parameters": {"task_id": "$response.body#/task_id"},
                        "description": link["description"]}
    download = paths["/models/download"]["post"]["responses"]["202"]["links"]["GetDownload"]
    assert download["parameters"] == {"download_id": "$response.body#/id"}
    image = paths["/images"]["get"]["responses"]["200"]["links"]["GetImage"]
    assert image["parameters"] == {"image_id": "$response.body#/images/0/id"}
    # The links' expressions hold on real answers: an async task's body has task_id, a listing images[0].id. The
    # task runs with the defaults the document shows, as a synchronous request does (64 x 64, not 512 x 512).
    task = client.post("/sdapi/v1/txt2img?async=true", json={"seed": 1})
    assert task.status_code == 202
    done = wait_for(lambda: (lambda t: t if t["status"] in ("succeeded", "failed") else None)(
        client.get(f"/tasks/{task.json['task_id']}").json), timeout=120, what="the task to end")
    assert done["status"] == "succeeded", done["error_msg"]
    listing = client.get("/images").json
    assert listing["images"] and client.get(f"/images/{listing['images'][0]['id']}").status_code in (200, 404)


def test_each_refusal_the_document_cannot_state_is_listed_with_its_reason(small):
    """`x-refusals` name request fields (or the body) of their operation, each with a reason; the 422's
    description points there. The fuzz run lets a schema-valid request be refused only for one of these."""
    app, doc, client = small
    listed = {f"{m.upper()} {p}": op["x-refusals"] for p, item in doc["paths"].items() for m, op in item.items()
              if "x-refusals" in op}
    assert {"POST /sdapi/v1/txt2img", "POST /sdapi/v1/img2img", "POST /sdapi/v1/png-info"} <= set(listed)
    schemas = doc["components"]["schemas"]
    for label, refusals in listed.items():
        method, path = label.split(" ", 1)
        operation = doc["paths"][path][method.lower()]
        assert "x-refusals" in operation["responses"]["422"]["description"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        known = set(schemas[body].get("properties", {})) | {p["name"] for p in operation.get("parameters", [])}
        for field, reason in refusals.items():
            assert reason and (field in known or field == "body"), (label, field)
    # One of them, for real: an image that does not decode is a 422 naming the field.
    r = client.post("/sdapi/v1/png-info", json={"image": "bm90IGFuIGltYWdl"})
    assert r.status_code == 422 and r.json["error"]["field"] == "image"
    assert client.post("/sdapi/v1/png-info", json={"image": png_b64(Image.new("RGB", (16, 16)))}).status_code == 200
