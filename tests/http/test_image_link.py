"""PAI-EAS `alwayson_scripts.image_link`: img2img's init image fetched by URL from a real loopback server
(allow-listed), through the app's test client; every refusal is a 422 naming the field."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY, make_settings, png_b64
from tests.support.loopback import LoopbackServer
from tests.support.waiting import wait_for

FIELD = "alwayson_scripts.image_link"
BASE = {"prompt": "a house", "steps": 2, "width": 64, "height": 64, "denoising_strength": 0.6, "seed": 12}


def png(size=(64, 64)) -> bytes:
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    with LoopbackServer({
        "/init.png": (200, {"Content-Type": "image/png"}, png()),
        "/big.png": (200, {}, b"\x89PNG" + b"x" * 100_000),
        "/huge-pixels.png": (200, {}, png((65, 65))),
        "/text": (200, {"Content-Type": "text/plain"}, b"hello, not an image"),
        "/meta": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
    }) as s:
        yield s


@pytest.fixture(scope="module")
def linked(data_dir, tmp_path_factory):
    """An app that may fetch from 127.0.0.1 (images up to 64 KiB and 64x64 pixels)."""
    from handler.app import create_app

    db = tmp_path_factory.mktemp("image-link") / "records.sqlite3"
    app = create_app(make_settings(data_dir, database_url=f"sqlite:///{db}", max_input_pixels=64 * 64,
                                   network={"allow_hosts": ["127.0.0.1/32"], "max_image_bytes": 64 * 1024}))
    yield app.test_client()
    service = app.extensions["sdfunc"]
    if service.task_runner is not None:
        service.task_runner.stop()
    service.db.dispose()


def img2img(client, **fields):
    return client.post("/sdapi/v1/img2img", json={**BASE, **fields})


def test_image_link_gives_the_init_image(linked, server):
    by_link = img2img(linked, alwayson_scripts={"image_link": server.url("/init.png")})
    assert by_link.status_code == 200, by_link.json
    inline = img2img(linked, init_images=[png_b64(Image.open(io.BytesIO(png())))])
    assert by_link.json["images"][0] == inline.json["images"][0]
    assert json.loads(by_link.json["info"])["denoising_strength"] == 0.6
    # EAS' {"args": [url]} form works too.
    wrapped = img2img(linked, alwayson_scripts={"image_link": {"args": [server.url("/init.png")]}})
    assert wrapped.status_code == 200 and wrapped.json["images"][0] == inline.json["images"][0]


def test_init_images_and_image_link_together_are_refused(linked, server):
    fetched = len(server.requests)
    inline = png_b64(Image.new("RGB", (64, 64), "white"))
    both = {"init_images": [inline], "alwayson_scripts": {"image_link": server.url("/init.png")}}
    for r in (img2img(linked, **both), linked.post("/sdapi/v1/img2img?async=true", json={**BASE, **both})):
        assert r.status_code == 422 and r.json["error"]["field"] == FIELD, r.json
        assert FIELD in r.json["error"]["message"] and r.headers["X-Charge"] == "0"
    assert len(server.requests) == fetched  # refused before fetching anything


def test_image_link_in_an_async_task(linked, server):
    r = linked.post("/sdapi/v1/img2img?async=true", json={**BASE, "alwayson_scripts": {
        "image_link": server.url("/init.png")}})
    assert r.status_code == 202, r.json
    view: dict = {}

    def done() -> bool:
        nonlocal view
        view = linked.get(f"/tasks/{r.json['task_id']}").json
        return view["status"] in ("succeeded", "failed")

    wait_for(done, timeout=120, what="the task")
    assert view["status"] == "succeeded", view
    bad = linked.post("/sdapi/v1/img2img?async=true", json={**BASE, "alwayson_scripts": {
        "image_link": server.url("/missing.png")}})
    assert bad.status_code == 202  # fetched when the task runs: the task fails with the reason
    wait_for(lambda: linked.get(f"/tasks/{bad.json['task_id']}").json["status"] == "failed", what="the failure")
    assert "HTTP 404" in linked.get(f"/tasks/{bad.json['task_id']}").json["error_msg"]


@pytest.mark.parametrize("path, reason", [
    ("/big.png", "more than the limit of 65536"),
    ("/text", "not a decodable image"),
    ("/missing.png", "HTTP 404"),
    ("/huge-pixels.png", "65x65 exceeds the limit of 4096 pixels"),
    ("/meta", "metadata"),
])
def test_refusals_name_the_field(linked, server, path, reason):
    r = img2img(linked, alwayson_scripts={"image_link": server.url(path)})
    assert r.status_code == 422, r.json
    assert r.json["error"]["field"] == FIELD and reason in r.json["error"]["message"], r.json
    assert "Traceback" not in r.json["error"]["message"]


@pytest.mark.parametrize("link", ["ftp://127.0.0.1/x.png", "file:///etc/passwd", "gopher://x/", "//127.0.0.1/a"])
def test_non_http_links_are_refused(linked, link):
    r = img2img(linked, alwayson_scripts={"image_link": link})
    assert r.status_code == 422 and r.json["error"]["field"] == FIELD


def test_private_addresses_are_refused_by_default(client, server):
    r = client.post("/sdapi/v1/img2img", json={**BASE, "alwayson_scripts": {"image_link": server.url("/init.png")}})
    assert r.status_code == 422 and r.json["error"]["field"] == FIELD
    assert "loopback" in r.json["error"]["message"] and "network.allow_hosts" in r.json["error"]["message"]
    r = client.post("/sdapi/v1/img2img?async=true", json={**BASE, "alwayson_scripts": {
        "image_link": server.url("/init.png")}})
    assert r.status_code == 422 and r.json["error"]["field"] == FIELD  # refused at submission, not as a task


def test_txt2img_refuses_image_link_and_img2img_needs_an_image(linked, server):
    r = linked.post("/sdapi/v1/txt2img", json={**TINY, "alwayson_scripts": {"image_link": server.url("/init.png")}})
    assert r.status_code == 422 and r.json["error"]["field"] == FIELD and "img2img" in r.json["error"]["message"]
    r = linked.post("/sdapi/v1/txt2img?async=true", json={**TINY, "alwayson_scripts": {
        "image_link": server.url("/init.png")}})
    assert r.status_code == 422 and r.json["error"]["field"] == FIELD
    for body in (BASE, {**BASE, "init_images": []}, {**BASE, "alwayson_scripts": {"image_link": ""}}):
        r = img2img(linked, **{k: v for k, v in body.items() if k not in BASE})
        assert r.status_code == 422 and r.json["error"]["field"] == "init_images", r.json
