"""External VAEs through the HTTP API: `override_settings.sd_vae` and PAI-EAS `alwayson_scripts.sd_vae` pick a
single-file VAE from models/VAE (loaded offline with the shipped config), "Automatic"/"None" keep the
checkpoint's own, and an unknown name is a 404 naming the field."""

import base64
import hashlib
import io
import json
import shutil

import pytest
from PIL import Image

from tests.conftest import linked_data_root, make_settings

BASE = {"prompt": "a red house", "steps": 2, "width": 64, "height": 64, "seed": 9, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def vae_app(data_dir, tmp_path_factory):
    from handler.app import create_app
    from pipelines.builders.demo import write_demo_vae

    root = linked_data_root(data_dir, tmp_path_factory.mktemp("vae-data"))
    write_demo_vae(root / "models" / "VAE")
    app = create_app(make_settings(root, default_checkpoint="demo-sd15"))
    yield app
    app.extensions["sdfunc"].stop()


def gen(client, **changes):
    r = client.post("/sdapi/v1/txt2img", json={**BASE, **changes})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def pixels(body) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB").tobytes()


def test_external_vae_by_override_and_by_eas_key(vae_app):
    client = vae_app.test_client()
    own = gen(client)
    by_override = gen(client, override_settings={"sd_vae": "demo-vae.safetensors"})
    by_eas = gen(client, alwayson_scripts={"sd_vae": "demo-vae"})
    assert pixels(by_override) != pixels(own)
    assert pixels(by_eas) == pixels(by_override)
    path = vae_app.extensions["sdfunc"].settings.vae_dir / "demo-vae.safetensors"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    info = json.loads(by_override["info"])
    assert f"VAE hash: {sha[:10]}, VAE: demo-vae.safetensors" in info["infotexts"][0]
    assert info["sd_vae_name"] == "demo-vae.safetensors" and info["sd_vae_hash"] == sha[:10]
    for same in ("Automatic", "None"):
        body = gen(client, override_settings={"sd_vae": same})
        assert pixels(body) == pixels(own)
        assert "VAE hash" not in json.loads(body["info"])["infotexts"][0]
    # The VAE pipeline shares the checkpoint's UNet and text encoder: one copy of them in the cache.
    service = vae_app.extensions["sdfunc"]
    with_vae = [m for m in service.cache.loaded() if m.vae is not None][0]
    plain = [m for m in service.cache.loaded() if m.vae is None][0]
    assert with_vae.pipe.unet is plain.pipe.unet and with_vae.pipe.vae is not plain.pipe.vae


@pytest.mark.parametrize("changes, field", [
    ({"override_settings": {"sd_vae": "nosuch.safetensors"}}, "override_settings.sd_vae"),
    ({"alwayson_scripts": {"sd_vae": "nosuch"}}, "alwayson_scripts.sd_vae"),
])
def test_unknown_vae_is_404_naming_the_field(vae_app, changes, field):
    r = vae_app.test_client().post("/sdapi/v1/txt2img", json={**BASE, **changes})
    assert r.status_code == 404
    assert r.get_json()["error"]["field"] == field and "nosuch" in r.get_json()["error"]["message"]


def test_listing_and_refresh(vae_app):
    client = vae_app.test_client()
    vae_dir = vae_app.extensions["sdfunc"].settings.vae_dir
    assert client.get("/sdapi/v1/sd-vae").get_json() == [
        {"model_name": "demo-vae.safetensors", "filename": str(vae_dir / "demo-vae.safetensors")}]
    shutil.copy(vae_dir / "demo-vae.safetensors", vae_dir / "second.safetensors")
    try:
        assert client.post("/sdapi/v1/refresh-vae").get_json() is None
        names = [v["model_name"] for v in client.get("/sdapi/v1/sd-vae").get_json()]
        assert names == ["demo-vae.safetensors", "second.safetensors"]
    finally:
        (vae_dir / "second.safetensors").unlink()
        client.post("/sdapi/v1/refresh-vae")
